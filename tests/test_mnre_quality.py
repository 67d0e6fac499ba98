"""benchmarks/mnre_quality.py's bookkeeping: the ablation description files, the selection of the
best dev evaluation, and the summary over seeds (the training runs themselves are the benchmark)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from roc_testutil import REPO

from roc_jax.labels import descriptions as desc_lib

sys.path.insert(0, str(REPO / "benchmarks"))  # mnre_quality imports its sibling benchlib
_spec = importlib.util.spec_from_file_location("mnre_quality",
                                               REPO / "benchmarks" / "mnre_quality.py")
mq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mq)


def test_ablation_description_files_have_one_valid_description_per_relation(tmp_path):
    files = mq.write_ablation_descriptions(tmp_path)
    shipped = desc_lib.load_descriptions()
    names = list(shipped)
    label_texts = desc_lib.load_descriptions(files["label_names"], names)
    first = desc_lib.load_descriptions(files["one_description"], names)
    assert label_texts["/per/per/couple"] == ["per per couple"]
    assert label_texts["None"] == ["None"]
    for name in names:
        assert first[name] == shipped[name][:1]
    assert mq.overrides_of("roc_label_names", files) == {
        "data.descriptions": files["label_names"]}


def _report(step, f1):
    return {"step": step, "f1": f1, "precision": f1, "recall": f1, "accuracy": 0.5,
            "per_relation": []}


def test_best_dev_is_the_highest_f1_evaluation(tmp_path):
    (tmp_path / "dev_metrics").mkdir()
    for step, f1 in ((382, 0.41), (764, 0.55), (1146, 0.52)):
        (tmp_path / "dev_metrics" / f"step_{step}.json").write_text(json.dumps(_report(step, f1)))
    assert mq.best_dev(tmp_path)["step"] == 764
    with pytest.raises(RuntimeError, match="no dev_metrics"):
        mq.best_dev(tmp_path / "missing")


def test_summary_means_stds_and_the_spread_check_per_budget():
    def entry(setting, seed, f1, sets=None):
        return {"setting": setting, "seed": seed, "epochs": 1, "sets": sets or {},
                "val": {"f1": f1}}

    entries = [entry("roc", 0, 60.0), entry("roc", 1, 62.0), entry("roc", 2, 61.0),
               entry("cls", 0, 55.0), entry("cls", 1, 57.0), entry("cls", 2, 56.0),
               entry("roc_untyped", 0, 63.0),
               entry("roc", 0, 70.0, {"train.lr_encoder": "5e-5"})]
    s = mq.summarize(entries)
    # the headline is the budget with 3 + 3 seeds, not the single higher-scoring run
    assert s["headline_budget"] == "e1"
    assert s["roc_val_f1_mean"] == pytest.approx(61.0)
    assert s["roc_val_f1_std"] == pytest.approx(1.0)
    assert s["cls_val_f1_mean"] == pytest.approx(56.0)
    assert s["roc_beats_cls_beyond_spread"] is True
    assert s["best_val_f1"] == 70.0
    assert s["best_run"] == "roc seed 0 (e1 train.lr_encoder=5e-5)"
    assert s["budgets"]["e1 train.lr_encoder=5e-5"]["roc_seeds"] == 1
    # one seed: no standard deviation, and no claim about the spread
    single = mq.summarize(entries[:1] + entries[3:4])
    assert single["roc_val_f1_std"] is None and "roc_beats_cls_beyond_spread" not in single
    assert single["roc_minus_cls"] == pytest.approx(5.0)


def test_set_overrides_parse_and_name_the_budget():
    sets = mq.parse_sets(["train.lr_encoder=5e-5", "train.lr_head=1e-3"])
    assert sets == {"train.lr_encoder": "5e-5", "train.lr_head": "1e-3"}
    assert mq.budget_id(2, sets) == "e2 train.lr_encoder=5e-5 train.lr_head=1e-3"
    with pytest.raises(SystemExit, match="key=value"):
        mq.parse_sets(["train.lr_encoder"])


def test_markdown_table_rows_per_budget_and_setting():
    def entry(setting, seed, f1, sets=None):
        return {"setting": setting, "seed": seed, "epochs": 1, "sets": sets or {},
                "train_time_s": 600.0,
                "val": {"f1": f1, "precision": 70.0, "recall": 40.0, "accuracy": 75.0}}

    table = mq.markdown_table({"runs": [entry("roc", 0, 60.0), entry("roc", 1, 62.0),
                                        entry("cls", 0, 55.0)]}).splitlines()
    assert table[2] == "| e1 | roc | 2 | 61.00 | 1.41 | 70.00 | 40.00 | 75.00 | 10.0 min |"
    assert table[3] == "| e1 | cls | 1 | 55.00 | - | 70.00 | 40.00 | 75.00 | 10.0 min |"
