"""Executes notebooks/roc_colab_tpu.ipynb in SMOKE mode (tiny config, fixture data, 8 fake CPU
devices) with nbclient, so that the Colab notebook cannot rot.

The parameters are injected papermill-style: a cell after the one tagged ``parameters``. The
kernel is this interpreter (``sys.executable``), through a kernelspec written to a temp folder, so
the notebook imports the roc_jax under test and not whatever a system-wide ``python3`` kernel
points at.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from roc_testutil import REPO

NOTEBOOK = REPO / "notebooks" / "roc_colab_tpu.ipynb"
KERNEL = "roc-jax-test"


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o["output_type"] == "stream"
                   and o.get("name") == "stdout")


def _kernel_manager(tmp: Path) -> KernelManager:
    """A manager whose only kernelspec runs ipykernel on ``sys.executable`` (this interpreter)."""
    spec_dir = tmp / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "roc_jax test", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
    # IPC sockets in the temp folder: no TCP ports, and no warning about unencrypted TCP.
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs, transport="ipc",
                         ip=str(tmp / "kernel-ipc"))


def test_committed_notebook_is_clean():
    """Committed without outputs, and its defaults are the Colab run's (SMOKE off)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    assert re.search(r"^SMOKE = False\b", params[0].source, re.M)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed with SMOKE=True in a temp working folder: (notebook, smoke dir)."""
    tmp = tmp_path_factory.mktemp("notebook")
    smoke_dir = tmp / "smoke"
    nb = nbformat.read(NOTEBOOK, as_version=4)
    index = next(i for i, c in enumerate(nb.cells)
                 if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(
        f"SMOKE = True\nREPO_DIR = {str(REPO)!r}\nSMOKE_DIR = {str(smoke_dir)!r}\n"
        "SMOKE_CPU_DEVICES = 8\n")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    km = _kernel_manager(tmp)
    client = nbclient.NotebookClient(nb, km=km, timeout=600, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp)}})
    try:
        client.execute()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb, smoke_dir


def test_notebook_smoke_run(executed):
    nb, smoke_dir = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o["output_type"] != "error" for c in code for o in c.outputs)
    text = "\n".join(_stream_text(c) for c in code)

    # Every device: the 8 fake CPU devices of SMOKE mode, not jax's default single one.
    assert re.search(r"^8 devices: ", text, re.M), text[:2000]
    # Colab-only steps were skipped: the TensorBoard cell printed the command instead.
    assert f"tensorboard --logdir {smoke_dir / 'workdir'}/tb" in text

    # Training: 2 epochs of 2 steps on the fixture, dev metrics printed.
    trained = re.search(r"^TRAINED step (\d+): dev micro-F1 ([0-9.]+) .*best step (\d+)$", text,
                        re.M)
    assert trained, text[-3000:]
    assert int(trained[1]) == 4
    best = int(trained[3])
    workdir = smoke_dir / "workdir"
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    dev = {r["step"]: r for r in rows if "dev/f1" in r}
    assert sorted(dev) == [2, 4]
    assert list((workdir / "tb").glob("events.out.tfevents.*"))

    # Restored in fresh objects: the best step, and exactly the training loop's dev metrics (the
    # notebook asserts it too; here from the files it wrote).
    restored = re.search(r"^RESTORED step (\d+): dev micro-F1 ([0-9.]+)", text, re.M)
    assert restored and int(restored[1]) == best
    written = json.loads((workdir / "eval" / "metrics_val.json").read_text())
    for key in ("precision", "recall", "f1", "accuracy"):
        assert written[key] == dev[best][f"dev/{key}"], key
    assert written["num_examples"] == 16
    assert (workdir / "eval" / "confusion_val.png").stat().st_size > 0
    assert "micro (without None)" in text
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the curves, the confusion matrix, at least one post's image

    # Predictions: 3 val posts and 1 marked sentence, top-3 each, every relation from the label
    # set, with one of that relation's own descriptions as the explanation.
    from roc_jax.labels.descriptions import load_descriptions

    descriptions = load_descriptions(smoke_dir / "data" / "mnre" / "descriptions.json")
    predict_cell = code[-1]
    lines = _stream_text(predict_cell).splitlines()
    assert sum(line.startswith("POST: ") for line in lines) == 3
    assert sum(line.startswith("SENTENCE: ") for line in lines) == 1
    ranked = [(i, re.match(r"^   (\d)\. (\S+) +p=([0-9.]+)$", line))
              for i, line in enumerate(lines)]
    ranked = [(i, m) for i, m in ranked if m]
    assert [int(m[1]) for _, m in ranked] == [1, 2, 3] * 4
    for i, m in ranked:
        relation = m[2]
        assert relation in descriptions, relation
        explained = re.match(r"^      nearest description \([+-][0-9.]+\): (.+)$", lines[i + 1])
        assert explained and explained[1] in descriptions[relation], lines[i + 1]
    golds = [line.split("gold: ", 1)[1] for line in lines if line.startswith("   gold: ")]
    assert len(golds) == 3 and set(golds) <= set(descriptions)
