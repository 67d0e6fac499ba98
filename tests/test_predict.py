"""roc_jax.load / roc_jax.predict on the tiny model trained on fixture data (predict.py in a new
process, against ``roc_jax.load(...).predict``, is in test_checkpoint_layout.py)."""

import numpy as np
import pytest

import roc_jax
from roc_jax import inference

SENTENCE = "[[Rafael Nadal]] and [[Mery Perello]] got married in a private ceremony"


@pytest.fixture(scope="module")
def workdir(trained):
    return trained[0]


@pytest.fixture(scope="module")
def loaded(workdir):
    return roc_jax.load(workdir)


def test_parse_marked():
    tokens, head, tail = inference.parse_marked("RT : [[Rafael Nadal]] gets engaged to [[Mery]] !")
    assert tokens == ["RT", ":", "Rafael", "Nadal", "gets", "engaged", "to", "Mery", "!"]
    assert head == (2, 4) and tail == (7, 8)
    with pytest.raises(ValueError, match="mark exactly two entities"):
        inference.parse_marked("[[only one]] here")


def test_load_restores_best_checkpoint_and_cache(loaded, trained_result):
    assert loaded.step == trained_result["best_step"]
    assert loaded.label_names == loaded.cache.names
    assert loaded.tokenizer is not None


def test_predict_marked_sentence_and_spans_agree(loaded):
    out = roc_jax.predict(loaded, SENTENCE, top_k=3)
    assert len(out) == 3
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True)
    assert all(r["relation"] in loaded.label_names for r in out)
    assert 0 < sum(r["probability"] for r in out) <= 1 + 1e-6
    for r in out:  # the nearest description is one of that relation's own texts
        assert r["description"] in loaded.cache.texts[loaded.label_names.index(r["relation"])]
        assert -1 - 1e-5 <= r["description_similarity"] <= 1 + 1e-5
    tokens, head, tail = inference.parse_marked(SENTENCE)
    by_span = loaded.predict(tokens, head=head, tail=tail, top_k=3)
    assert [r["relation"] for r in by_span] == [r["relation"] for r in out]
    np.testing.assert_allclose([r["score"] for r in by_span], scores, rtol=1e-6)
    all_rel = loaded.predict(SENTENCE, top_k=100)
    assert sorted(r["relation"] for r in all_rel) == sorted(loaded.label_names)
    assert sum(r["probability"] for r in all_rel) == pytest.approx(1.0, abs=1e-5)


def test_extra_descriptions_add_unseen_relations(loaded):
    extra = {"/per/per/rival": ["The head entity competes against the tail entity.",
                                "The two people are rivals in sport."]}
    out = loaded.predict(SENTENCE, top_k=100, extra_descriptions=extra)
    names = [r["relation"] for r in out]
    assert "/per/per/rival" in names and len(names) == len(loaded.label_names) + 1
    rival = out[names.index("/per/per/rival")]
    assert rival["description"] in extra["/per/per/rival"]
    with pytest.raises(Exception, match="already in the label set"):
        loaded.predict(SENTENCE, extra_descriptions={"None": ["nothing"]})


def test_bad_spans_are_rejected(loaded):
    with pytest.raises(ValueError, match="head span .* is outside the 3 tokens"):
        loaded.predict(["a", "b", "c"], head=(2, 5), tail=(0, 1))
