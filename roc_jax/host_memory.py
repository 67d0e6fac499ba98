"""Host memory on CPUs: whether XLA:CPU's per-step buffers are mapped on 2 MiB pages.

XLA:CPU allocates the temporary buffers of each execution of a compiled step in one block (880 MB
for the MiniLM text train step at batch 32 x 64) and frees it when the step ends. glibc serves a
block above its mmap threshold with a fresh ``mmap`` and returns it with ``munmap``, so every step
faults in about 223,000 new 4 KiB pages. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc
2.35+, transparent huge pages not ``never``) glibc asks for huge pages on the blocks it maps:
about 1,000 faults per step, and the memory still goes back to the system when the step frees
it. glibc reads tunables only when a process starts, so the variable must be set before Python
starts: ``make train`` does so on a CPU backend (docs/performance.md, "Host memory").

This module only reports the setting (the training log prints it); it changes nothing.
"""

from __future__ import annotations

import os
import platform

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_supported() -> bool:
    """glibc 2.35+ (the tunable's first release) on Linux, with transparent huge pages not off."""
    libc, version = platform.libc_ver()
    if platform.system() != "Linux" or libc != "glibc":
        return False
    try:
        if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return False
        with open(THP_SETTING) as f:
            return "[never]" not in f.read()
    except (OSError, ValueError):
        return False


def huge_pages_status() -> str:
    """One line for the training log: this process's glibc huge-page setting, and on a host that
    supports it but runs without, how to turn it on."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return f"GLIBC_TUNABLES={tunables}"
    if not huge_pages_supported():
        return "glibc default allocator (no glibc 2.35+ with transparent huge pages here)"
    return (f"glibc default allocator; on a CPU backend, GLIBC_TUNABLES={HUGETLB_TUNABLE} before "
            "starting Python makes each train step cheaper (make train sets it; "
            "docs/performance.md)")
