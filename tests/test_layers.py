"""The shared layers' own formulas: the erf GELU (against PyTorch's) and the dropout's masks
(unrolled threefry against JAX's, rate, independence, modes, gradient)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from roc_jax.models.dropout import Dropout, keep_mask, threefry2x32
from roc_jax.models.layers import activation


def test_gelu_matches_torch_exact_gelu():
    torch = pytest.importorskip("torch")
    x = np.linspace(-12.0, 12.0, 20001, dtype=np.float32)
    ours = np.asarray(activation("gelu")(jnp.asarray(x)))
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()  # approximate="none": erf
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    # and the erfc form of jax.nn.gelu, which differs only by float rounding
    np.testing.assert_allclose(ours, jax.nn.gelu(x, approximate=False), rtol=1e-5, atol=1e-6)


def test_gelu_keeps_bfloat16():
    x = jnp.ones((4,), jnp.bfloat16)
    assert activation("gelu")(x).dtype == jnp.bfloat16


def test_threefry_matches_jax_bit_for_bit():
    import jax.extend.random as jr

    rng = np.random.default_rng(0)
    for k1, k2 in [(0, 0), (0, 3), (0xDEADBEEF, 0x12345678)]:
        counts = rng.integers(0, 2**32, size=2 * 1000, dtype=np.uint64).astype(np.uint32)
        ref = np.asarray(jr.threefry_2x32(jnp.array([k1, k2], jnp.uint32), jnp.asarray(counts)))
        w1, w2 = threefry2x32(jnp.uint32(k1), jnp.uint32(k2), jnp.asarray(counts[:1000]),
                              jnp.asarray(counts[1000:]))
        np.testing.assert_array_equal(np.concatenate([w1, w2]), ref)


def test_keep_mask_with_another_prng_impl():
    mask = np.asarray(keep_mask(jax.random.key(0, impl="rbg"), (5000,), 0.8))
    assert abs(mask.mean() - 0.8) < 5 * np.sqrt(0.8 * 0.2 / 5000)


@pytest.mark.parametrize("shape", [(64, 384), (7, 33, 5)])  # an even and an odd element count
def test_keep_mask_rate_and_independence(shape):
    keep = 0.9
    masks = np.stack([np.asarray(keep_mask(jax.random.key(i), shape, keep)) for i in range(8)])
    n = masks.size
    assert masks.shape == (8, *shape) and masks.dtype == bool
    # binomial standard error sqrt(p(1-p)/n); 5 sigma
    assert abs(masks.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n)
    # the two halves of a random word decide neighbouring elements: no correlation between them
    flat = masks.reshape(8, -1)
    pairs = flat.shape[1] // 2 * 2
    lo, hi = flat[:, 0:pairs:2].ravel(), flat[:, 1:pairs:2].ravel()
    assert abs(np.corrcoef(lo.astype(float), hi.astype(float))[0, 1]) < 5 / np.sqrt(lo.size)
    # different keys give different masks
    assert (masks[0] != masks[1]).any()


def test_keep_mask_extreme_keep():
    assert np.asarray(keep_mask(jax.random.key(0), (1000,), 1.0 - 1e-9)).all()
    assert abs(np.asarray(keep_mask(jax.random.key(0), (100000,), 0.5)).mean() - 0.5) < 0.01


def test_dropout_modes_and_scaling():
    x = jax.random.normal(jax.random.key(1), (16, 128), jnp.float32)
    drop = Dropout(0.25, rngs=nnx.Rngs(dropout=0))
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)
    drop.train()
    y1, y2 = np.asarray(drop(x)), np.asarray(drop(x))
    assert not np.array_equal(y1, y2)  # the stream advances between calls
    kept = y1 != 0
    np.testing.assert_allclose(y1[kept], np.asarray(x)[kept] * (1 / 0.75), rtol=1e-6)
    assert abs(kept.mean() - 0.75) < 0.05
    # the same key gives the same mask (what exact resume relies on)
    key = jax.random.key(7)
    np.testing.assert_array_equal(drop(x, rngs=key), drop(x, rngs=key))
    np.testing.assert_array_equal(Dropout(1.0, rngs=nnx.Rngs(0))(x, deterministic=False), 0 * x)
    np.testing.assert_array_equal(Dropout(0.0, rngs=nnx.Rngs(0))(x, deterministic=False), x)


def test_dropout_gradient_is_the_mask_times_scale():
    x = jax.random.normal(jax.random.key(2), (8, 32), jnp.float32)
    drop = Dropout(0.5, rngs=nnx.Rngs(dropout=0))
    drop.train()
    key = jax.random.key(3)
    y = drop(x, rngs=key)
    g = jax.grad(lambda v: drop(v, rngs=key).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.where(np.asarray(y) != 0, 2.0, 0.0))


def test_dropout_needs_a_mode():
    with pytest.raises(ValueError, match="deterministic"):
        Dropout(0.1, deterministic=None, rngs=nnx.Rngs(0))(jnp.ones((2,)))


def test_gradient_barrier_is_the_identity_with_a_materialized_gradient():
    from roc_jax.models.layers import gradient_barrier

    x = jax.random.normal(jax.random.key(4), (4, 5, 8), jnp.float32)

    def f(v, barrier):
        h = jnp.sin(v) * 2
        h = gradient_barrier(h) if barrier else h
        return (h * h).sum() + (h.transpose(2, 0, 1) * jnp.arange(8.0)[:, None, None]).sum()

    np.testing.assert_array_equal(gradient_barrier(x), x)
    np.testing.assert_allclose(jax.grad(f)(x, True), jax.grad(f)(x, False), rtol=1e-6)
    # the reason it exists: the backward pass keeps a conditional (a fusion boundary on XLA:CPU)
    hlo = jax.jit(jax.grad(f), static_argnums=1).lower(x, True).compile().as_text()
    assert "conditional" in hlo
    # a non-finite gradient stays non-finite (all NaN)
    g = jax.grad(lambda v: (gradient_barrier(v) * jnp.where(v == v[0, 0, 0], jnp.inf, 1.0)).sum())(x)
    assert np.isnan(np.asarray(g)).all()
