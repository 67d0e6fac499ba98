"""The training loss over relation logits ``[B, R]`` (retrieval scores or softmax-head logits).

Cross-entropy over every relation, ``None`` one of them; over retrieval scores this is InfoNCE
with every relation as a candidate (pair to relation). ``relation_to_pair_xent`` is the other
direction, which the retrieval head adds with ``train.relation_to_pair_weight``.
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


def relation_to_pair_xent(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """The other direction of the InfoNCE loss: each relation retrieves its pairs from the batch.

    ``[B, R], [B], [B] -> ()``: for each relation with at least one real row in the batch, the
    cross-entropy of its column's softmax over the real rows, with all of its rows as positives
    (``-log sum_{i: y_i = r} softmax_i(logits[:, r])``), averaged over those relations. The
    batch is the global one, so 1 and 8 devices compute the same value.
    """
    very_low = jnp.float32(-1e9)  # finite: a column without rows must keep finite gradients
    real = mask.astype(bool)[:, None]
    positive = real & (labels[:, None] == jnp.arange(logits.shape[1])[None])  # [B, R]
    lse_all = jax.nn.logsumexp(jnp.where(real, logits, very_low), axis=0)  # [R]
    lse_pos = jax.nn.logsumexp(jnp.where(positive, logits, very_low), axis=0)
    present = positive.any(axis=0)
    per_relation = jnp.where(present, lse_all - lse_pos, 0.0)
    return per_relation.sum() / jnp.maximum(present.sum(), 1)
