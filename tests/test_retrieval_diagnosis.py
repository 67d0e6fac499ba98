"""benchmarks/retrieval_diagnosis.py's measurements: the error counts of a confusion matrix, the
temperature sweep (which must reproduce the retrieval head's own scores) and relation crowding."""

from __future__ import annotations

import importlib.util
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from roc_testutil import REPO

from roc_jax.labels.cache import relation_scores

sys.path.insert(0, str(REPO / "benchmarks"))
_spec = importlib.util.spec_from_file_location("retrieval_diagnosis",
                                               REPO / "benchmarks" / "retrieval_diagnosis.py")
rd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)


def test_error_structure_splits_the_errors_by_kind():
    names = ["None", "a", "b"]
    # rows gold, columns predicted
    cm = np.array([[50, 3, 2],   # None: 5 predicted as a relation
                   [4, 10, 1],   # a: 4 predicted None, 1 predicted b
                   [6, 2, 7]])   # b: 6 predicted None, 2 predicted a
    assert rd.error_structure(cm, names) == {
        "gold_relation_predicted_none": 10, "none_predicted_as_relation": 5,
        "relation_predicted_as_other_relation": 3, "correct_relation": 17,
        "gold_relations": 30}


@pytest.mark.parametrize("mode,with_bias", [("mean", False), ("lse", False), ("mean", True)])
def test_temperature_sweep_reproduces_the_heads_cross_entropy(mode, with_bias):
    rng = np.random.default_rng(0)
    n, r, k, p = 40, 5, 3, 8
    pair = rng.normal(size=(n, p))
    pair /= np.linalg.norm(pair, axis=1, keepdims=True)
    desc = rng.normal(size=(r, k, p))
    desc /= np.linalg.norm(desc, axis=-1, keepdims=True)
    mask = np.ones((r, k), bool)
    mask[2, 1:] = False  # a relation with one description
    labels = rng.integers(0, r, n)
    sims, m = rd.prototype_cosines(pair, desc, mask, mode)
    bias = rng.normal(size=r) if with_bias else None  # model.relation_bias, added to the scores
    sweep = rd.temperature_sweep(sims, m, labels, (0.05, 0.1, 0.5), bias)
    for t in (0.05, 0.1, 0.5):
        logits = np.asarray(relation_scores(jnp.asarray(pair), jnp.asarray(desc),
                                            jnp.asarray(mask), mode, t), np.float64)
        logits = logits + (bias if with_bias else 0.0)
        assert sweep["cross_entropy"][f"{t:g}"] == pytest.approx(
            rd.cross_entropy(logits, labels), abs=1e-4)
    ce = sweep["cross_entropy"]
    assert sweep["best_temperature"] == float(min(ce, key=ce.get))


def test_temperature_sweep_finds_the_sharpest_temperature_for_separable_pairs():
    # Every pair vector is its relation's description: a lower temperature always lowers the loss.
    desc = np.eye(4)[:, None, :]
    sims, m = rd.prototype_cosines(np.eye(4), desc, np.ones((4, 1), bool), "mean")
    assert rd.temperature_sweep(sims, m, np.arange(4), (0.05, 0.5, 1.0))["best_temperature"] == 0.05


def test_relation_crowding_reports_the_most_similar_pair():
    v = np.array([[[1.0, 0.0, 0.0]], [[0.9, 0.1, 0.0]], [[0.0, 0.0, 1.0]]])
    out = rd.relation_crowding(v, np.ones((3, 1), bool), ["x", "y", "z"], top=1)
    assert out["most_similar_pairs"][0][:2] == ["x", "y"]
    assert out["max_offdiagonal_cosine"] == pytest.approx(0.9 / np.hypot(0.9, 0.1))
    assert out["mean_offdiagonal_cosine"] == pytest.approx(out["max_offdiagonal_cosine"] / 3)


def test_none_threshold_sweep_trades_none_for_the_best_relation():
    none = 0
    labels = np.array([1, 2, 0, 0])
    # Each gold relation is the runner-up behind None; the None rows are confident.
    logits = np.log(np.array([[0.55, 0.40, 0.05],
                              [0.60, 0.05, 0.35],
                              [0.95, 0.03, 0.02],
                              [0.90, 0.05, 0.05]]))
    out = rd.none_threshold_sweep(logits, labels, none, (0.5, 0.7))
    assert out["f1"]["argmax"] == 0.0  # argmax predicts None everywhere
    assert out["f1"]["0.5"] == 0.0
    assert out["f1"]["0.7"] == 100.0  # None only at >= 0.7: both relations recovered
    assert out["best_threshold"] == 0.7 and out["best_f1"] == 100.0
