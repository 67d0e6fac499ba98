"""2 MiB pages for XLA:CPU's per-step buffers: what GLIBC_TUNABLES does, that `make train` sets it
on a CPU backend only, and that the entry points run in the process the user started."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from roc_jax import host_memory

ROOT = Path(__file__).resolve().parents[1]

# What XLA:CPU does each step, in miniature: a 64 MiB block (above glibc's largest mmap threshold,
# so mapped afresh each time) allocated, written and freed, three times.
FAULTS_CHILD = """
import ctypes, json, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(64 << 20)
    ctypes.memset(p, 1, 64 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(json.dumps(faults))
"""


def faults_per_block(tunables: str | None) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.run([sys.executable, "-c", FAULTS_CHILD], capture_output=True, text=True,
                          env=env, timeout=60, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.huge_pages_supported(),
                    reason="this host has no glibc 2.35+ with transparent huge pages on")
def test_tunable_maps_large_blocks_on_huge_pages():
    pages = (64 << 20) // 4096
    default, huge = faults_per_block(None), faults_per_block(host_memory.HUGETLB_TUNABLE)
    # 4 KiB pages: every page faults. 2 MiB pages: 32 faults per block when the kernel finds free
    # huge pages; the bound leaves room for a fragmented host's fallbacks.
    assert all(f >= pages // 2 for f in default), default
    assert all(f < pages // 4 for f in huge), huge


def test_status_names_the_setting_and_how_to_get_it(monkeypatch, tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    monkeypatch.setattr(host_memory, "THP_SETTING", str(thp))
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert host_memory.HUGETLB_TUNABLE in host_memory.huge_pages_status()  # the hint
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=2")
    assert host_memory.huge_pages_status() == "GLIBC_TUNABLES=glibc.malloc.hugetlb=2"
    monkeypatch.delenv("GLIBC_TUNABLES")
    for libc, setting in ((("glibc", "2.31"), "always [madvise] never"),  # before the tunable
                          (("glibc", "2.36"), "always madvise [never]"),  # THP off
                          (("musl", "1.2"), "always [madvise] never")):
        monkeypatch.setattr(platform, "libc_ver", lambda libc=libc: libc)
        thp.write_text(setting + "\n")
        assert not host_memory.huge_pages_supported()
        assert "no glibc 2.35+" in host_memory.huge_pages_status()


FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ]; then echo "$FAKE_BACKEND"; exit 0; fi
echo "TUNABLES=[$GLIBC_TUNABLES] DATA=[$ROC_DATA_DIR] ARGS=$*"
"""


def make_train(tmp_path: Path, backend: str, *args: str) -> str:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"},
           "FAKE_BACKEND": backend}
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "-o", ".venv/.installed", "train",
                           f"PY={fake}", "ROC_DATA_DIR=/data/mnre", *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_train_runs_the_short_budget_with_huge_pages_on_cpu(tmp_path):
    out = make_train(tmp_path, "cpu")
    assert "budget short: 1 epoch" in out and "min on a 2-core CPU" in out  # says what and how long
    run = out.strip().splitlines()[-1]
    assert run.startswith(f"TUNABLES=[{host_memory.HUGETLB_TUNABLE}] DATA=[/data/mnre] ARGS="
                          "train.py --config configs/mnre.py:offline --workdir "
                          "workdirs/mnre_offline_short")
    assert run.endswith("--config.num_epochs=1 --config.train.lr_encoder=5e-5")


def test_make_train_full_budget_and_other_backends(tmp_path):
    run = make_train(tmp_path, "gpu", "BUDGET=full").strip().splitlines()[-1]
    assert run == ("TUNABLES=[] DATA=[/data/mnre] ARGS=train.py --config configs/mnre.py:offline "
                   "--workdir workdirs/mnre_offline_full")


def test_entry_points_do_not_replace_their_process():
    """train.py / eval.py / predict.py with exec* disabled: each gets to parsing its flags (absl's
    --helpfull prints them and exits with status 1) without trying to re-execute itself."""
    for entry in ("train_main", "eval_main", "predict_main"):
        code = ("import os, sys\n"
                "def refuse(*a, **k): raise SystemExit('the entry point re-executed itself')\n"
                "for name in [n for n in dir(os) if n.startswith(('exec', 'spawn'))]:\n"
                "    setattr(os, name, refuse)\n"
                f"sys.argv = ['{entry}', '--helpfull']\n"
                f"from roc_jax.cli import {entry}\n{entry}()\n")
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=str(ROOT), env=env, timeout=120)
        assert "re-executed" not in proc.stderr, (entry, proc.stderr[-2000:])
        assert "--workdir" in proc.stdout, (entry, proc.stdout[-2000:], proc.stderr[-2000:])
