"""What the CPU and GPU benchmarks share: the machine's description, the timers, the matmul probe
(the MFU denominator), the analytic FLOP count of the ROC train step and a synthetic batch.

On a shared machine one side timed after the other measures the neighbours' load, so compared
functions run in alternating blocks (``time_interleaved``) and each figure is the median block.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import types
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

# The optimizer settings of configs/mnre.py, for steps built outside a config.
TRAIN_CFG = types.SimpleNamespace(lr_encoder=1e-5, lr_head=1e-3, warmup_ratio=0.1,
                                  weight_decay=0.01, grad_clip=1.0)


def machine() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), SIMD units, cores, memory, load, GPUs, library versions."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count()}
    with contextlib.suppress(OSError):  # no /proc: not Linux
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in lines
                                  if ln.startswith("model name")), platform.processor())
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        # The vector units decide the float32 peak: AVX-512 doubles AVX2's FLOPs per cycle.
        info["simd"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                        if f in flags]
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    if shutil.which("nvidia-smi"):
        info["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.split("\n")[:-1]
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    info["versions"] = {name: installed.get(name) for name in (
        "jax", "jaxlib", "flax", "optax", "numpy", "torch", "transformers", "grain")}
    info["env"] = {k: os.environ[k] for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "JAX_PLATFORMS",
                                              "GLIBC_TUNABLES") if os.environ.get(k)}
    return info


def write_json(path: Path, result: dict[str, Any], indent: int = 1) -> None:
    """Replaces ``path`` (its folder made) atomically: a killed run leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=indent, default=float) + "\n")
    os.replace(tmp, path)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), the seconds it took)``: e.g. a first call with its compilation."""
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, iters: int,
                     sync: Callable[[Any], Any] = lambda x: x, usage: dict | None = None
                     ) -> dict[str, list[float]]:
    """Seconds per call of each block of ``iters`` calls, the functions' blocks alternating for
    ``repeats`` rounds. ``sync`` (e.g. ``jax.block_until_ready``) ends a block on its last result;
    ``usage``, if a dict, receives per name the minor page faults and kernel seconds per call."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    if usage is not None:
        usage.update({name: {"minor_faults": [], "sys_s": []} for name in fns})
    for _ in range(repeats):
        for name, fn in fns.items():
            ru, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(iters):
                result = fn()
            sync(result)
            out[name].append((time.perf_counter() - start) / iters)
            if usage is not None:
                ru2 = resource.getrusage(resource.RUSAGE_SELF)
                usage[name]["minor_faults"].append((ru2.ru_minflt - ru.ru_minflt) / iters)
                usage[name]["sys_s"].append(round((ru2.ru_stime - ru.ru_stime) / iters, 4))
    return out


def chunked_rate(step: Callable[[], Any], sync: Callable[[Any], Any], batch: int, seconds: float,
                 chunk: int) -> tuple[float, int]:
    """Runs ``step`` for ``seconds`` in chunks of ``chunk`` calls, each ended by ``sync``:
    (median examples/s over the chunks, steps run)."""
    rates, steps, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(chunk):
            out = step()
        sync(out)
        rates.append(chunk * batch / (time.perf_counter() - t0))
        steps += chunk
    return statistics.median(rates), steps


def rate_summary(seconds_per_call: list[float], examples_per_call: int, usage: dict | None = None,
                 per: str = "call") -> dict[str, Any]:
    """Median (the figure) and best examples/s of timed blocks, with the raw blocks; with
    ``usage`` (one function's of ``time_interleaved``), its medians as ``<key>_per_<per>``."""
    med = statistics.median(seconds_per_call)
    return {"ex_per_s": examples_per_call / med, "best_ex_per_s": examples_per_call /
            min(seconds_per_call), "s_per_call_blocks": [round(s, 5) for s in seconds_per_call],
            **{f"{k}_per_{per}": statistics.median(v) for k, v in (usage or {}).items()}}


def matmul_probe(n: int, dtype: str = "float32") -> tuple[Callable[[], Any], float]:
    """``(call, flops)``: a compiled ``n x n @ n x n`` XLA product and its FLOPs; its rate is the
    MFU denominator, the limit the hardware reaches through the same compiler."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(jnp.dot)
    jax.block_until_ready(mm(a, a))
    return (lambda: mm(a, a)), 2.0 * n**3


def matmul_flops(n: int = 2048, repeats: int = 7, dtype: str = "float32") -> dict[str, Any]:
    """The probe's FLOP/s: median over ``repeats`` products."""
    import jax

    call, flops = matmul_probe(n, dtype)
    secs = time_interleaved({"mm": call}, repeats, 1, jax.block_until_ready)["mm"]
    return {"n": n, "dtype": dtype, "flops_per_s": flops / statistics.median(secs),
            "s_blocks": [round(t, 5) for t in secs]}


def layer_flops(n: int, d: int, f: int, queries: int | None = None) -> float:
    """Forward FLOPs of one transformer layer of width ``d``, MLP width ``f``, over ``n`` tokens,
    computing the outputs of ``queries`` of them (all when None): keys and values for all n,
    the rest for the queries. ``2n(4d^2 + 2df) + 4n^2 d`` when every position is computed."""
    q = n if queries is None else queries
    return 4 * n * d * d + 2 * q * (2 * d * d + 2 * d * f) + 4 * q * n * d


def train_flops_per_example(text: Any, seq: int, batch: int, relations: tuple[int, int],
                            vision: Any = None, image_size: int = 0, fusion: int = 2,
                            proj: int = 256, pruned: bool = True,
                            object_tails: bool = False) -> float:
    """Training FLOPs per example: text layers over ``seq`` tokens; with ``vision`` (a config, as
    ``text``: dataclass or HF dict) patch embedding, layers over ``T = N + 1`` tokens, projection
    ``2T dv d``; ``fusion`` layers over all; pair head; relation projection ``2RK Dd P / batch``.
    ``pruned``: the last fusion layer at the two markers (plus the image tokens when the batch has
    object-tail fields, ``object_tails``), as roc_jax computes it; the field's code computes all.
    """
    def _dim(cfg: Any, key: str) -> int:
        return cfg[key] if isinstance(cfg, dict) else getattr(cfg, key)

    d, f = _dim(text, "hidden_size"), _dim(text, "intermediate_size")
    r, k = relations
    fwd = _dim(text, "num_hidden_layers") * layer_flops(seq, d, f)
    tokens, t = seq, 0
    if vision is not None:
        dv, fv, p = (_dim(vision, k) for k in ("hidden_size", "intermediate_size", "patch_size"))
        patches = (image_size // p) ** 2
        t = patches + 1
        fwd += 2 * patches * 3 * p * p * dv + _dim(vision, "num_hidden_layers") * layer_flops(
            t, dv, fv) + 2 * t * dv * d
        tokens += t
    queries = (2 + (t if object_tails else 0)) if pruned else None
    fwd += (fusion - 1) * layer_flops(tokens, d, f) + layer_flops(tokens, d, f, queries)
    fwd += 2 * (2 * d * d + d * proj) + 2 * r * proj + 2 * r * k * d * proj / batch
    return 3 * fwd


def jax_train_step(model: Any, batch: dict[str, np.ndarray], relations: dict[str, np.ndarray],
                   devices: Any = None) -> tuple[Callable[[], Any], dict[str, Any]]:
    """``(step, js)``: ``step() -> loss`` runs the library's jitted, donated train step on
    ``batch`` over ``devices`` (all when None); ``js``: the trainer, state, batch and relations."""
    from roc_jax import parallel
    from roc_jax.train_lib import make_trainer

    mesh = parallel.make_mesh(devices)
    trainer, state = make_trainer(model, TRAIN_CFG, total_steps=100_000, mesh=mesh)
    js = {"trainer": trainer, "state": state, "batch": parallel.shard_batch(batch, mesh),
          "rel": parallel.replicate(relations, mesh)}

    def step() -> Any:
        js["state"], out = trainer.train_step(js["state"], js["batch"], js["rel"])
        return out["loss"]

    return step, js


def synthetic_batch(batch: int, seq: int, image_size: int = 0, relations: int = 23, seed: int = 0,
                    object_tail_fields: bool = True) -> dict[str, np.ndarray]:
    """A Batch (docs/architecture.md) with real-looking lengths (the values do not change the
    cost); every row has an image when ``image_size`` > 0. ``object_tail_fields``: empty
    ``tail_box``/``tail_is_object``, as the pipeline gives MNRE batches."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    out = {
        "input_ids": np.where(mask, rng.integers(1000, 30000, (batch, seq)), 0).astype(np.int32),
        "attention_mask": mask,
        "head_index": rng.integers(1, seq // 4, size=batch).astype(np.int32),
        "tail_index": rng.integers(seq // 4, seq // 2, size=batch).astype(np.int32),
        "has_image": np.full(batch, image_size > 0),
        "label": rng.integers(0, relations, size=batch).astype(np.int32),
        "mask": np.ones(batch, bool),
    }
    out["input_ids"][:, 0] = 101  # [CLS]
    if object_tail_fields:
        out["tail_box"] = np.zeros((batch, 4), np.float32)
        out["tail_is_object"] = np.zeros(batch, bool)
    if image_size:
        out["pixel_values"] = rng.standard_normal((batch, image_size, image_size, 3)).astype(
            np.float32)
    return out


def synthetic_relations(relations: int = 23, descriptions: int = 5, dim: int = 384, seed: int = 1
                        ) -> dict[str, np.ndarray]:
    """Description embeddings ``[R, K, D]`` and their mask, as the description cache holds them
    (23 MNRE relations x 5 descriptions); the values do not change the cost."""
    rng = np.random.default_rng(seed)
    return {"embeddings": rng.standard_normal((relations, descriptions, dim)).astype(np.float32),
            "mask": np.ones((relations, descriptions), bool)}


def torch_batch(batch: dict[str, np.ndarray], device: Any = "cpu") -> dict[str, Any]:
    """``batch`` as torch tensors on ``device``: integer indices as int64, images NCHW."""
    import torch

    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v)).to(device)
        if k in ("input_ids", "head_index", "tail_index", "label"):
            t = t.long()
        if k == "pixel_values":
            t = t.permute(0, 3, 1, 2).contiguous()
        out[k] = t
    return out


def op_category(op_name: str) -> tuple[str, str]:
    """(category, phase) of an HLO instruction from its JAX ``op_name`` metadata."""
    if any(k in op_name for k in ("dropout_keep_mask", "threefry", "_bernoulli", "_uniform",
                                  "random_bits", "rng_bit_generator")):
        cat = "dropout masks (random bits)"
    else:
        last = op_name.rsplit("/", 1)[-1]
        cat = {"dot_general": "matmul (dot_general)", "erfc": "gelu (erf)", "erf": "gelu (erf)",
               "exp": "softmax exp", "select_n": "select (dropout apply, masks)",
               "transpose": "transpose/copy", "copy": "transpose/copy"}.get(last, f"other: {last}")
    phase = ("backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name
             else "optimizer and rest")
    return cat, phase


def traced_op_times(compiled_hlo: str, call: Callable[[], Any], steps: int
                    ) -> tuple[float, dict[str, collections.Counter]]:
    """``steps`` calls of ``call`` (a compiled JAX computation whose HLO text is ``compiled_hlo``)
    under ``jax.profiler``: the wall seconds per call and the nanoseconds per call of the XLA op
    events on the worker threads, summed by ``"category"`` and ``"phase"`` (``op_category``) and
    by ``"op"``: (event name, the op's JAX ``op_name``)."""
    import jax

    names = dict(re.findall(r'^\s*%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"',
                            compiled_hlo, flags=re.M))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t0 = time.perf_counter()
        jax.block_until_ready([call() for _ in range(steps)])
        wall = (time.perf_counter() - t0) / steps
        jax.profiler.stop_trace()
        data = jax.profiler.ProfileData.from_file(str(next(Path(tmp).rglob("*.xplane.pb"))))
    sums = {k: collections.Counter() for k in ("category", "phase", "op")}
    for e in (e for p in data.planes for ln in p.lines if ln.name.startswith("tf_XLA")
              for e in ln.events if not e.name.startswith(("ThunkExec", "SlinkyThread"))):
        op = names.get(e.name.removeprefix("end: "), "?")
        for key, value in zip(sums, (*op_category(op), (e.name, op)), strict=True):
            sums[key][value] += e.duration_ns / steps
    return wall, sums
