"""BERT encoder: parity with transformers' PyTorch BertModel (tiny random config and MiniLM-L6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from roc_jax.models import weights
from roc_jax.models.bert import BertConfig, BertEmbeddings, BertEncoder, BertLayer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    type_vocab_size=2,
    hidden_act="gelu",
)


def _padded_batch(rng: np.random.Generator, b: int, length: int, vocab: int):
    ids = rng.integers(1, vocab, size=(b, length)).astype(np.int64)
    lengths = rng.integers(2, length + 1, size=b)
    lengths[0] = length  # one full row
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ids = ids * mask  # pad id 0
    types = (np.arange(length)[None] >= lengths[:, None] // 2).astype(np.int64) * mask
    return ids, mask, types


def _torch_bert(cfg: dict):
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**cfg, attn_implementation="eager")
    return transformers.BertModel(hf_cfg).eval()


def test_tiny_parity_with_padding():
    pt = _torch_bert(TINY)
    config = BertConfig.from_hf(pt.config.to_dict())
    model = BertEncoder(config, rngs=nnx.Rngs(0))
    report = weights.load_from_state_dict(model, pt.state_dict(), weights.bert_name_map, "bert")
    assert not report.missing and not report.unexpected
    assert report.ignored == []  # position_ids is a non-persistent buffer in transformers 5
    model.eval()

    ids, mask, types = _padded_batch(np.random.default_rng(0), 3, 11, TINY["vocab_size"])
    with torch.inference_mode():
        out = pt(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        )
    ours = jax.jit(lambda m, *a: m(*a))(
        model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)
    )
    ref = out.last_hidden_state.numpy()
    assert ours.shape == (3, 11, 32)
    # Real tokens and padded positions both match (HF computes padded queries too).
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    pooled = model.pooler(ours)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)


def _layer_and_hf_output(seed: int, attention_impl: str = "einsum"):
    """Layer 1 of a tiny BERT with HF's weights (eval mode), a padded input ``x [2, 7, 32]``,
    its mask and HF's layer output on it."""
    pt = _torch_bert(TINY)
    config = BertConfig.from_hf({**pt.config.to_dict(), "attention_impl": attention_impl})
    model = BertEncoder(config, rngs=nnx.Rngs(0))
    weights.load_from_state_dict(model, pt.state_dict(), weights.bert_name_map, "bert")
    layer: BertLayer = model.layers[1]
    layer.eval()
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 7, 32)).astype(np.float32)
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
    ext = (1.0 - torch.from_numpy(mask).float())[:, None, None, :] * torch.finfo(torch.float32).min
    with torch.inference_mode():
        ref = pt.encoder.layer[1](torch.from_numpy(x), attention_mask=ext)
    return layer, x, mask, (ref[0] if isinstance(ref, tuple) else ref).numpy()


def test_bert_layer_alone_matches_hf_layer():
    layer, x, mask, ref = _layer_and_hf_output(1)
    ours = layer(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention_impl", ["einsum", "fused"])
def test_bert_layer_on_chosen_positions_matches_hf_layer_there(attention_impl):
    """``queries [B, Q]`` computes the layer's output at those positions alone (each attending to
    every unmasked key): HF's full layer output gathered at the same positions."""
    layer, x, mask, ref = _layer_and_hf_output(2, attention_impl)
    queries = np.array([[0, 6, 3], [2, 2, 5]])  # any positions, repeated or padded ones too
    ours = layer(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(queries))
    assert ours.shape == (2, 3, 32)
    np.testing.assert_allclose(np.asarray(ours), np.take_along_axis(ref, queries[..., None], 1),
                               atol=1e-4, rtol=0)


def test_bfloat16_compute_keeps_float32_params():
    config = BertConfig(**TINY)
    model = BertEncoder(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    model.eval()
    ids, mask, _ = _padded_batch(np.random.default_rng(2), 2, 9, TINY["vocab_size"])
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    ref = BertEncoder(config, rngs=nnx.Rngs(0))
    ref.eval()
    diff = np.abs(
        np.asarray(out, np.float32) - np.asarray(ref(jnp.asarray(ids), jnp.asarray(mask)))
    )
    assert diff.max() < 0.1  # bf16 has ~3 significant digits; outputs are layer-normed (O(1))


def test_dropout_follows_train_eval_modes():
    model = BertEncoder(BertConfig(**TINY), rngs=nnx.Rngs(params=0, dropout=1))
    ids = jnp.ones((2, 5), jnp.int32)
    model.train()
    a, b = model(ids), model(ids)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))


def test_sequence_longer_than_positions_is_rejected():
    model = BertEncoder(BertConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        model(jnp.ones((1, 65), jnp.int32))


def test_minilm_l6_real_weights_parity():
    model, tokenizer, config = weights.load_text_encoder("minilm-l6")
    assert (config.hidden_size, config.num_hidden_layers) == (384, 6)
    folder = weights.resolve("minilm-l6")
    pt = transformers.BertModel.from_pretrained(str(folder), attn_implementation="eager").eval()
    texts = ["Rafael Nadal married Mery Perello in Mallorca.", "A short one."]
    enc = tokenizer(texts, padding=True, return_tensors="np")
    assert enc["input_ids"][0, 0] == tokenizer.cls_token_id == 101
    with torch.inference_mode():
        ref = pt(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
    ours = model(
        jnp.asarray(enc["input_ids"]),
        jnp.asarray(enc["attention_mask"]),
        jnp.asarray(enc["token_type_ids"]),
    )
    # Real weights have larger activations than the tiny random model; 1e-4 still holds.
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def _scatter_outputs(jaxpr) -> list:
    """The output avals of every scatter-add in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scatter-add":
            found += [v.aval for v in eqn.outvars]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _scatter_outputs(sub)
    return found


@pytest.mark.parametrize("with_types", [False, True])
def test_embedding_gradient_is_one_float32_scatter_under_bf16(with_types):
    # Under bf16 compute the gradients of gathers from bf16-cast tables were scatter-adds in
    # bf16, and the segment-type one added B*L rows into 2 (103 of 184 ms of a batch-256 H100
    # step). Now only the word table is scattered into, in float32.
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    emb = BertEmbeddings(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = jnp.zeros((4, 8), jnp.int32)
    types = jnp.ones((4, 8), jnp.int32) if with_types else None
    w = jax.random.normal(jax.random.key(0), (4, 8, 32))

    def loss(m):
        return jnp.sum(m(ids, types).astype(jnp.float32) * w)

    jaxpr = jax.make_jaxpr(nnx.grad(loss))(emb).jaxpr
    assert [(a.shape, a.dtype) for a in _scatter_outputs(jaxpr)] == [((100, 32), jnp.float32)]
    grads = nnx.grad(loss)(emb)
    # Every one of the 32 tokens is segment 1 (or 0 without types): its row gets the whole sum.
    row = 1 if with_types else 0
    g = np.asarray(grads.token_type_embeddings.embedding[...])
    assert np.all(g[1 - row] == 0) and np.all(np.abs(g[row]) > 0)
