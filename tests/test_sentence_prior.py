"""roc_jax.sentence_prior on the tiny model trained on fixture data."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from roc_testutil import REPO

import roc_jax
from roc_jax import sentence_prior
from roc_jax.data import sources
from roc_jax.models.scoring import relation_vectors


@pytest.fixture(scope="module")
def loaded(trained):
    return roc_jax.load(trained[0])


@pytest.fixture(scope="module")
def val(loaded):
    return sources.load_sources(loaded.config, ["val"])["val"]


def test_weight_zero_is_the_models_own_evaluation(loaded, val):
    labels, logits = sentence_prior.split_logits(loaded, val)
    assert logits.shape == (len(val), len(loaded.label_names))
    assert labels.tolist() == [int(val[i]["relation"]) for i in range(len(val))]
    swept = sentence_prior.sweep(loaded, val, (0.0, 1.0), unseen=loaded.label_names[1:3])
    reference = loaded.evaluate_split("val")
    assert swept["by_weight"]["0.0"]["all_f1"] == pytest.approx(100 * reference["f1"])
    assert swept["temperature"] == pytest.approx(float(loaded.model.temperature()))
    assert swept["selected_weight"] in (0.0, 1.0)
    assert swept["per_relation_f1"]["without_prior"] == {
        r["relation"]: pytest.approx(100 * r["f1"]) for r in reference["per_relation"]}
    assert swept["support"] == {r["relation"]: r["support"] for r in reference["per_relation"]}


class _Texts:
    """A source of records whose tokens are given texts, split on spaces."""

    def __init__(self, texts):
        self.texts = texts

    def __len__(self):
        return len(self.texts)

    def text_example(self, i):
        return {"tokens": self.texts[i].split(" ")}


def test_a_description_read_as_a_sentence_lands_where_the_cache_put_it(loaded):
    cache = loaded.cache
    r = 1  # its first description: the cache embedded it with the same frozen encoder
    text = cache.texts[r][0]
    cos = sentence_prior.sentence_cosines(loaded, _Texts([text]))
    emb = cache.embeddings[r, 0] / np.linalg.norm(cache.embeddings[r, 0])
    expected = np.asarray(relation_vectors(cache.embeddings, cache.mask)) @ emb
    np.testing.assert_allclose(cos[0], expected, atol=1e-4)


def test_the_prior_adds_weighted_cosines_to_the_logits():
    logits = np.array([[1.0, 2.0]])
    cos = np.array([[0.5, -0.5]])
    np.testing.assert_allclose(sentence_prior.with_prior(logits, cos, 4.0), [[3.0, 0.0]])


def test_the_offset_goes_to_the_unseen_relations_alone():
    logits = np.zeros((1, 3))
    cos = np.array([[0.5, 0.0, 0.25]])
    unseen = np.array([False, True, False])
    np.testing.assert_allclose(sentence_prior.with_prior(logits, cos, 2.0, 0.4, unseen),
                               [[1.0, 0.4, 0.5]])


def test_a_large_offset_predicts_only_unseen_relations(loaded, val):
    unseen = loaded.label_names[1:3]
    swept = sentence_prior.sweep(loaded, val, (0.0, 1.0), unseen, offsets=(0.0, 1e3))
    assert swept["by_offset"]["0.0"] == swept["by_weight"]
    for row in swept["by_offset"]["1000.0"].values():
        assert row["seen_f1"] == 0.0  # no seen relation (and no None) is predicted any more
    assert swept["offset_only"] == {"weight": 0.0, "offset": swept["offset_only"]["offset"],
                                    **swept["by_offset"][str(swept["offset_only"]["offset"])]["0.0"]}
    chosen = swept["calibrated"]
    assert swept["by_offset"][str(chosen["offset"])][str(chosen["weight"])]["all_f1"] == max(
        row["all_f1"] for grid in swept["by_offset"].values() for row in grid.values())


def _run(seed, best):
    """A run whose all-relations F1 is 1 at (weight, offset) ``best`` and 0 elsewhere."""
    grid = {str(b): {str(w): {"all_f1": float((w, b) == best), "unseen_f1": 10.0 * seed,
                              "seen_f1": 0.0} for w in (0.0, 1.0)} for b in (0.0, 0.5)}
    return {"kind": "zero_shot", "seed": seed, "by_weight": grid["0.0"], "by_offset": grid}


def test_held_out_choice_comes_from_the_other_seeds():
    runs = [_run(0, (1.0, 0.5)), _run(1, (0.0, 0.5)), _run(2, (0.0, 0.5))]
    picks = sentence_prior.held_out(runs)
    assert [(p["weight"], p["offset"]) for p in picks] == [(0.0, 0.5), (0.0, 0.5), (0.0, 0.5)]
    assert [p["all_f1"] for p in picks] == [0.0, 1.0, 1.0]  # seed 0's own best is not used
    assert [p["unseen_f1"] for p in picks] == [0.0, 10.0, 20.0]


def test_summary_of_runs_without_offsets_holds_the_held_out_weight():
    runs = []
    for seed, best in enumerate((1.0, 1.0, 0.0)):
        grid = {"0.0": {str(w): {"all_f1": float(w == best), "unseen_f1": 0.0, "seen_f1": 1.0 + seed}
                        for w in (0.0, 1.0)}}
        runs.append({"kind": "full", "seed": seed, "by_weight": grid["0.0"], "by_offset": grid,
                     "selected_weight": best, "selected": grid["0.0"][str(best)],
                     "without_prior": grid["0.0"]["0.0"]})
    summary = sentence_prior.summarize(runs)["full"]
    assert summary["held_out_weights_offsets"] == [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]
    assert summary["all_f1_held_out"] == pytest.approx(0.0)  # each seed's own best is never used
    assert summary["all_f1_selected"] == 1.0 and "calibrated_weights_offsets" not in summary


def test_relations_at_zero_need_the_support_and_one_seed_at_zero():
    support = {"None": 50, "a": 5, "b": 5, "c": 4}
    runs = [{"support": support, "per_relation_f1": {"selected": {"None": 0.0, "a": a, "b": 10.0,
                                                                   "c": 0.0}}} for a in (0.0, 20.0)]
    assert sentence_prior.relations_at_zero(runs) == {"relations_at_zero_selected": ["a"]}


def test_evaluate_applies_the_rule_the_sweep_measured(loaded, val):
    swept = sentence_prior.sweep(loaded, val, (0.0, 2.0), unseen=loaded.label_names[1:3])
    plain = sentence_prior.evaluate(loaded, val, 0.0)
    assert plain["f1"] == loaded.evaluate_split("val")["f1"]
    ruled = sentence_prior.evaluate(loaded, val, 2.0)
    assert 100 * ruled["f1"] == pytest.approx(swept["by_weight"]["2.0"]["all_f1"])
    assert ruled["rule"] == {"prior_weight": 2.0, "unseen_offset": 0.0, "unseen_relations": []}
    with pytest.raises(ValueError, match="data.unseen_relations"):
        sentence_prior.evaluate(loaded, val, 0.0, offset=1.0)  # this run saw every relation


def test_eval_cli_with_the_prior(trained, loaded, val, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), f"--workdir={trained[0]}",
                           "--prior_weight=2", f"--output_dir={tmp_path / 'eval'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "eval_prior_w2_b0" / "metrics_val.json").read_text())
    assert got["f1"] == pytest.approx(sentence_prior.evaluate(loaded, val, 2.0)["f1"])
    assert got["rule"]["prior_weight"] == 2.0
