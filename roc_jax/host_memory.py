"""Host memory: XLA:CPU's per-step buffers without a page fault per 4 KiB.

Why: XLA:CPU allocates the temporary buffers of each execution of a compiled step in one block
(880 MB for the MiniLM text train step at batch 32 x 64) and frees it when the step ends. glibc
serves a block above its mmap threshold (32 MiB at most) with a fresh ``mmap`` and returns it with
``munmap`` on free, so every step faults in about 223,000 new 4 KiB pages: about 0.5 s of kernel
time per step on the 2-core benchmark host (``benchmarks/train_step.py``, ``malloc`` part).

Two remedies, measured side by side in that benchmark (README, Performance):

- :func:`restart_with_huge_pages`, the command-line entry points' default: restart once with
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, so glibc asks for transparent huge pages on the
  blocks it maps: about 1,000 faults per step, and the memory still goes back to the system
  when the step frees it (same peak as glibc's defaults). ``ROC_HUGE_PAGES=0`` opts out.
- :func:`keep_freed_memory`, opt-in (``ROC_MALLOC_TUNING=1``, applied by ``import roc_jax``):
  ``mallopt`` makes every thread allocate from the main heap (``M_ARENA_MAX`` 1: a thread
  arena's heap is at most 64 MiB, so it would ``mmap`` such a block anyway), never ``mmap``
  (``M_MMAP_MAX`` 0) and keep freed memory (``M_TRIM_THRESHOLD`` 2 GiB): no faults at all, and
  it works without a restart (a notebook), but the retained heap fragments across the length
  buckets' steps: 4.22 GB peak in 200 steps of real MNRE training against 2.95 GB. A thread
  keeps the arena it first allocated from, so it works only before JAX starts its threads.

Both do nothing elsewhere than glibc on Linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB is the largest it accepts

ENV = "ROC_MALLOC_TUNING"

# What the last call did: "applied", "off (ROC_MALLOC_TUNING is not 1)", "not glibc", ... (the
# benchmarks and the training log record it next to their figures).
status = "not called"


def jax_backend_started() -> bool:
    """Whether a JAX backend (and so its thread pool) already exists in this process."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", {}))
    except ImportError:  # a JAX without that private module: assume the worst
        return True


def keep_freed_memory() -> str:
    """If ``ROC_MALLOC_TUNING=1``, tunes glibc malloc as the module docstring says; returns (and
    stores in ``status``) what it did.

    Idempotent. Call it before the first JAX computation (``import roc_jax`` does).
    """
    global status
    if os.environ.get(ENV, "0") != "1":
        status = f"off ({ENV} is not 1)"
    elif platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        status = "not glibc: unchanged"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)))
        status = "applied" if ok else "mallopt refused a setting"
        if ok and jax_backend_started():
            status = "applied after the JAX backend started: its threads keep their arenas"
    return status


# ---------------------------------------------------------------------------------------------
# Transparent huge pages for glibc's mapped blocks: the entry points' default.

HUGE_PAGES_ENV = "ROC_HUGE_PAGES"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_missing() -> str | None:
    """Why this process should be restarted with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, or
    None when it should not (already set, opted out, not glibc 2.35+, or THP off in the kernel).

    With that tunable glibc marks the blocks it maps (``madvise(MADV_HUGEPAGE)``), so the kernel
    backs XLA:CPU's per-step 880 MB temporary with 2 MiB pages: about 1,000 page faults per step
    instead of 223,000, and the memory still goes back to the system when the step frees it (no
    retained heap, unlike ``keep_freed_memory``). glibc reads tunables only when a process
    starts, hence the restart.
    """
    if os.environ.get(HUGE_PAGES_ENV, "1") == "0":
        return None
    if HUGETLB_TUNABLE.split("=")[0] in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc":
        return None
    try:
        if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):  # the tunable's first release
            return None
        with open(THP_SETTING) as f:
            if "[never]" in f.read():
                return None
    except (OSError, ValueError):
        return None
    return f"glibc {version}, THP available, GLIBC_TUNABLES lacks {HUGETLB_TUNABLE}"


def restart_with_huge_pages() -> None:
    """For the command-line entry points only (``train.py``, ``roc-train``, ...): re-executes this
    process with ``GLIBC_TUNABLES`` extended by ``glibc.malloc.hugetlb=1`` when
    :func:`huge_pages_missing` says so; returns otherwise. ``ROC_HUGE_PAGES=0`` opts out.

    Never call it from a library function or a notebook: it replaces the running process.
    """
    if huge_pages_missing() is None or not sys.executable:  # no interpreter path: embedded
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), HUGETLB_TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the command line as typed (python [-m mod | script] args), so the restart
    # runs the same thing, console scripts included.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**os.environ, "GLIBC_TUNABLES": tunables})
