"""Multi-process training through ``jax.distributed``: 2 processes x 2 CPU devices, started by
``tools/launch_local.py`` (gloo collectives over 127.0.0.1), against 1 process x 4 devices, on the
tiny text config and fixture data (3 epochs of 2 steps, dev eval padded: 16 samples in batches of
12).

The runs are module fixtures (each launch costs a Python start, a model build and a compile; the
launches share a compilation cache): the reference (1 x 4, in this process), a 2-process run that
records what each process read, a 2-process run killed after its first checkpoint and restarted,
its checkpoint continued in 1 process, and a 1-process checkpoint continued in 2 processes until
one of them gets SIGTERM, then finished in 1 process.

Run as a script, this file is one process of the recording 2-process run (``_worker``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "tools" / "launch_local.py"
NUM_EPOCHS = 3  # 2 steps per epoch: 6 steps, checkpoints at 2, 4 and 6
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
    return [str(REPO / "train.py"), "--config", str(REPO / "configs" / "tiny.py") + ":text",
            "--workdir", str(workdir), f"--config.data.raw_dir={data_dir}",
            f"--config.data.descriptions={data_dir / 'descriptions.json'}",
            f"--config.train.eval_batch_size={EVAL_BATCH}", f"--config.num_epochs={NUM_EPOCHS}"]


def _worker(argv: list[str]) -> None:
    """One process of a 2-process training run that also writes the record indices its train
    iterator and eval batches hold (``workdir/read_<process>.json``)."""
    import jax

    from roc_jax import train_lib
    from roc_jax.data import pipeline

    data_dir, workdir = Path(argv[0]), Path(argv[1])
    config = _config(data_dir)
    read: dict = {}
    real_train, real_eval = pipeline.make_train_iterator, pipeline.make_eval_batches

    def train_iterator(*args, **kwargs):
        it = real_train(*args, **kwargs)
        read["train"] = [it.local_indices(s).tolist()
                         for s in range(it.steps_per_epoch * config.num_epochs)]
        return it

    def eval_batches(*args, **kwargs):
        batches = real_eval(*args, **kwargs)
        read["eval"] = [batches.local_indices(i).tolist() for i in range(len(batches))]
        return batches

    pipeline.make_train_iterator, pipeline.make_eval_batches = train_iterator, eval_batches
    train_lib.train_and_evaluate(config, workdir)
    read["process"], read["count"] = jax.process_index(), jax.process_count()
    (workdir / f"read_{jax.process_index()}.json").write_text(json.dumps(read))


# ---------------------------------------------------------------------------------------------
# launching


class Launch:
    """``tools/launch_local.py`` with 2 processes x 2 devices, its merged output collected."""

    def __init__(self, command: list[str], cache_dir: Path):
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        self.proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), "--num_processes", "2", "--devices_per_process", "2",
             "--", *command], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pids(self, timeout: float = 60) -> dict[int, int]:
        """Process id -> pid, from the launcher's start lines."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = dict((int(a), int(b)) for a, b in re.findall(
                r"launch_local: process (\d+) of 2: pid (\d+)", self.output))
            if len(found) == 2:
                return found
            time.sleep(0.05)
        raise AssertionError(f"the launcher printed no pids:\n{self.output[-3000:]}")

    def wait(self, timeout: float = LAUNCH_TIMEOUT_S) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"launch timed out after {timeout}s:\n{self.output[-5000:]}"
                                 ) from None
        self._reader.join(timeout=10)
        return code

    def run_ok(self) -> None:
        code = self.wait()
        assert code == 0, f"launch exited {code}:\n{self.output[-6000:]}"


# ---------------------------------------------------------------------------------------------
# the runs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from fixtures import write_mnre_fixture

    root = tmp_path_factory.mktemp("multihost")
    write_mnre_fixture(root / "data")
    _config(root / "data")  # writes the fixture's descriptions file
    return root


def _four_devices():
    import jax

    from roc_jax import parallel

    return parallel.make_mesh(jax.devices()[:4])


@pytest.fixture(scope="module")
def reference(base) -> Path:
    """1 process x 4 devices, uninterrupted."""
    from roc_jax import train_lib

    workdir = base / "one_process"
    train_lib.train_and_evaluate(_config(base / "data"), workdir, mesh=_four_devices())
    return workdir


@pytest.fixture(scope="module")
def two_process(base) -> Path:
    """2 processes x 2 devices, uninterrupted, recording what each process read."""
    workdir = base / "two_processes"
    Launch([__file__, str(base / "data"), str(workdir)], base / "jax_cache").run_ok()
    return workdir


@pytest.fixture(scope="module")
def killed_and_restarted(base) -> dict:
    """2 processes; process 0 is SIGKILLed once checkpoint 2 exists; a copy of the workdir as
    the kill left it; then both restart (the launcher) in the original workdir."""
    workdir = base / "killed"
    first = Launch(_cli_args(base / "data", workdir), base / "jax_cache")
    pids = first.pids()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not (workdir / "checkpoints" / "2").is_dir():
        assert first.proc.poll() is None, f"the run ended early:\n{first.output[-5000:]}"
        assert time.monotonic() < deadline, "no checkpoint 2 in time"
        time.sleep(0.02)
    os.kill(pids[0], signal.SIGKILL)
    code = first.wait()
    left = base / "killed_copy"
    shutil.copytree(workdir, left)
    Launch(_cli_args(base / "data", workdir), base / "jax_cache").run_ok()
    return {"workdir": workdir, "copy": left, "first_code": code, "first_output": first.output}


# ---------------------------------------------------------------------------------------------
# checks


def _state(workdir: Path, step: int) -> dict:
    """A saved train state as host numpy arrays, whatever devices wrote it."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def _assert_params_close(a: dict, b: dict, atol: float) -> float:
    """Same tree; every parameter within ``atol``; returns the largest difference."""
    import jax

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


LAST = 2 * NUM_EPOCHS


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

    from roc_jax import train_lib
    from roc_jax.data import pipeline
    from roc_jax.models.roc import create_model

    reads = [json.loads((two_process / f"read_{i}.json").read_text()) for i in (0, 1)]
    assert [(r["process"], r["count"]) for r in reads] == [(0, 2), (1, 2)]
    config = _config(base / "data")
    sources = train_lib.load_sources(config, ["train", "val"])
    built = create_model(config.model, use_images=False, num_relations=5)
    cfg = train_lib.pipeline_config(config, None)
    single = grain.sharding.ShardOptions(shard_index=0, shard_count=1)
    one = pipeline.make_train_iterator(sources["train"], built.tokenizer, cfg, seed=config.seed,
                                       batch_size=config.train.batch_size, shard_options=single)
    spe = one.steps_per_epoch
    assert spe == 2 and len(reads[0]["train"]) == spe * NUM_EPOCHS
    n = len(sources["train"])
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
    assert real == list(range(len(sources["val"])))  # every dev sample, once
    assert evaluated.count(-1) == 2 * EVAL_BATCH - len(sources["val"])
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


def test_a_killed_process_restarted_ends_where_the_uninterrupted_run_ends(killed_and_restarted,
                                                                          two_process):
    run = killed_and_restarted
    out = run["first_output"]
    assert run["first_code"] != 0
    assert "launch_local: process 0: killed by SIGKILL" in out, out[-3000:]
    steps = sorted(int(p.name) for p in (run["copy"] / "checkpoints").iterdir()
                   if p.name.isdigit())
    assert 2 in steps and max(steps) < LAST  # killed mid-run, after checkpoint 2
    got, ref = _state(run["workdir"], LAST), _state(two_process, LAST)
    _assert_params_close(got, ref, atol=0.0)  # same topology, same steps: bitwise
    assert _dev_rows(run["workdir"])[LAST] == _dev_rows(two_process)[LAST]


def test_two_process_checkpoint_continues_training_in_one_process(killed_and_restarted,
                                                                  reference, base):
    from roc_jax import train_lib

    workdir = killed_and_restarted["copy"]
    result = train_lib.train_and_evaluate(_config(base / "data"), workdir, mesh=_four_devices())
    assert result["step"] == LAST
    _assert_params_close(_state(workdir, LAST)["params"], _state(reference, LAST)["params"],
                         PARAM_ATOL)
    assert _dev_rows(workdir)[LAST] == _dev_rows(reference)[LAST]


def test_one_process_checkpoint_continues_in_two_until_sigterm_then_in_one(reference, base):
    """1 process trains steps 1-2; 2 processes resume from its checkpoint; SIGTERM to process 1
    alone (a preempted host) stops both at one step, which both save; 1 process finishes."""
    from roc_jax import checkpoint as ckpt
    from roc_jax import train_lib

    workdir = base / "one_two_one"
    first = train_lib.train_and_evaluate(_config(base / "data", max_steps=2), workdir,
                                         mesh=_four_devices())
    assert first["step"] == 2
    assert ckpt.make_manager(workdir, read_only=True).latest_step() == 2
    run = Launch(_cli_args(base / "data", workdir), base / "jax_cache")
    pids = run.pids()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while "from step 2 on 4 devices" not in run.output:  # process 0's start line
        assert run.proc.poll() is None, f"the run ended early:\n{run.output[-5000:]}"
        assert time.monotonic() < deadline, "the 2-process run did not start in time"
        time.sleep(0.02)
    os.kill(pids[1], signal.SIGTERM)
    assert run.wait() != 0  # stopped unfinished
    stops = {int(p): int(s) for p, s in re.findall(
        r"^\[(\d)\] .*SIGTERM at step (\d+): saved a checkpoint", run.output, re.M)}
    assert sorted(stops) == [0, 1], run.output[-5000:]
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


def test_launcher_prefixes_output_and_stops_the_others_when_one_fails():
    script = ("import os, sys, time\n"
              "i = int(os.environ['JAX_PROCESS_ID'])\n"
              "print('hello from', i, os.environ['JAX_NUM_PROCESSES'],"
              " os.environ['JAX_NUM_CPU_DEVICES'], os.environ['JAX_COORDINATOR_ADDRESS'],"
              " flush=True)\n"
              "sys.exit(3) if i == 1 else time.sleep(120)\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--num_processes", "2",
                           "--devices_per_process", "3", "--", sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - t0 < 30  # process 0 was killed, not waited for
    assert proc.returncode == 3
    assert re.search(r"^\[0\] hello from 0 2 3 127\.0\.0\.1:\d+$", proc.stdout, re.M)
    assert re.search(r"^\[1\] hello from 1 2 3 127\.0\.0\.1:\d+$", proc.stdout, re.M)
    assert "process 1 failed (exit status 3): killing the others" in proc.stderr
    assert "process 0: killed by SIGKILL" in proc.stderr


def test_processes_join_one_mesh_and_process_zero_goes_first(tmp_path):
    """Two processes join through the launcher's environment alone; ``main_process_first`` (the
    shared TFDS build) runs process 0's work to its end before process 1's starts."""
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "import jax\n"
              "from roc_jax import parallel\n"
              "from roc_jax.config_base import get_base_config\n"
              "assert parallel.initialize_distributed(get_base_config().distributed)\n"
              "out, i = Path(sys.argv[1]), jax.process_index()\n"
              "def work():\n"
              "    time.sleep(1.0 if i == 0 else 0.0)\n"
              "    (out / f'done_{i}').write_text(' '.join(sorted(p.name for p in out.iterdir())))\n"
              "    return i\n"
              "assert parallel.main_process_first('work', work) == i\n"
              "print('devices', jax.device_count(), jax.local_device_count(), flush=True)\n")
    proc = subprocess.run([sys.executable, str(LAUNCHER), "--num_processes", "2",
                           "--devices_per_process", "2", "--", sys.executable, "-c", script,
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "done_0").read_text() == ""  # process 1 had not started its work
    assert (tmp_path / "done_1").read_text() == "done_0"
    assert proc.stdout.count("devices 4 2") == 2


if __name__ == "__main__":
    _worker(sys.argv[1:])
