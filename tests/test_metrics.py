"""The field's metrics against hand-computed cases and a fake model with known scores."""

import json

import numpy as np
import pytest

from roc_jax import metrics

NAMES = ["None", "a", "b"]


def test_micro_prf_hand_computed():
    # gold:  N a a b b N ; pred: a a N b a N
    gold = np.array([0, 1, 1, 2, 2, 0])
    pred = np.array([1, 1, 0, 2, 1, 0])
    m = metrics.micro_prf(gold, pred, none_id=0)
    # correct non-None: idx 1 (a), idx 3 (b) -> 2; predicted non-None: 4; gold non-None: 4
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(0.5)
    # accuracy counts None too: idx 1, 3, 5 correct
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["num_examples"] == 6


def test_none_predictions_only_lower_recall():
    gold = np.array([1, 2, 0, 0])
    pred = np.array([1, 0, 0, 0])
    m = metrics.micro_prf(gold, pred, none_id=0)
    assert m["precision"] == 1.0
    assert m["recall"] == 0.5
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == 0.75


def test_empty_denominators_are_zero():
    m = metrics.micro_prf(np.array([0, 0]), np.array([0, 0]), none_id=0)
    assert (m["precision"], m["recall"], m["f1"], m["accuracy"]) == (0.0, 0.0, 0.0, 1.0)


def test_confusion_and_per_relation_report():
    gold = np.array([0, 1, 1, 2, 2, 0])
    pred = np.array([1, 1, 0, 2, 1, 0])
    cm = metrics.confusion_matrix(gold, pred, 3)
    np.testing.assert_array_equal(cm, [[1, 1, 0], [1, 1, 0], [0, 1, 1]])
    rep = {r["relation"]: r for r in metrics.per_relation_report(cm, NAMES)}
    assert rep["a"]["precision"] == pytest.approx(1 / 3)  # column a: 1 of 3 predictions right
    assert rep["a"]["recall"] == pytest.approx(1 / 2)
    assert rep["a"]["f1"] == pytest.approx(0.4)
    assert rep["b"] == {"relation": "b", "precision": 1.0, "recall": 0.5,
                        "f1": pytest.approx(2 / 3), "support": 2}


def test_bad_ids_are_rejected():
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 3\)"):
        metrics.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.micro_prf(np.array([0]), np.array([0, 1]), 0)


def test_fake_model_with_known_scores_and_padding(tmp_path):
    """Scores -> argmax -> metrics, with a padded last batch whose rows must not count."""
    scores = np.array([
        [0.1, 0.8, 0.1],  # -> a (gold a)
        [0.6, 0.3, 0.1],  # -> None (gold b)
        [0.2, 0.2, 0.6],  # -> b (gold b)
        [0.9, 0.0, 0.1],  # -> None (gold None)
    ])
    gold = np.array([1, 2, 2, 0])
    acc = metrics.Accumulator()
    acc.add(gold[:2], scores[:2].argmax(-1), np.array([True, True]))
    # second batch padded to 4 rows; the padding rows would be wrong predictions
    acc.add(np.array([2, 0, 1, 1]), np.array([2, 0, 0, 0]), np.array([True, True, False, False]))
    out = acc.result(NAMES)
    assert out["num_examples"] == 4
    assert out["precision"] == 1.0 and out["recall"] == pytest.approx(2 / 3)
    assert out["accuracy"] == 0.75
    assert out["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    text = metrics.format_report(out)
    assert "micro (without None): precision 1.0000  recall 0.6667" in text
    json.dumps(out)  # JSON-able
    png = metrics.plot_confusion(np.asarray(out["confusion"]), NAMES, tmp_path / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_set_without_none():
    out = metrics.evaluate(np.array([0, 1]), np.array([0, 0]), ["x", "y"])
    assert out["precision"] == 0.5 and out["recall"] == 0.5  # every label counts


def test_subset_prf_counts_only_the_named_relations():
    from roc_jax.metrics import confusion_matrix, micro_prf, subset_prf

    labels = np.array([0, 1, 1, 2, 2, 2, 3, 0])
    preds = np.array([1, 1, 2, 2, 0, 2, 1, 0])
    cm = confusion_matrix(labels, preds, 4)
    got = subset_prf(cm, [1])
    # relation 1: tp 1 (row 1 col 1), predicted 3 times, gold 2 times
    assert got == {"precision": pytest.approx(1 / 3), "recall": 0.5,
                   "f1": pytest.approx(0.4), "support": 2}
    # All relations but None (id 0): the field's micro P/R/F1.
    full = micro_prf(labels, preds, none_id=0)
    every = subset_prf(cm, [1, 2, 3])
    for k in ("precision", "recall", "f1"):
        assert every[k] == pytest.approx(full[k])
