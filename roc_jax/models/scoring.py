"""Relation scoring: pair vectors against relation-description vectors (cosine / temperature).

Shared by the model (``roc_jax.models.roc``) and the description cache's retrieval index
(``roc_jax.labels.cache.top_k_relations``), so that training, eval and predict score alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Score of a relation with no description (an all-False mask row): finite, so that gradients of a
# cross-entropy over such logits stay finite.
NO_DESCRIPTION_SCORE = -1e9


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """Unit vectors along ``axis`` in float32 (the cosine needs the precision under bf16)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def relation_vectors(desc: jax.Array, mask: jax.Array) -> jax.Array:
    """Each relation's vector, the normalized mean of its normalized valid descriptions:
    ``[R, K, P], [R, K] -> [R, P]`` (a relation with no valid description gets zeros)."""
    desc = l2_normalize(desc)
    maskf = mask.astype(jnp.float32)  # [R, K]
    count = jnp.sum(maskf, axis=-1)  # [R]
    return l2_normalize(jnp.sum(desc * maskf[..., None], axis=1) / jnp.maximum(count, 1.0)[:, None])


def relation_scores(pair: jax.Array, desc: jax.Array, mask: jax.Array,
                    temperature: float | jax.Array = 1.0) -> jax.Array:
    """Scores of every relation for every pair vector: ``[B, P], [R, K, P], [R, K] -> [B, R]``.

    A relation's vector is ``relation_vectors``; the score is ``cos(pair, relation) /
    temperature``. A relation with an all-False mask row scores ``NO_DESCRIPTION_SCORE``.
    """
    scores = l2_normalize(pair) @ relation_vectors(desc, mask).T / temperature  # [B, R]
    return jnp.where(jnp.any(mask, axis=-1)[None], scores, NO_DESCRIPTION_SCORE)
