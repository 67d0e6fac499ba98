"""attention_impl="fused" (jax.nn.dot_product_attention) against the einsum reference, on CPU.

On CPU "fused" runs dot_product_attention's XLA implementation; these tests pin that the fused
path computes the same function (masks of any pattern, fully padded rows included) and the same
gradients as the einsum path, and that it refuses attention dropout in training.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from roc_jax.models.bert import BertConfig, BertEncoder
from roc_jax.models.layers import MultiHeadAttention, fused_attention_backend
from roc_jax.models.vit import ViT, ViTConfig

TOL = dict(rtol=1e-5, atol=1e-5)


def _masks(b: int, length: int) -> np.ndarray:
    """Right padding, a non-prefix pattern ([text | image]-like) and a fully padded row."""
    m = np.ones((b, length), bool)
    m[0, length - 3:] = False  # right padding
    m[1, 2:4] = False  # a hole in the middle, as the fusion layers' [text | image] mask has
    m[2, :] = False  # fully padded row
    return m


def _pair(impl: str, **kw) -> MultiHeadAttention:
    return MultiHeadAttention(32, 4, dtype=jnp.float32, attention_impl=impl,
                              rngs=nnx.Rngs(params=0, dropout=1), **kw)


def test_mha_fused_matches_einsum_forward_and_grads():
    x = jax.random.normal(jax.random.key(0), (4, 10, 32), jnp.float32)
    mask = jnp.asarray(_masks(4, 10))
    ref, fused = _pair("einsum"), _pair("fused")
    # Same seeds, same parameters: the switch changes only the kernel.
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)),
                                     nnx.state(ref, nnx.Param), nnx.state(fused, nnx.Param)))
    for m in (mask, None):
        y_ref, y_fused = ref(x, m), fused(x, m)
        assert bool(jnp.all(jnp.isfinite(y_fused)))
        np.testing.assert_allclose(np.asarray(y_fused), np.asarray(y_ref), **TOL)

    # A fully padded row's output is a constant (uniform attention) in both paths. Training never
    # sends gradient into such rows (they are padding examples, masked out of the loss), so the
    # loss weights them out here too.
    keep = jnp.any(mask, axis=1)[:, None, None]

    def loss(module, xx):
        return jnp.sum(jnp.where(keep, jnp.sin(module(xx, mask)), 0.0))

    # Jitted: one compile is cheaper here than eager dispatch of every op of the backward pass.
    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    g_ref, gx_ref = grad(ref, x)
    g_fused, gx_fused = grad(fused, x)
    np.testing.assert_allclose(np.asarray(gx_fused), np.asarray(gx_ref), **TOL)
    flat_ref = jax.tree.leaves(nnx.state(g_ref, nnx.Param))
    flat_fused = jax.tree.leaves(nnx.state(g_fused, nnx.Param))
    assert len(flat_ref) == len(flat_fused) == 8
    for a, b in zip(flat_ref, flat_fused, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL)


def test_bert_encoder_fused_matches_einsum():
    cfg = BertConfig(num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = jax.random.randint(jax.random.key(1), (3, 12), 1, cfg.vocab_size)
    mask = jnp.asarray(_masks(3, 12)).astype(jnp.int32)
    models = {impl: BertEncoder(dataclasses.replace(cfg, attention_impl=impl),
                                rngs=nnx.Rngs(params=0, dropout=1))
              for impl in ("einsum", "fused")}
    out = {impl: nnx.jit(lambda mdl: mdl(ids, mask))(m) for impl, m in models.items()}
    np.testing.assert_allclose(np.asarray(out["fused"]), np.asarray(out["einsum"]), **TOL)

    keep = jnp.any(mask > 0, axis=1)[:, None, None]  # see the MultiHeadAttention test

    def loss(model):
        return jnp.mean(jnp.where(keep, model(ids, mask), 0.0) ** 2)

    grads = {impl: jax.tree.leaves(nnx.state(nnx.jit(nnx.grad(loss))(m), nnx.Param))
             for impl, m in models.items()}
    assert len(grads["einsum"]) == len(grads["fused"]) > 0
    for a, b in zip(grads["einsum"], grads["fused"], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), **TOL)


def test_vit_fused_matches_einsum():
    cfg = ViTConfig(num_hidden_layers=1)
    px = jax.random.normal(jax.random.key(2), (2, cfg.image_size, cfg.image_size, 3))
    out = {impl: ViT(dataclasses.replace(cfg, attention_impl=impl),
                     rngs=nnx.Rngs(params=0, dropout=1))(px)
           for impl in ("einsum", "fused")}
    assert out["fused"].shape == (2, cfg.grid**2 + 1, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(out["fused"]), np.asarray(out["einsum"]), **TOL)


def test_hf_config_keeps_default_impl():
    # attention_impl is ours: a HF config.json never names it, so loading keeps the reference.
    tc = BertConfig.from_hf({"model_type": "bert", "vocab_size": 100, "hidden_size": 64,
                             "num_hidden_layers": 1})
    vc = ViTConfig.from_hf({"model_type": "clip_vision_model", "hidden_size": 64,
                            "num_hidden_layers": 1, "num_attention_heads": 4})
    assert tc.attention_impl == vc.attention_impl == "einsum"


def test_fused_refuses_attention_dropout_in_training():
    x = jnp.ones((2, 4, 32), jnp.float32)
    m = _pair("fused", dropout=0.1)
    with pytest.raises(ValueError, match="attention_probs_dropout_prob=0"):
        m(x)
    ref = _pair("einsum", dropout=0.1)
    m.eval()  # dropout inactive: the fused kernel computes the same function, so it runs
    ref.eval()
    np.testing.assert_allclose(np.asarray(m(x)), np.asarray(ref(x)), **TOL)
    # The einsum path keeps attention dropout in training.
    ref = _pair("einsum", dropout=0.5)
    assert not np.allclose(np.asarray(ref(x)), np.asarray(ref(x)))


def test_unknown_impl_and_cpu_backend():
    with pytest.raises(ValueError, match="attention_impl"):
        _pair("flash")
    # On this CPU the fused path uses dot_product_attention's XLA implementation.
    assert fused_attention_backend(jnp.bfloat16, 64, 80) == "xla"
