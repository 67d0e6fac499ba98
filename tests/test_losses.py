"""The training loss against a plain NumPy reference."""

import jax
import numpy as np
import pytest

from roc_jax.losses import masked_xent


def test_masked_xent_matches_reference_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = np.array([0, 2, 4, 2, 1, 3])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    loss, acc = jax.jit(masked_xent)(logits, labels, mask)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = -np.mean(logp[np.arange(5), labels[:5]])
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(acc) == pytest.approx(np.mean((logits.argmax(-1) == labels)[:5]))
    junk = logits.copy()
    junk[5] = 1e4  # a padding row changes nothing, whatever it holds
    assert float(masked_xent(junk, labels, mask)[0]) == pytest.approx(float(loss))


def test_relation_to_pair_xent_matches_reference():
    """Each relation present among the real rows: -log of its positives' share of its column's
    softmax over the real rows; absent relations and padding rows add nothing (nor gradient)."""
    from roc_jax.losses import relation_to_pair_xent

    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4)).astype(np.float32) * 3
    labels = np.array([0, 1, 1, 3, 0, 2])  # relation 2 only in the padding row
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    rows = np.flatnonzero(mask)
    want = []
    for r in (0, 1, 3):
        col = logits[rows, r]
        p = np.exp(col - col.max())
        p /= p.sum()
        want.append(-np.log(p[labels[rows] == r].sum()))
    loss = jax.jit(relation_to_pair_xent)(logits, labels, mask)
    assert float(loss) == pytest.approx(np.mean(want), rel=1e-5)
    grad = jax.grad(relation_to_pair_xent)(logits, labels, mask)
    assert np.all(np.isfinite(grad)) and not grad[:, 2].any() and not grad[5].any()
