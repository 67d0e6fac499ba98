"""roc_jax: ROC (Retrieval over Classification) for multimodal relation extraction in JAX/Flax.

``roc_jax.load(workdir)`` restores a trained model and ``roc_jax.predict(loaded, text, ...)``
ranks relations for a sentence (see ``roc_jax.inference``). Both are imported lazily so that
``import roc_jax`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load", "predict"]


def __getattr__(name: str) -> Any:
    if name in ("load", "predict"):
        from roc_jax import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'roc_jax' has no attribute {name!r}")
