"""The training loss over relation logits ``[B, R]`` (retrieval scores or softmax-head logits).

Cross-entropy over every relation, ``None`` one of them; over retrieval scores this is InfoNCE
with every relation as a candidate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_xent(logits: jax.Array, labels: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy over the real rows: ``[B, R], [B], [B] -> (), ()``.

    The denominator is the global count of real rows (``mask``), so 1 and 8 devices compute the
    same mean.
    """
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    acc = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return (xent * m).sum() / n, (acc * m).sum() / n
