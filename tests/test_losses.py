"""The training losses against plain NumPy references, and ATLOP's threshold rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roc_jax.losses import masked_xent, relation_loss, threshold_loss

NONE = 2


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _ref_threshold(logits, labels, mask, none):
    """ATLOP (Zhou et al. 2021), eq. for one positive label, written out per row."""
    losses = []
    for row, y in zip(logits, labels, strict=True):
        others = [j for j in range(len(row)) if j != y or y == none]
        l2 = -_log_softmax(row[others])[others.index(none)]
        l1 = 0.0 if y == none else -_log_softmax(row[[y, none]])[0]
        losses.append(l1 + l2)
    m = np.asarray(mask, float)
    return float((np.asarray(losses) * m).sum() / m.sum())


def test_threshold_loss_matches_reference_and_masks_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = np.array([0, 2, 4, 2, 1, 3])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    loss, acc = jax.jit(threshold_loss, static_argnums=3)(logits, labels, mask, NONE)
    assert float(loss) == pytest.approx(_ref_threshold(logits, labels, mask, NONE), rel=1e-5)
    want_acc = np.mean((logits.argmax(-1) == labels)[:5])
    assert float(acc) == pytest.approx(want_acc)
    # Padding rows change nothing, whatever they hold.
    junk = logits.copy()
    junk[5] = 1e4
    assert float(threshold_loss(junk, labels, mask, NONE)[0]) == pytest.approx(float(loss))


def test_threshold_loss_orders_gold_above_threshold_above_the_rest():
    """Gradient descent on the loss alone ends with argmax = gold for relation rows (gold above
    TH) and argmax = TH for None rows (every relation below TH)."""
    labels = jnp.asarray([0, 1, NONE, 3])
    mask = jnp.ones(4, bool)
    logits = jnp.zeros((4, 5))
    grad = jax.jit(jax.grad(lambda x: threshold_loss(x, labels, mask, NONE)[0]))
    for _ in range(200):
        logits = logits - 1.0 * grad(logits)
    np.testing.assert_array_equal(np.argmax(logits, -1), labels)
    # A relation row has no pull between the non-gold relations and the gold one: only TH sits
    # between them (the relative order of the negatives is free).
    row = np.asarray(logits[0])
    assert row[0] > row[NONE] > max(row[1], row[3], row[4])


def test_relation_loss_picks_the_rule():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    labels, mask = jnp.asarray([0, 1, 2]), jnp.ones(3, bool)
    np.testing.assert_allclose(relation_loss("prototype", logits, labels, mask)[0],
                               masked_xent(logits, labels, mask)[0])
    np.testing.assert_allclose(relation_loss("threshold", logits, labels, mask, 1)[0],
                               threshold_loss(logits, labels, mask, 1)[0])
    with pytest.raises(ValueError, match="none_rule"):
        relation_loss("max", logits, labels, mask)
