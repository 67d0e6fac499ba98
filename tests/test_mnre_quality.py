"""benchmarks/mnre_quality.py's bookkeeping: the ablation description files, the selection of the
best dev evaluation, and the summary over seeds (the training runs themselves are the benchmark)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
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
        **mq.ONE_WAY, "data.descriptions": files["label_names"]}


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


def test_run_folders_are_flat_and_curves_follow_the_steps(tmp_path):
    sets = {"train.lr_encoder": "5e-5", "model.text_encoder": ".gpucarry/minilm16"}
    assert mq.run_dirname("roc", 1, 6, sets) == \
        "roc_s1_e6_text_encoder.gpucarry-minilm16_lr_encoder5e-5"
    (tmp_path / "dev_metrics").mkdir()
    for step, f1 in ((764, 0.55), (382, 0.41)):
        (tmp_path / "dev_metrics" / f"step_{step}.json").write_text(json.dumps(_report(step, f1)))
    curve = mq.dev_curve(tmp_path)
    assert list(curve) == ["382", "764"]
    assert list(curve.values()) == pytest.approx([41.0, 55.0])


def test_parallel_jobs_record_every_finished_run_and_count_the_failed(tmp_path, monkeypatch):
    import subprocess
    import threading
    import time

    (tmp_path / "mnre_train.txt").write_text("")
    running, peak, lock = [0], [0], threading.Lock()

    def fake_run_one(setting, seed, epochs, sets, args, files):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        if setting == "cls":
            raise subprocess.CalledProcessError(1, ["train.py"])
        return {"setting": setting, "seed": seed, "epochs": epochs, "sets": sets,
                "train_time_s": 1.0, "concurrent_jobs": args.jobs,
                "val": {"f1": 50.0 + seed, "precision": 60.0, "recall": 40.0, "accuracy": 70.0}}

    prebuilt = []
    monkeypatch.setattr(mq, "run_one", fake_run_one)
    monkeypatch.setattr(mq, "prebuild_tfds", lambda args, sets: prebuilt.append(sets))
    monkeypatch.setattr(mq, "machine", lambda: {"cpu_count": 2})
    results = tmp_path / "results.json"
    monkeypatch.setattr(sys, "argv", [
        "mnre_quality.py", "--data_dir", str(tmp_path), "--workroot", str(tmp_path / "work"),
        "--runs", "roc:0,roc:1,cls:0", "--epochs", "6", "--jobs", "3",
        "--set", "train.lr_encoder=5e-5", "--results", str(results)])
    with pytest.raises(SystemExit, match="1 of 3 runs failed"):
        mq.main()
    assert peak[0] == 3  # the three runs overlapped
    assert prebuilt == [{"train.lr_encoder": "5e-5"}]  # built once, before the runs
    written = json.loads(results.read_text())
    assert sorted((e["setting"], e["seed"]) for e in written["runs"]) == [("roc", 0), ("roc", 1)]
    assert written["summary"]["roc_val_f1_mean"] == pytest.approx(50.5)
    assert all(e["concurrent_jobs"] == 3 for e in written["runs"])


def test_merge_adds_only_the_missing_entries(tmp_path):
    def entry(setting, seed, f1):
        return {"setting": setting, "seed": seed, "epochs": 6, "sets": {}, "val": {"f1": f1}}

    main, other = tmp_path / "main.json", tmp_path / "gpu.json"
    mq.write_results([entry("roc", 0, 50.0)], main)
    mq.write_results([entry("roc", 0, 99.0), entry("cls", 0, 52.0)], other)
    mq.merge_results(other, main)  # roc seed 0 is there: the other file's 99.0 is not taken
    merged = json.loads(main.read_text())
    assert sorted((e["setting"], e["val"]["f1"]) for e in merged["runs"]) == [
        ("cls", 52.0), ("roc", 50.0)]
    assert merged["summary"]["cls_val_f1_mean"] == 52.0


def test_summary_reports_the_default_roc_setting_where_a_budget_has_it():
    def entry(setting, seed, f1, epochs=1):
        return {"setting": setting, "seed": seed, "epochs": epochs, "sets": {}, "val": {"f1": f1}}

    entries = [*(entry("roc", i, 50.0 + i) for i in range(3)),
               *(entry(mq.DEFAULT_ROC, i, 53.0 + i) for i in range(3)),
               *(entry("cls", i, 51.0 + i) for i in range(3)),
               *(entry("cls_symmetric", i, 52.0 + 2 * i) for i in range(3)),
               *(entry(s, i, 60.0, epochs=6) for s in ("roc", "cls") for i in range(3))]
    s = mq.summarize(entries)
    # cls_* stays the plain softmax head; the same head with the default's loss is reported apart
    assert s["cls_val_f1_mean"] == pytest.approx(52.0)
    assert (s["cls_same_loss_val_f1_mean"], s["cls_same_loss_val_f1_std"],
            s["cls_same_loss_seeds"]) == pytest.approx((54.0, 2.0, 3))
    assert "cls_same_loss_seeds" not in s["budgets"]["e6"]
    # the budget with the default setting is the headline, even with a lower ROC mean
    assert s["headline_budget"] == "e1" and s["roc_setting"] == mq.DEFAULT_ROC
    assert s["roc_val_f1_mean"] == pytest.approx(54.0) and s["roc_minus_cls"] == pytest.approx(2)
    assert s["budgets"]["e6"]["roc_setting"] == "roc"
    assert s["vs_cls"]["roc"]["mean"] == pytest.approx(51.0)


def test_protocols_name_their_budgets_and_get_their_own_summaries():
    names = ["None", *mq.UNSEEN_RELATIONS, "/per/per/peer", "/per/org/member_of"]
    r = len(names)

    def confusion(correct_unseen, correct_seen):
        cm = np.zeros((r, r), int)
        cm[0, 0] = 50
        for i in range(1, 6):  # each unseen relation: 4 val samples
            cm[i, i], cm[i, 0] = correct_unseen, 4 - correct_unseen
        for i in (6, 7):  # each seen relation: 10 val samples
            cm[i, i], cm[i, 0] = correct_seen, 10 - correct_seen
        return cm.tolist()

    def entry(setting, seed, f1, protocol, cm=None):
        e = {"setting": setting, "seed": seed, "epochs": 1, "val": {"f1": f1},
             "sets": {**mq.PROTOCOLS[protocol], "train.lr_encoder": "5e-5"}}
        if cm is not None:
            e.update(val_confusion=cm, label_names=names)
        return e

    entries = [entry("roc", 0, 60.0, "full", confusion(4, 8)),
               entry("cls", 0, 58.0, "full"),
               entry("roc", 0, 40.0, "low_resource"), entry("roc", 1, 42.0, "low_resource"),
               entry("cls", 0, 30.0, "low_resource"), entry("cls", 1, 34.0, "low_resource"),
               entry("roc", 0, 45.0, "zero_shot", confusion(2, 7))]
    assert [mq.protocol_of(e["sets"]) for e in entries] == [
        "full", "full", *["low_resource"] * 4, "zero_shot"]
    s = mq.summarize(entries)
    assert s["headline_budget"] == "e1 train.lr_encoder=5e-5"  # full data only
    assert s["best_val_f1"] == 60.0
    low = s["low_resource"]
    assert low["fraction"] == 0.1 and low["roc_val_f1_mean"] == pytest.approx(41.0)
    assert low["cls_val_f1_mean"] == pytest.approx(32.0)
    zero = s["zero_shot"]
    assert zero["unseen_relations"] == list(mq.UNSEEN_RELATIONS)
    assert zero["unseen_val_samples"] == 20
    assert zero["unseen_f1"] == pytest.approx(100 * 2 * 0.5 / 1.5)  # P 1, R 0.5
    assert zero["seen_f1"] == pytest.approx(100 * 2 * 0.7 / 1.7)
    assert zero["seen_f1_all_relations"] == pytest.approx(100 * 2 * 0.8 / 1.8)
