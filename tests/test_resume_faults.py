"""Training that meets faults: a corrupted latest checkpoint, SIGTERM mid-epoch, a save that fails.

Each case ends with the same parameters as the uninterrupted reference run (the tiny text config,
4 steps, the session's ``trained`` fixture of conftest.py), bitwise.
"""

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from roc_testutil import REPO, assert_same_state, read_state, tiny_config

from roc_jax import checkpoint as ckpt
from roc_jax import inference, train_lib
from roc_jax.data import sources


def corrupt_state(workdir, step, where="header"):
    """Damages ``step``'s parameters (its ``params`` item): ``'header'`` flips the first 8 bytes
    of every data chunk (tensorstore fails to decode them: "ZSTD_decompressStream() failed"),
    ``'body'`` 64 bytes in the middle of the largest chunk (which may decode, to other numbers)."""
    chunks = [p for p in (workdir / "checkpoints" / str(step) / "params").rglob("d/*")
              if p.is_file()]
    if where == "body":
        chunks = [max(chunks, key=lambda p: p.stat().st_size)]
    for chunk in chunks:
        data = bytearray(chunk.read_bytes())
        start = 0 if where == "header" else len(data) // 2
        end = start + (8 if where == "header" else 64)
        data[start:end] = bytes(b ^ 0xFF for b in data[start:end])
        chunk.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def corrupted(trained, tmp_path_factory):
    """A run stopped at step 3 (checkpoints 2 and 3 kept), step 3's state corrupted."""
    _, config = trained
    workdir = tmp_path_factory.mktemp("corrupted") / "run"
    stopped = tiny_config(Path(config.data.raw_dir), max_steps=3, checkpoint_every=1)
    assert train_lib.train_and_evaluate(stopped, workdir)["step"] == 3
    assert sorted(ckpt.make_manager(workdir, read_only=True).all_steps()) == [2, 3]
    corrupt_state(workdir, 3)
    return workdir


def test_corrupted_latest_resumes_from_the_previous_one(trained, corrupted, tmp_path, caplog):
    ref_dir, config = trained
    workdir = tmp_path / "run"
    shutil.copytree(corrupted, workdir)
    with caplog.at_level(logging.WARNING, logger="roc_jax"):
        result = train_lib.train_and_evaluate(tiny_config(Path(config.data.raw_dir)), workdir)
    assert result["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"checkpoint step 3 cannot be read: {workdir}/checkpoints/3/"
                                  "params (")
    assert f"{workdir}/checkpoints/3/params (ValueError: " in warnings[0]  # the error, named
    assert warnings[0].endswith(f"resuming from step 2 instead (step 3 moved to "
                                f"{workdir}/unreadable_checkpoints/3)")
    assert (workdir / "unreadable_checkpoints" / "3" / "params").is_dir()
    assert_same_state(ref_dir, workdir, 4)


def test_load_of_a_corrupted_checkpoint_is_one_line(corrupted):
    with pytest.raises(ckpt.UnreadableCheckpoint) as info:
        inference.load(corrupted, checkpoint="latest")
    message = str(info.value)
    assert "\n" not in message and len(message) < 700
    assert message.startswith(f"checkpoint step 3 cannot be read: {corrupted}/checkpoints/3/"
                              "params (ValueError: ")
    assert message.endswith("; saved steps: [2, 3]")
    # Another step still loads, reading the parameters only.
    loaded = inference.load(corrupted, checkpoint=2)
    assert loaded.step == 2
    np.testing.assert_array_equal(
        np.asarray(jax.tree.leaves(loaded.params)[0]),
        np.asarray(jax.tree.leaves(read_state(corrupted, 2)["params"])[0]))


def test_damage_that_decodes_is_caught_by_the_checksums(corrupted, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(corrupted, workdir)
    corrupt_state(workdir, 2, where="body")
    with pytest.raises(ckpt.UnreadableCheckpoint,
                       match=r"^checkpoint step 2 cannot be read: .*/checkpoints/2/params \(the "
                             r"data of \['.*'\].* differs from the checksum recorded when it was "
                             r"saved: the files are damaged\); saved steps: \[2, 3\]$"):
        inference.load(workdir, checkpoint=2)


def test_params_only_restore_skips_the_optimizer(corrupted, tmp_path):
    from roc_jax import parallel
    from roc_jax.labels import cache as cache_lib

    workdir = tmp_path / "run"
    shutil.copytree(corrupted, workdir)
    saved = read_state(workdir, 2)
    shutil.rmtree(workdir / "checkpoints" / "2" / "opt_state")
    rep = parallel.replicated(parallel.make_mesh())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=rep), saved)
    manager = ckpt.make_manager(workdir, read_only=True)
    got = ckpt.restore(manager, 2, abstract_state={"params": abstract["params"]},
                       labels_restore_args=cache_lib.restore_args(), with_data=False)
    assert set(got["state"]) == {"params"} and set(got) == {"state", "labels", "meta"}
    for a, b in zip(jax.tree.leaves(got["state"]), jax.tree.leaves(saved["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    with pytest.raises(ckpt.CheckpointError,
                       match=r"^checkpoint step 2 has no optimizer state \(.*/2/opt_state is "
                             r"missing\): it evaluates .* but cannot resume training"):
        ckpt.restore(manager, 2, abstract_state=abstract,
                     labels_restore_args=cache_lib.restore_args())


def test_eval_cli_on_a_corrupted_checkpoint_prints_one_line(corrupted, tmp_path):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), f"--workdir={corrupted}", "--checkpoint=latest",
         f"--output_dir={tmp_path}"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint step 3 cannot be read: {corrupted}/checkpoints/3/"
                           "params (")
    assert last.endswith("saved steps: [2, 3]; choose one with --checkpoint N")


class _SigtermAt:
    """Wraps ``make_trainer`` so that the process receives SIGTERM during step ``at``."""

    def __init__(self, monkeypatch, at):
        real = train_lib.make_trainer
        self.calls = 0

        def make_trainer(*args, **kwargs):
            trainer, state = real(*args, **kwargs)
            step_fn = trainer.train_step

            def train_step(*a):
                self.calls += 1
                if self.calls == at:
                    signal.raise_signal(signal.SIGTERM)
                return step_fn(*a)

            trainer.train_step = train_step
            return trainer, state

        monkeypatch.setattr(train_lib, "make_trainer", make_trainer)


def test_sigterm_mid_epoch_saves_and_a_restart_ends_like_an_uninterrupted_run(
        trained, tmp_path, monkeypatch):
    ref_dir, config = trained
    workdir = tmp_path / "run"
    with monkeypatch.context() as mp:
        _SigtermAt(mp, at=3)  # step 3 of 4: the middle of the second epoch (2 steps each)
        with pytest.raises(train_lib.Preempted, match=r"stopped by SIGTERM at step 3 of 4"):
            train_lib.train_and_evaluate(tiny_config(Path(config.data.raw_dir)), workdir)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    assert ckpt.make_manager(workdir, read_only=True).latest_step() == 3
    assert train_lib.train_and_evaluate(tiny_config(Path(config.data.raw_dir)),
                                        workdir)["step"] == 4
    assert_same_state(ref_dir, workdir, 4)


def test_failed_save_stops_training_and_keeps_earlier_checkpoints(trained, tmp_path,
                                                                  monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

    ref_dir, config = trained
    workdir = tmp_path / "run"
    real = json_handler.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_3(self, x, directory):
        # Orbax writes step 3 into "3.orbax-checkpoint-tmp-*/<item>", in a background thread.
        if Path(str(directory)).parent.name.split(".")[0] == "3":
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real(self, x, directory)

    monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", disk_full_at_step_3)
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        train_lib.train_and_evaluate(
            tiny_config(Path(config.data.raw_dir), checkpoint_every=1), workdir)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"saving checkpoint step 3 to {workdir}/checkpoints failed (")
    assert "No space left on device" in message
    assert "The checkpoints saved before are intact (steps [2])" in message
    monkeypatch.undo()
    # The earlier checkpoint restores, and a rerun ends where the uninterrupted run ends.
    assert inference.load(workdir, checkpoint=2).step == 2
    assert train_lib.train_and_evaluate(tiny_config(Path(config.data.raw_dir)),
                                        workdir)["step"] == 4
    assert_same_state(ref_dir, workdir, 4)


def test_meta_records_the_data_fingerprint(trained):
    workdir, config = trained
    manager = ckpt.make_manager(workdir, read_only=True)
    meta = ckpt.read_meta(manager, manager.latest_step())
    assert meta["data_fingerprint"] == sources.data_fingerprint(config)
    assert set(meta["data_fingerprint"]["files"]) >= {"mnre_train.txt", "ours_rel2id.json"}
