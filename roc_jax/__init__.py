"""roc_jax: ROC (Retrieval over Classification) for multimodal relation extraction in JAX/Flax.

``roc_jax.load(workdir)`` restores a trained model and ``roc_jax.predict(loaded, text, ...)``
ranks relations for a sentence (see ``roc_jax.inference``). Both are imported lazily so that
``import roc_jax`` stays cheap.

With ``ROC_MALLOC_TUNING=1`` in the environment, importing the package tunes glibc malloc so that
XLA:CPU's per-step buffers are reused instead of mapped afresh each step: fewer page faults for
more resident memory (``roc_jax.host_memory``). It must happen before the first JAX computation,
which is why it happens here.
"""

from __future__ import annotations

from typing import Any

from roc_jax import host_memory

host_memory.keep_freed_memory()

__version__ = "0.1.0"

__all__ = ["__version__", "load", "predict"]


def __getattr__(name: str) -> Any:
    if name in ("load", "predict"):
        from roc_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'roc_jax' has no attribute {name!r}")
