"""Helpers shared by the training / checkpoint / predict tests (tiny config on fixture data)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """``configs/<name>.py`` -> ``get_config(arg)`` (as config_flags would load it)."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def write_fixture_descriptions(path: Path, names: list[str]) -> Path:
    """The shipped MNRE descriptions restricted to the fixture's label set."""
    from roc_jax.labels.descriptions import default_mnre_path

    full = json.loads(default_mnre_path().read_text())
    full["relations"] = {n: full["relations"][n] for n in names}
    path.write_text(json.dumps(full))
    return path


def tiny_config(data_dir: Path, arg: str | None = "text", **train) -> ml_collections.ConfigDict:
    """The tiny config on a fixture folder written by ``tests/fixtures.write_mnre_fixture``."""
    from fixtures import MNRE_FIXTURE_REL2ID

    c = load_config("tiny", arg)
    c.data.raw_dir = str(data_dir)
    desc = data_dir / "descriptions.json"
    if not desc.exists():
        write_fixture_descriptions(desc, list(MNRE_FIXTURE_REL2ID))
    c.data.descriptions = str(desc)
    for k, v in train.items():
        c.train[k] = v
    return c


def metrics_rows(workdir: Path) -> list[dict]:
    """The JSON-lines metrics of a run (hparams rows left out)."""
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step" in r]


def read_state(workdir: Path, step: int) -> dict:
    """A saved train state ``{'params', 'opt_state', 'step', 'rng'}`` as host numpy arrays, read
    from the step's items ``params``, ``opt_state`` and ``progress`` (no model needed; whatever
    devices and processes wrote it)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()

    def read(path: Path) -> dict:
        tree = checkpointer.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))

    folder = workdir / "checkpoints" / str(step)
    return {"params": read(folder / "params"), "opt_state": read(folder / "opt_state"),
            **read(folder / "progress")}


def assert_same_state(ref_dir: Path, workdir: Path, step: int) -> None:
    """The saved train states of two runs at ``step`` are bitwise equal, leaf by leaf."""
    import jax
    import numpy as np

    ref, got = read_state(ref_dir, step), read_state(workdir, step)
    leaves_ref = jax.tree_util.tree_leaves_with_path(ref)
    leaves_got = jax.tree_util.tree_leaves_with_path(got)
    assert [p for p, _ in leaves_ref] == [p for p, _ in leaves_got]
    for (path, a), (_, b) in zip(leaves_ref, leaves_got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                      err_msg=jax.tree_util.keystr(path))
