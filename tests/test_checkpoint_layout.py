"""The checkpoint's items: eval and predict read the parameters only, never the optimizer state;
a checkpoint of format 1 (the whole train state in one ``state`` item) still loads. The eval.py and
predict.py processes here are the suite's end-to-end runs of those two commands.

The workdirs are copies of the session's ``trained`` run (conftest.py), damaged or rewritten in
``tmp_path``; the reference is ``roc_jax.load`` of the untouched run.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from roc_testutil import REPO, metrics_rows

import roc_jax
from roc_jax import checkpoint as ckpt
from roc_jax import train_lib
from roc_jax.labels import cache as cache_lib

SENTENCE = "[[Rafael Nadal]] and [[Mery Perello]] got married in a private ceremony"
METRIC_KEYS = ("precision", "recall", "f1", "accuracy", "num_examples", "per_relation")


@pytest.fixture(scope="module")
def reference(trained):
    """Val metrics and a prediction of the untouched trained run."""
    loaded = roc_jax.load(trained[0])
    return {"step": loaded.step, "val": loaded.evaluate_split("val"),
            "predict": loaded.predict(SENTENCE, top_k=3)}


@pytest.fixture(scope="module")
def without_optimizer(trained, tmp_path_factory):
    """A copy of the trained run with the ``opt_state`` item of every step deleted."""
    workdir = tmp_path_factory.mktemp("no_opt") / "run"
    shutil.copytree(trained[0], workdir)
    steps = sorted(p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps
    for step in steps:
        shutil.rmtree(step / "opt_state")
    return workdir


def _same_metrics(got, want):
    """Equal metrics (the JSON file's or ``evaluate_split``'s), the confusion matrix included."""
    np.testing.assert_array_equal(np.asarray(got["confusion"]), np.asarray(want["confusion"]))
    for key in METRIC_KEYS:
        assert got[key] == want[key], key


def _run(script, *args, cwd):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


def test_eval_and_predict_cli_without_optimizer_state(without_optimizer, reference, trained,
                                                      trained_result, tmp_path):
    """eval.py and predict.py in new processes, on the trained run without its optimizer state:
    the best checkpoint's metrics, identical to the training loop's dev metrics of that step and
    to ``roc_jax.load``'s; predict.py's JSON ranks as ``roc_jax.load(...).predict`` does."""
    proc = _run("eval.py", f"--workdir={without_optimizer}", "--checkpoint=best",
                f"--output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "metrics_val.json").read_text())
    best = trained_result["best_step"]
    assert got["step"] == reference["step"] == best
    _same_metrics(got, reference["val"])
    dev = {r["step"]: r for r in metrics_rows(trained[0]) if "dev/f1" in r}
    for key in ("precision", "recall", "f1", "accuracy"):
        assert got[key] == dev[best][f"dev/{key}"], key  # identical, not merely close
    assert got["num_examples"] == 16  # every val sample once, padding excluded
    assert (tmp_path / "confusion_val.png").stat().st_size > 0
    assert "micro (without None)" in proc.stdout
    proc = _run("predict.py", f"--workdir={without_optimizer}", f"--text={SENTENCE}",
                "--top_k=3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("["):])
    assert [r["relation"] for r in out] == [r["relation"] for r in reference["predict"]]
    np.testing.assert_allclose([r["score"] for r in out],
                               [r["score"] for r in reference["predict"]], rtol=1e-5)


def test_load_builds_no_optimizer(without_optimizer, reference, monkeypatch):
    def no_optimizer(*args, **kwargs):
        raise AssertionError("the inference path built an optimizer")

    monkeypatch.setattr(train_lib, "make_optimizer", no_optimizer)
    monkeypatch.setattr(train_lib, "make_trainer", no_optimizer)
    monkeypatch.setattr(optax, "adamw", no_optimizer)
    loaded = roc_jax.load(without_optimizer)
    assert set(loaded.exp.state) == {"params"} and loaded.exp.trainer.tx is None
    _same_metrics(loaded.evaluate_split("val"), reference["val"])
    assert [r["relation"] for r in loaded.predict(SENTENCE, top_k=3)] == \
        [r["relation"] for r in reference["predict"]]


def test_resume_without_optimizer_state_is_one_error(trained, without_optimizer):
    _, config = trained
    with pytest.raises(ckpt.CheckpointError) as info:
        train_lib.train_and_evaluate(config, without_optimizer)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("checkpoint step 4 has no optimizer state "
                              f"({without_optimizer}/checkpoints/4/opt_state is missing)")
    assert "cannot resume training" in message
    assert not (without_optimizer / "unreadable_checkpoints").exists()  # no damage: kept


def _write_old_layout(source, config, workdir, step):
    """``step`` of the run ``source`` rewritten as format 1 wrote it: the train state (restored
    with its optax structure) as one StandardSave item ``state``, next to ``labels``, ``data``
    and ``meta``; returns that state."""
    state = train_lib.setup(config, source, restore=step, total_steps=4).state
    reader = ckpt.make_manager(source, read_only=True)
    try:
        restored = reader.restore(step, args=ocp.args.Composite(
            labels=cache_lib.restore_args(), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
    finally:
        reader.close()
    meta = {**restored["meta"], "format_version": 1,
            "state_checksums": ckpt.state_checksums(state)}
    options = ocp.CheckpointManagerOptions(best_fn=lambda m: m[ckpt.BEST_METRIC], best_mode="max",
                                           enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=options,
                                    item_names=("state", "labels", "data", "meta"))
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        labels=cache_lib.save_args(cache_lib.from_restored(restored["labels"])),
        data=ocp.args.JsonSave(restored["data"]), meta=ocp.args.JsonSave(meta)),
        metrics={ckpt.BEST_METRIC: 1.0}, force=True)
    manager.wait_until_finished()
    manager.close()
    items = {p.name for p in (workdir / "checkpoints" / str(step)).iterdir() if p.is_dir()}
    assert items == {"state", "labels", "data", "meta", "metrics"}  # metrics: orbax's own
    return state


def test_old_layout_evaluates_and_resumes(trained, reference, tmp_path, monkeypatch):
    source, config = trained
    step = reference["step"]
    workdir = tmp_path / "old"
    state = jax.device_get(_write_old_layout(source, config, workdir, step))
    with monkeypatch.context() as mp:
        mp.setattr(train_lib, "make_optimizer", lambda *a, **k: pytest.fail("optimizer built"))
        loaded = roc_jax.load(workdir)
        assert loaded.step == step
        _same_metrics(loaded.evaluate_split("val"), reference["val"])
    # Training resumes from it: the whole state restores, bitwise.
    exp = train_lib.setup(config, workdir, total_steps=4)
    assert exp.restored["step"] == step
    got = jax.tree_util.tree_leaves_with_path(jax.device_get(exp.state))
    want = jax.tree_util.tree_leaves_with_path(state)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))
