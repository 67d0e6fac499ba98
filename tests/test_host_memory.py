"""roc_jax.host_memory (opt-in): large freed blocks are reused instead of mapped afresh."""

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
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# What XLA:CPU does each step, in miniature: a worker thread allocates a 64 MiB block (above
# glibc's largest mmap threshold, 32 MiB), writes it and frees it, four times. The child reports
# the page faults of each round and whether the block came from the main heap ([heap] in
# /proc/self/maps) or from a fresh mapping.
CHILD = """
import ctypes, json, resource, threading
import roc_jax  # first, as in any program that uses the library
from roc_jax import host_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
rounds = []

def in_heap(p):
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
            return lo <= p < hi
    return False

def worker():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
        rounds.append({"faults": faults, "in_heap": in_heap(p)})
        libc.free(p)

t = threading.Thread(target=worker)
t.start()
t.join()
print(json.dumps({"status": host_memory.status, "rounds": rounds}))
"""


def run_child(tuning: str) -> dict:
    env = {**os.environ, host_memory.ENV: tuning}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          cwd=str(ROOT), env=env, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the tuning is glibc's mallopt; this host is not glibc")
def test_tuned_process_reuses_large_blocks_and_default_maps_them_afresh():
    tuned, default = run_child("1"), run_child("0")
    assert tuned["status"] == "applied"
    assert default["status"] == f"off ({host_memory.ENV} is not 1)"
    pages = (64 << 20) // 4096
    # Tuned: the worker thread's block comes from the main heap, and from the second round on it
    # is the block freed the round before, already resident: no page faults.
    assert all(r["in_heap"] for r in tuned["rounds"]), tuned
    assert tuned["rounds"][0]["faults"] >= pages // 2, tuned
    assert all(r["faults"] < 100 for r in tuned["rounds"][1:]), tuned
    # glibc's defaults: a fresh mapping every round, faulted in page by page.
    assert not any(r["in_heap"] for r in default["rounds"]), default
    assert all(r["faults"] >= pages // 2 for r in default["rounds"]), default


@pytest.mark.skipif(not GLIBC, reason="the tuning is glibc's mallopt; this host is not glibc")
def test_late_import_says_it_is_late():
    code = ("import jax; jax.devices(); from roc_jax import host_memory; "
            "print(host_memory.status)")  # the backend's threads exist before roc_jax's import
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=str(ROOT), env={**os.environ, host_memory.ENV: "1"}, timeout=120,
                          check=True)
    assert proc.stdout.strip().startswith("applied after the JAX backend started")


def test_off_by_default_and_other_libcs_leave_malloc_alone(monkeypatch):
    monkeypatch.delenv(host_memory.ENV, raising=False)
    assert host_memory.keep_freed_memory() == f"off ({host_memory.ENV} is not 1)"
    monkeypatch.setenv(host_memory.ENV, "1")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host_memory.keep_freed_memory() == "not glibc: unchanged"


# ---------------------------------------------------------------------------------------------
# Huge pages for glibc's mapped blocks (the entry points restart themselves with them)

FAULTS_CHILD = """
import ctypes, json, os, resource
from roc_jax import host_memory
host_memory.restart_with_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(64 << 20)  # mapped afresh each time: above the mmap threshold
    ctypes.memset(p, 1, 64 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "faults": faults}))
"""


def run_faults_child(**env: str) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                             host_memory.HUGE_PAGES_ENV)}
    proc = subprocess.run([sys.executable, "-c", FAULTS_CHILD], capture_output=True, text=True,
                          cwd=str(ROOT), env={**base, **env}, timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def thp_host() -> bool:
    """glibc 2.35+ (the hugetlb tunable) and a kernel with transparent huge pages on."""
    version = platform.libc_ver()[1] if GLIBC else "0"
    try:
        thp_on = "[never]" not in Path(host_memory.THP_SETTING).read_text()
    except OSError:
        thp_on = False
    return GLIBC and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35) and thp_on


@pytest.mark.skipif(not thp_host(), reason="this host has no glibc 2.35+ with transparent huge "
                                           "pages on")
def test_restart_maps_large_blocks_with_huge_pages():
    restarted = run_faults_child()
    assert restarted["tunables"] == host_memory.HUGETLB_TUNABLE
    opted_out = run_faults_child(**{host_memory.HUGE_PAGES_ENV: "0"})
    assert opted_out["tunables"] is None
    pages = (64 << 20) // 4096
    # 4 KiB pages: every page faults. 2 MiB pages: 32 faults per block when the kernel finds
    # free huge pages; the bound leaves room for a fragmented host's fallbacks.
    assert all(f >= pages // 2 for f in opted_out["faults"]), opted_out
    assert all(f < pages // 4 for f in restarted["faults"]), restarted


def test_huge_pages_missing_says_when_to_restart(monkeypatch, tmp_path):
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    monkeypatch.setattr(host_memory, "THP_SETTING", str(thp))
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(host_memory.HUGE_PAGES_ENV, raising=False)
    assert host_memory.huge_pages_missing() is not None
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=2")  # the user's own choice wins
    assert host_memory.huge_pages_missing() is None
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(host_memory.HUGE_PAGES_ENV, "0")
    assert host_memory.huge_pages_missing() is None
    monkeypatch.delenv(host_memory.HUGE_PAGES_ENV)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.31"))  # before the tunable
    assert host_memory.huge_pages_missing() is None
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    thp.write_text("always madvise [never]\n")
    assert host_memory.huge_pages_missing() is None
    monkeypatch.setattr(host_memory, "THP_SETTING", str(tmp_path / "absent"))
    assert host_memory.huge_pages_missing() is None
