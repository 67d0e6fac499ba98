"""Training losses over relation logits ``[B, R]`` (retrieval scores or softmax-head logits).

``masked_xent``: cross-entropy over every relation, ``None`` one of them; over retrieval scores
this is InfoNCE with every relation as a candidate.

``threshold_loss``: the adaptive-threshold loss of ATLOP (Zhou et al., AAAI 2021) for one label
per sample, with the ``None`` slot as the threshold class TH. For a sample of relation ``r``:
``-log softmax_{r, TH}(r) - log softmax_{TH, negatives}(TH)`` (rank ``r`` above TH and TH above
every other relation); for a ``None`` sample only the second term (TH above every relation).
Prediction stays the argmax over all R logits: ``None`` wins exactly when no relation clears TH.

Both return ``(mean loss, accuracy)`` over the real rows (``mask``); the denominator is the
global count of real rows, so 1 and 8 devices compute the same mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)
    return (values * m).sum() / jnp.maximum(m.sum(), 1.0)


def _accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    return _masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


def masked_xent(logits: jax.Array, labels: jax.Array, mask: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and accuracy: ``[B, R], [B], [B] -> (), ()``."""
    xent = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return _masked_mean(xent, mask), _accuracy(logits, labels, mask)


def threshold_loss(logits: jax.Array, labels: jax.Array, mask: jax.Array, none_index: int
                   ) -> tuple[jax.Array, jax.Array]:
    """ATLOP's adaptive-threshold loss, ``None`` (id ``none_index``) as TH: ``[B, R], [B], [B]
    -> (), ()``."""
    logits = logits.astype(jnp.float32)
    r = logits.shape[-1]
    gold = jax.nn.one_hot(labels, r, dtype=bool)  # [B, R]
    th_col = jnp.arange(r) == none_index  # [R]
    is_none = labels == none_index  # [B]
    neg_inf = jnp.finfo(jnp.float32).min
    # Term 1 (relation samples): the gold relation against TH alone.
    pos = jnp.where(gold | th_col[None], logits, neg_inf)
    l1 = jnp.where(is_none, 0.0, -jax.nn.log_softmax(pos, -1)[jnp.arange(len(labels)), labels])
    # Term 2: TH against every relation but the gold one (all of them for a None sample).
    neg = jnp.where(gold & ~th_col[None], neg_inf, logits)
    l2 = -jax.nn.log_softmax(neg, -1)[:, none_index]
    return _masked_mean(l1 + l2, mask), _accuracy(logits, labels, mask)


def relation_loss(none_rule: str, logits: jax.Array, labels: jax.Array, mask: jax.Array,
                  none_index: int = -1) -> tuple[jax.Array, jax.Array]:
    """The loss of a model's ``none_rule``: 'prototype' -> ``masked_xent`` (``None`` is a class
    like the others), 'threshold' -> ``threshold_loss``."""
    if none_rule == "prototype":
        return masked_xent(logits, labels, mask)
    if none_rule == "threshold":
        return threshold_loss(logits, labels, mask, none_index)
    raise ValueError(f"none_rule {none_rule!r}; expected 'prototype' or 'threshold'")
