"""The shared layers' own formulas: the erf GELU (against PyTorch's), the dropout's masks
(unrolled threefry against JAX's, rate, independence, modes, gradient) and the dense layers'
product (its gradients against autodiff of ``jax.lax.dot_general``, the products it compiles to)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from roc_jax.models.dropout import Dropout, keep_mask, threefry2x32
from roc_jax.models.layers import MultiHeadAttention, activation, dense, dense_dot_general


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


def _product_grads(dot_general, x, kernel, g):
    def loss(x, kernel):
        y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return jnp.sum(y * g)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)


@pytest.mark.parametrize("x_shape, n", [((4, 9, 6), 10), ((4, 9, 10), 6), ((7, 8), 8)],
                         ids=["K<N", "K>N", "K=N-2d"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_product_gradients_match_autodiff(x_shape, n, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    kernel = jnp.asarray(rng.standard_normal((x_shape[-1], n)), dtype)
    g = jnp.asarray(rng.standard_normal((*x_shape[:-1], n)), dtype)
    ours = _product_grads(dense_dot_general, x, kernel, g)
    ref = _product_grads(jax.lax.dot_general, x, kernel, g)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol * float(jnp.max(jnp.abs(b))))


def test_dense_product_other_arguments_are_plain_dot_general():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 5)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((5, 4)), jnp.bfloat16)
    dims = (((1,), (0,)), ((), ()))
    ours = dense_dot_general(x, kernel, dims, preferred_element_type=jnp.float32)
    assert ours.dtype == jnp.float32
    np.testing.assert_array_equal(ours, jax.lax.dot_general(x, kernel, dims,
                                                            preferred_element_type=jnp.float32))
    # contracting the kernel's last axis is not the dense layer's product: passed through too
    np.testing.assert_array_equal(dense_dot_general(x, kernel.T, (((1,), (1,)), ((), ()))),
                                  x @ kernel)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the product's CPU form")
def test_dense_layer_gradients_compile_to_last_axis_products():
    """Why ``dense_dot_general`` exists: on a CPU, every product of a dense layer's train step
    contracts its left operand's last axis (XLA:CPU's fast matmul path takes no other); autodiff
    of ``jax.lax.dot_general`` compiles the kernel gradient to one contracting axis 0."""
    def lhs_contractions(layer):
        x = jnp.ones((2, 16, 8), jnp.float32)
        graphdef, params = nnx.split(layer)

        def loss(params, x):
            return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

        hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
        found = re.findall(r"\} dot\(.*?lhs_contracting_dims=\{(\d+)\}", hlo)
        assert found, "no product in the compiled gradient"
        return {int(axis) for axis in found}

    ours = dense(8, 32, dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain = nnx.Linear(8, 32, rngs=nnx.Rngs(0))
    assert 0 in lhs_contractions(plain)  # the generic product this layer avoids
    assert lhs_contractions(ours) <= {1, 2}  # x [2, 16, 8] (axis 2) and 2-d views (axis 1)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion of the attention")
def test_attention_products_compile_to_separate_fusions():
    """Why the einsum attention masks with a select: with ``logits + bias`` XLA:CPU fused both
    products and the softmax between them into one YNNPACK fusion, which allocates its
    ``[B, H, Q, L]`` temporaries on every call (page faults on every forward)."""
    mha = MultiHeadAttention(384, 12, rngs=nnx.Rngs(0))  # MiniLM's width and heads
    mha.eval()
    graphdef, params = nnx.split(mha)
    x, mask = jnp.ones((8, 64, 384), jnp.float32), jnp.ones((8, 64), bool).at[0, 40:].set(False)
    hlo = jax.jit(lambda p, x, m: nnx.merge(graphdef, p)(x, m)).lower(
        params, x, mask).compile().as_text()
    bodies = re.findall(r"^%fused_computation[.\d]* .*?\{\n(.*?)\n\}", hlo, flags=re.M | re.S)
    assert bodies, "no fusion in the compiled attention"
    assert max(len(re.findall(r" dot\(", body)) for body in bodies) == 1
