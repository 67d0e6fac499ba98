"""Shared helpers of the CPU benchmarks: the machine's description, interleaved timing, the matmul
probe that stands for the hardware's limit, and peak resident memory.

Timing on a shared machine: one side timed after the other measures the neighbours' load, not the
code; so the functions under comparison run in alternating blocks (``time_interleaved``) and each
figure is the median block.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), cores, memory, load, library versions, XLA flags."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        info["cpu_model"] = models[0] if models else platform.processor()
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        # The vector units decide the float32 peak: AVX-512 doubles AVX2's FLOPs per cycle.
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                        if f in flags]
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False)
        info["gpus"] = query.stdout.split("\n")[:-1] if query.returncode == 0 else []
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "grain"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    info["versions"] = versions
    info["env"] = {k: os.environ.get(k) for k in ("XLA_FLAGS", "OMP_NUM_THREADS",
                                                   "JAX_PLATFORMS") if os.environ.get(k)}
    return info


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, iters: int,
                     sync: Callable[[Any], Any] = lambda x: x,
                     usage: dict[str, dict[str, list[float]]] | None = None
                     ) -> dict[str, list[float]]:
    """Seconds per call, one entry per block of ``iters`` calls, for each of ``repeats`` rounds.

    The functions' blocks alternate within each round so that every side sees the same load over
    time. ``sync`` is applied to a block's last result (e.g. ``jax.block_until_ready``) so that
    asynchronous dispatch does not end a block early. If ``usage`` is a dict, it receives per
    name and block the process's minor page faults and kernel (system) seconds per call.
    """
    out: dict[str, list[float]] = {name: [] for name in fns}
    if usage is not None:
        usage.update({name: {"minor_faults": [], "sys_s": []} for name in fns})
    for _ in range(repeats):
        for name, fn in fns.items():
            ru = resource.getrusage(resource.RUSAGE_SELF)
            start = time.perf_counter()
            for _ in range(iters):
                result = fn()
            sync(result)
            out[name].append((time.perf_counter() - start) / iters)
            if usage is not None:
                ru2 = resource.getrusage(resource.RUSAGE_SELF)
                usage[name]["minor_faults"].append((ru2.ru_minflt - ru.ru_minflt) / iters)
                usage[name]["sys_s"].append(round((ru2.ru_stime - ru.ru_stime) / iters, 4))
    return out


def rate_summary(seconds_per_call: list[float], examples_per_call: int) -> dict[str, Any]:
    """Median (the figure) and best examples/s of timed blocks, with the raw blocks."""
    med = statistics.median(seconds_per_call)
    return {"ex_per_s": examples_per_call / med, "best_ex_per_s": examples_per_call /
            min(seconds_per_call), "s_per_call_blocks": [round(s, 5) for s in seconds_per_call]}


def matmul_flops(n: int = 2048, repeats: int = 7, dtype: str = "float32") -> dict[str, Any]:
    """Measured ``n x n @ n x n`` throughput of XLA on this machine (the MFU denominator).

    Median over ``repeats`` single products after one warm-up (compile) call.
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.dot)
    jax.block_until_ready(mm(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(a, b))
        times.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {"n": n, "dtype": dtype, "flops_per_s": flops / statistics.median(times),
            "best_flops_per_s": flops / min(times), "s_blocks": [round(t, 5) for t in times]}


def peak_rss_gb() -> float:
    """This process's peak resident set size in GB: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss`` alone: Linux carries the parent's high-water mark over fork + exec into the
    child's ``ru_maxrss`` (a child of a big benchmark process reports the parent's peak), while
    ``VmHWM`` belongs to the current address space. ``ru_maxrss`` is the fallback off Linux.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def ru_maxrss_gb() -> float:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` in GB (KiB on Linux); see ``peak_rss_gb``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
