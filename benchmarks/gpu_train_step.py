"""Paper-size ROC train step on a GPU/TPU: examples/s and MFU, JAX next to PyTorch.

The model has the shapes of the paper's setting (bert-base-uncased text tower, CLIP ViT-B/32 image
tower at 224 px, 2 fusion layers, 23 relations x 5 descriptions), random weights (throughput does
not depend on them), synthetic batches already on the device, bf16 compute with float32
parameters. Each framework trains for ``--seconds``; examples/s is the median over chunks of
``--chunk`` steps, each chunk ended by a device synchronisation.

FLOPs per example are analytic (matmuls only, a multiply-add = 2 FLOPs, training = 3x forward):
  transformer layer of width d, MLP width f, over n tokens:  2n(4d^2 + 2df) + 4n^2 d
  text: 12 layers over L tokens; image: patch embedding 2*N*(3p^2)*dv + 12 layers over T = N+1
  tokens, projection 2*T*dv*d; fusion: 2 layers over L+T tokens; pair head 2*(2d*d + d*P) + 2*R*P;
  relation projection 2*R*K*Dd*P per step (divided by the batch). roc_jax's last fusion layer
  computes the two marker positions alone (``prune_last_fusion_layer``; keys and values over all
  L+T tokens: 4nd^2 + 2q(2d^2 + 2df) + 4qnd for q = 2); PyTorch's (``TorchROC``, the field's
  code) every position. Each side's MFU counts the FLOPs it computes. Results measured before
  2026-11-27 11:00 UTC ran the JAX model over every position too.
MFU is that count times examples/s over the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s),
and also over the bf16 matmul throughput this run measures (8192^3 product).

``--attention fused`` runs attention through ``jax.nn.dot_product_attention`` (cuDNN flash
attention for bf16 on a GPU) instead of the reference einsums; the fused kernel has no dropout on
attention probabilities, so that variant trains with ``attention_probs_dropout_prob=0`` (recorded
in the results). ``--sweep`` runs several (batch, dtype, attention) variants and PyTorch once per
batch size in one process, within ``--budget`` seconds, writing the results file after each one;
the per-variant compiled HLO's op counts (convert, transpose, ...) go with each JAX variant.
``--tiny`` shrinks the model to a few-second CPU smoke test.

Run through ``benchmarks/gpu.sh``; it writes ``benchmarks/results/gpu-<card>.json``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import gzip
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12}

TEXT = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12,
            num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
            type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12)
VISION = dict(model_type="clip_vision_model", hidden_size=768, intermediate_size=3072,
              num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=32,
              hidden_act="quick_gelu", layer_norm_eps=1e-5)
R, K, FUSION, PROJ = 23, 5, 2, 256
# --tiny: the same architecture shrunk for a few-second CPU smoke test of this script.
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 4}
TINY_VISION = {**TINY, "image_size": 32, "patch_size": 16}

# A --sweep's variants per batch size: (dtype, attention); "torch" is the PyTorch reference in
# --dtype. Without --batches they run in SWEEP_ORDER, most telling first, so a tight --budget
# drops the least useful ones: batch 256 (where JAX trailed PyTorch) einsum vs fused vs PyTorch,
# then float32 (is bf16 itself slow?), then batch 32.
SWEEP = [("bfloat16", "einsum"), ("bfloat16", "fused"), ("torch", ""), ("float32", "einsum")]
SWEEP_ORDER = [(256, "bfloat16", "einsum"), (256, "bfloat16", "fused"), (256, "torch", ""),
               (256, "float32", "einsum"), (32, "bfloat16", "fused"), (32, "torch", ""),
               (32, "bfloat16", "einsum"), (32, "float32", "einsum")]


def model_dicts(tiny: bool) -> tuple[dict, dict]:
    """The text and vision config dicts (HF ``config.json`` style) of the benchmarked model."""
    return ({**TEXT, **TINY}, {**VISION, **TINY_VISION}) if tiny else (TEXT, VISION)


def layer_flops(n: int, d: int, f: int, queries: int | None = None) -> float:
    """One layer over n tokens with the outputs of ``queries`` of them (all when None)."""
    q = n if queries is None else queries
    return 4 * n * d * d + 2 * q * (2 * d * d + 2 * d * f) + 4 * q * n * d


def flops_per_example(seq: int, batch: int, text: dict = TEXT, vision: dict = VISION,
                      pruned: bool = True) -> float:
    """``pruned``: roc_jax's last fusion layer at the two markers (the batches have no object
    tails); PyTorch's (``TorchROC``'s default, the field's code) computes every position."""
    d, f = text["hidden_size"], text["intermediate_size"]
    dv, fv, p = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
    patches = (vision["image_size"] // p) ** 2
    t = patches + 1
    fwd = text["num_hidden_layers"] * layer_flops(seq, d, f)
    fwd += 2 * patches * 3 * p * p * dv + vision["num_hidden_layers"] * layer_flops(t, dv, fv)
    fwd += 2 * t * dv * d
    fwd += (FUSION - 1) * layer_flops(seq + t, d, f)
    fwd += layer_flops(seq + t, d, f, 2 if pruned else None)
    fwd += 2 * (2 * d * d + d * PROJ) + 2 * R * PROJ + 2 * R * K * d * PROJ / batch
    return 3 * fwd


_HLO_OP = re.compile(r"=\s*(?:\([^=]*?\)|\S+)\s+([a-z][a-z0-9-]*)\(")


def hlo_op_counts(hlo: str) -> dict:
    """Op counts of a compiled module's HLO text and its custom-call targets.

    ``ops`` counts every instruction (fusion bodies included); ``entry_ops`` only the ENTRY
    computation's, where on a GPU each fusion, custom call and unfused convert/transpose/copy is
    a kernel of its own. convert/transpose/copy locate dtype and layout shuffling (the suspects
    for a slow bf16 step); custom-call targets show which GEMM and attention kernels XLA chose.
    """
    keep = ("convert", "transpose", "copy", "fusion", "custom-call", "dot", "reduce",
            "all-reduce", "bitcast", "broadcast", "while")
    entry = hlo[hlo.find("\nENTRY "):] if "\nENTRY " in hlo else ""
    entry = entry[:entry.find("\n}") + 1] if "\n}" in entry else entry
    ops = collections.Counter(_HLO_OP.findall(hlo))
    entry_ops = collections.Counter(_HLO_OP.findall(entry))
    targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
    return {"ops": {k: ops.get(k, 0) for k in keep},
            "entry_ops": {k: entry_ops.get(k, 0) for k in keep},
            "entry_instructions": sum(entry_ops.values()),
            "custom_call_targets": dict(targets), "hlo_chars": len(hlo)}


def synthetic_batch(batch: int, seq: int, seed: int = 0,
                    image_size: int = 224) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (rng.integers(1000, 30000, size=(batch, seq)) * mask).astype(np.int32),
        "attention_mask": mask,
        "head_index": rng.integers(1, seq // 4, size=batch).astype(np.int32),
        "tail_index": rng.integers(seq // 4, seq // 2, size=batch).astype(np.int32),
        "pixel_values": rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32),
        "has_image": np.ones(batch, bool),
        "label": rng.integers(0, R, size=batch).astype(np.int32),
        "mask": np.ones(batch, bool),
    }


def chunked_rate(step, sync, batch: int, seconds: float, chunk: int) -> tuple[float, int]:
    rates, steps, start = [], 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(chunk):
            out = step()
        sync(out)
        rates.append(chunk * batch / (time.perf_counter() - t0))
        steps += chunk
    return statistics.median(rates), steps


KERNEL_CLASSES = (  # (class, substrings of a GPU kernel's name), first match wins
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "attention")),
    ("matmul", ("gemm", "cublas", "cutlass", "nvjet", "xmma", "wgmma", "matmul", "dot")),
    ("copy/transpose", ("memcpy", "memset", "copy", "transpose")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)), "other")


def breakdown(times: dict[str, float], steps: int) -> dict:
    """Per-step GPU kernel time (ms) by class and the 25 costliest kernels."""
    by_class: dict[str, float] = collections.Counter()
    for name, us in times.items():
        by_class[kernel_class(name)] += us
    total = sum(times.values())
    top = sorted(times.items(), key=lambda kv: -kv[1])[:25]
    return {"steps": steps, "kernel_ms_per_step": total / steps / 1e3,
            "by_class_ms_per_step": {k: v / steps / 1e3 for k, v in
                                     sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms_per_step": [[n[:160], us / steps / 1e3] for n, us in top],
            "kernels": len(times)}


def profile_jax(step, sync, steps: int, log_dir: str) -> dict:
    """GPU kernel times of ``steps`` steps from a jax.profiler (perfetto) trace."""
    import glob

    import jax

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(steps):
            out = step()
        sync(out)
    files = sorted(glob.glob(os.path.join(log_dir, "**", "*perfetto_trace.json.gz"),
                             recursive=True))
    if not files:
        return {"error": f"no perfetto trace under {log_dir}"}
    with gzip.open(files[-1], "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in procs.items() if "gpu" in name.lower() or "/device:" in name}
    gpu = gpu or {pid for pid, name in procs.items() if "host" not in name.lower()}
    times: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu:
            times[e.get("name", "?")] += float(e.get("dur", 0.0))
    res = breakdown(times, steps)
    res["trace"] = files[-1]
    res["processes"] = sorted(set(procs.values()))[:20]
    return res


def profile_torch(step, sync, steps: int) -> dict:
    """GPU kernel times of ``steps`` steps from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    times: dict[str, float] = collections.Counter()
    for evt in prof.key_averages():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            times[evt.key] += float(getattr(evt, "self_device_time_total", 0.0))
    return breakdown(times, steps)


def _jit_parts(train_step) -> tuple:
    """The jitted step and its ``rest`` argument behind ``Trainer.train_step``'s lambda.

    The benchmark compiles that function ahead of time (``lower().compile()``) to time the
    compile and read its HLO, then runs the compiled executable: one compile, not two.
    """
    cells = dict(zip(train_step.__code__.co_freevars,
                     (c.cell_contents for c in train_step.__closure__ or ()), strict=True))
    return cells["jit_train"], cells["rest"]


def measure_matmul(n: int) -> float:
    """The card's bf16 matmul throughput (FLOP/s) on an ``n^3`` product, the MFU denominator."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    t0 = time.perf_counter()
    for _ in range(10):
        out = mm(a)
    jax.block_until_ready(out)
    return 10 * 2 * n**3 / (time.perf_counter() - t0)


def run_jax(args, batch_size: int, dtype_name: str, attention: str, seconds: float,
            hlo_path: str | None = None) -> dict:
    """Trains the JAX model for ``seconds``; examples/s, compile time and the HLO op counts."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from roc_jax import parallel
    from roc_jax.models.bert import BertConfig, BertEncoder
    from roc_jax.models.layers import fused_attention_backend
    from roc_jax.models.roc import ROC, ROCConfig
    from roc_jax.models.vit import ViT, ViTConfig
    from roc_jax.train_lib import make_trainer

    text, vision = model_dicts(args.tiny)
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    rngs = nnx.Rngs(params=0, dropout=1)
    tcfg = BertConfig.from_hf(text)
    vcfg = ViTConfig.from_hf(vision)
    if attention != "einsum":
        # The fused kernel has no attention-probability dropout (MultiHeadAttention refuses it).
        tcfg = dataclasses.replace(tcfg, attention_impl=attention, attention_probs_dropout_prob=0.0)
        vcfg = dataclasses.replace(vcfg, attention_impl=attention, attention_probs_dropout_prob=0.0)
    model = ROC(ROCConfig(num_relations=R, description_dim=tcfg.hidden_size, fusion_layers=FUSION,
                          proj_dim=PROJ, skip_vision_without_images=False),
                BertEncoder(tcfg, dtype=dtype, rngs=rngs), ViT(vcfg, dtype=dtype, rngs=rngs),
                image_dim=vcfg.hidden_size, dtype=dtype, rngs=rngs)
    mesh = parallel.make_mesh()
    train_cfg = types.SimpleNamespace(lr_encoder=1e-5, lr_head=1e-3, warmup_ratio=0.1,
                                      weight_decay=0.01, grad_clip=1.0)
    trainer, state = make_trainer(model, train_cfg, total_steps=100_000, mesh=mesh)
    del model
    batch = parallel.shard_batch(
        synthetic_batch(batch_size, args.seq, image_size=vision["image_size"]), mesh)
    rng = np.random.default_rng(1)
    relations = parallel.replicate(
        {"embeddings": rng.standard_normal((R, K, tcfg.hidden_size)).astype(np.float32),
         "mask": np.ones((R, K), bool)}, mesh)
    holder = {"state": state}
    del state
    extra: dict = {}

    t0 = time.perf_counter()
    try:
        jit_train, rest = _jit_parts(trainer.train_step)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # Trainer changed shape
        extra["hlo_error"] = f"no AOT compile, HLO not read: {e!r}"

        def call(st):
            return trainer.train_step(st, batch, relations)
    else:
        compiled = jit_train.lower(holder["state"], rest, batch, relations).compile()
        hlo = compiled.as_text()
        extra["hlo"] = hlo_op_counts(hlo)
        if hlo_path:
            Path(hlo_path).parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(hlo_path, "wt") as f:
                f.write(hlo)
            extra["hlo_file"] = hlo_path

        def call(st):
            return compiled(st, rest, batch, relations)

    def step():
        holder["state"], out = call(holder["state"])
        return out["loss"]

    jax.block_until_ready(step())
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(step())
    rate, steps = chunked_rate(step, jax.block_until_ready, batch_size, seconds, args.chunk)
    loss = float(step())
    if args.profile:
        extra["profile"] = profile_jax(step, jax.block_until_ready, 5,
                                         os.path.join(args.profile, "jax"))
    heads = tcfg.num_attention_heads
    head_dim = tcfg.hidden_size // heads
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    kernels = {"text": args.seq, "image": patches + 1, "fusion": args.seq + patches + 1}
    return {"ex_per_s": rate, "steps": steps, "compile_s": compile_s, "final_loss": loss,
            "batch": batch_size, "dtype": dtype_name, "attention": attention,
            "attention_dropout": {"text": tcfg.attention_probs_dropout_prob,
                                  "image": vcfg.attention_probs_dropout_prob},
            "fused_backend": ({k: fused_attention_backend(dtype, head_dim, n)
                               for k, n in kernels.items()} if attention == "fused" else None),
            "device_kind": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "flax": __import__("flax").__version__, **extra}


def run_torch(args, batch_size: int, seconds: float) -> dict:
    """Trains the PyTorch reference (HF BERT + CLIP vision, SDPA attention) for ``seconds``."""
    import torch
    from torch_roc import TorchROC, make_train_step
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync(_=None):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    text, vision = model_dicts(args.tiny)
    tcfg = BertConfig(**{k: v for k, v in text.items() if k != "model_type"})
    vcfg = CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    model = TorchROC(BertModel(tcfg, add_pooling_layer=False), tcfg, CLIPVisionModel(vcfg),
                     vcfg.hidden_size, tcfg.hidden_size, FUSION, PROJ).to(dev).train()
    step_fn = make_train_step(model, bf16=args.dtype == "bfloat16")
    np_batch = synthetic_batch(batch_size, args.seq, image_size=vision["image_size"])
    batch = {k: torch.from_numpy(v).to(dev) for k, v in np_batch.items()}
    batch["pixel_values"] = batch["pixel_values"].permute(0, 3, 1, 2).contiguous()
    batch = {k: (v.long() if k in ("input_ids", "head_index", "tail_index", "label") else v)
             for k, v in batch.items()}
    rng = np.random.default_rng(1)
    rel = torch.from_numpy(rng.standard_normal((R, K, tcfg.hidden_size)).astype(np.float32)).to(dev)
    rel_mask = torch.ones((R, K), dtype=torch.bool, device=dev)

    def step():
        return step_fn(batch, rel, rel_mask)

    for _ in range(args.warmup):
        step()
    sync()
    rate, steps = chunked_rate(step, sync, batch_size, seconds, args.chunk)
    out = {"ex_per_s": rate, "steps": steps, "final_loss": float(step()), "batch": batch_size,
           "dtype": args.dtype, "torch": torch.__version__,
           "attn": getattr(tcfg, "_attn_implementation", None)}
    if args.profile:
        out["profile"] = profile_torch(step, sync, 5)
    return out


def _short(dtype_name: str) -> str:
    return {"bfloat16": "bf16", "float32": "f32"}[dtype_name]


def write_results(result: dict, out: str, card_slug: str) -> None:
    """Writes ``result`` to ``out`` (a file, or a folder ending in '/': gpu-<card>.json)."""
    if not out:
        return
    name = os.path.join(out, f"gpu-{card_slug}.json") if out.endswith("/") else out
    Path(name).parent.mkdir(parents=True, exist_ok=True)
    Path(name).write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {name}", flush=True)


def sweep(args, result: dict, peak: float | None, matmul: float, card_slug: str) -> None:
    """Runs SWEEP in order within ``--budget`` seconds; the results file is rewritten after each.

    A variant that would not finish within the budget (estimated from the slowest compile so
    far) is recorded as skipped; one that fails (e.g. cuDNN refusing a shape) records its error
    and the sweep goes on.
    """
    text, vision = model_dicts(args.tiny)
    start, slowest_compile = time.perf_counter(), args.compile_guess
    variants, summary = result.setdefault("variants", {}), result["summary"]
    table = summary.setdefault("variants", {})
    runs = ([(b, d, a) for b in args.batches for d, a in SWEEP] if args.batches
            else SWEEP_ORDER)
    for batch_size, dtype_name, attention in runs:
        torch_run = dtype_name == "torch"
        if torch_run and args.skip_torch:
            continue
        key = (f"b{batch_size}_torch_{_short(args.dtype)}" if torch_run
               else f"b{batch_size}_jax_{attention}_{_short(dtype_name)}")
        estimate = args.seconds + (20 if torch_run else slowest_compile + 10)
        elapsed = time.perf_counter() - start
        if elapsed + estimate > args.budget:
            variants[key] = table[key] = {"skipped": f"budget: {elapsed:.0f}s elapsed + "
                                                     f"~{estimate:.0f}s > {args.budget:.0f}s"}
            print(f"{key}: skipped (budget)", flush=True)
            continue
        try:
            if torch_run:
                res = run_torch(args, batch_size, args.seconds)
            else:
                hlo_path = (os.path.join(args.hlo_dir, f"hlo-{card_slug}-{key}.txt.gz")
                            if args.hlo_dir and attention == "einsum" else None)
                res = run_jax(args, batch_size, dtype_name, attention, args.seconds, hlo_path)
                slowest_compile = max(slowest_compile, res["compile_s"])
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
            res = {"error": f"{type(e).__name__}: {e}"[:2000]}
        gc.collect()
        if torch_run and "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()  # leave the memory to the next JAX variant
        variants[key] = res
        row = {k: res[k] for k in ("ex_per_s", "compile_s", "error", "attention_dropout")
               if k in res}
        if "ex_per_s" in res:
            flops = flops_per_example(args.seq, batch_size, text, vision,
                                      pruned=not key.startswith(f"b{batch_size}_torch"))
            row["mfu_vs_spec_peak"] = flops * res["ex_per_s"] / peak if peak else None
            row["mfu_vs_measured_matmul"] = flops * res["ex_per_s"] / matmul
            if "hlo" in res:
                for op in ("convert", "transpose"):
                    row[f"hlo_{op}"] = res["hlo"]["ops"][op]
                    row[f"hlo_entry_{op}"] = res["hlo"]["entry_ops"][op]
        table[key] = row
        print(f"{key}: {json.dumps(row)}", flush=True)
        # Ratios against PyTorch at the same batch size, once both are there.
        torch_key = f"b{batch_size}_torch_{_short(args.dtype)}"
        torch_rate = table.get(torch_key, {}).get("ex_per_s")
        for k, r in table.items():
            if k.startswith(f"b{batch_size}_jax_") and torch_rate and "ex_per_s" in r:
                r["ratio_vs_torch"] = r["ex_per_s"] / torch_rate
        _legacy_summary(args, result, peak, matmul)
        write_results(result, args.out, card_slug)
    _legacy_summary(args, result, peak, matmul)
    write_results(result, args.out, card_slug)  # the skipped ones too


def _legacy_summary(args, result: dict, peak: float | None, matmul: float) -> None:
    """The single-run summary keys (kept for the README) from the sweep's --batch/--dtype
    einsum variant and PyTorch at that batch size."""
    text, vision = model_dicts(args.tiny)
    flops = flops_per_example(args.seq, args.batch, text, vision)
    flops_torch = flops_per_example(args.seq, args.batch, text, vision, pruned=False)
    variants, summary = result["variants"], result["summary"]
    jx = variants.get(f"b{args.batch}_jax_einsum_{_short(args.dtype)}", {})
    th = variants.get(f"b{args.batch}_torch_{_short(args.dtype)}", {})
    summary["batch"] = args.batch
    if "ex_per_s" in jx:
        result["jax"] = {**jx, "matmul_bf16_flops": matmul}
        summary.update({"jax_ex_per_s": jx["ex_per_s"],
                        "mfu_vs_spec_peak": flops * jx["ex_per_s"] / peak if peak else None,
                        "mfu_vs_measured_matmul": flops * jx["ex_per_s"] / matmul})
    if "ex_per_s" in th:
        result["torch"] = th
        summary["torch_ex_per_s"] = th["ex_per_s"]
        summary["torch_mfu_vs_spec_peak"] = (flops_torch * th["ex_per_s"] / peak if peak
                                             else None)
        if "ex_per_s" in jx:
            summary["ratio_vs_torch"] = jx["ex_per_s"] / th["ex_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=80)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--attention", default="einsum", choices=["einsum", "fused"],
                    help="MultiHeadAttention.attention_impl (single run; a sweep runs both)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=8192, help="side of the bf16 matmul probe")
    ap.add_argument("--out", default="")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny model: CPU smoke test")
    ap.add_argument("--sweep", action="store_true",
                    help="run the SWEEP variants (batch sizes x dtype x attention, PyTorch)")
    ap.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")], default=None,
                    help="sweep: these batch sizes in order (comma separated), all of SWEEP for each; "
                         "default: SWEEP_ORDER (256 and 32)")
    ap.add_argument("--budget", type=float, default=480.0,
                    help="sweep: skip variants that would end after this many seconds")
    ap.add_argument("--compile-guess", type=float, default=80.0,
                    help="sweep: compile seconds assumed before the first one is measured")
    ap.add_argument("--profile", default="",
                    help="single run: trace 5 steps of each framework (jax.profiler under this folder, torch.profiler) and record GPU kernel time per step by class")
    ap.add_argument("--hlo-dir", default="",
                    help="sweep: write the einsum variants' compiled HLO here (gzip)")
    args = ap.parse_args()

    import jax

    text, vision = model_dicts(args.tiny)
    device_kind = jax.devices()[0].device_kind
    card = next((k for k in PEAK_BF16 if k in device_kind), None)
    card_slug = (card or device_kind).lower().replace(" ", "-")
    peak = PEAK_BF16.get(card) if card else None
    flops = flops_per_example(args.seq, args.batch, text, vision)
    flops_torch = flops_per_example(args.seq, args.batch, text, vision, pruned=False)
    result = {"benchmark": "gpu_train_step", "setting": vars(args),
              "flops_per_example": flops, "flops_per_example_torch": flops_torch, "model": {"text": text, "vision": vision, "relations": R,
                                                    "descriptions": K, "fusion_layers": FUSION},
              "host": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count()}}
    matmul = measure_matmul(args.matmul)
    summary = {"card": device_kind, "spec_peak_bf16_flops": peak, "matmul_bf16_flops": matmul}
    result["summary"] = summary
    if args.sweep:
        sweep(args, result, peak, matmul, card_slug)
        print(json.dumps(summary, indent=1), flush=True)
        failed = [k for k, v in result["variants"].items() if "error" in v]
        bad = [k for k, v in result["variants"].items()
               if "final_loss" in v and not math.isfinite(v["final_loss"])]
        assert not bad, f"non-finite loss in {bad}"
        if failed:
            print(f"variants that failed: {failed}", flush=True)
        return

    jx = run_jax(args, args.batch, args.dtype, args.attention, args.seconds)
    jx["matmul_bf16_flops"] = matmul
    print(f"JAX   : {jx['ex_per_s']:.1f} ex/s ({jx['device_kind']}, compile {jx['compile_s']:.1f}s)",
          flush=True)
    result["jax"] = jx
    summary.update({"jax_ex_per_s": jx["ex_per_s"],
                    "mfu_vs_spec_peak": flops * jx["ex_per_s"] / peak if peak else None,
                    "mfu_vs_measured_matmul": flops * jx["ex_per_s"] / matmul})
    if not args.skip_torch:
        try:
            th = run_torch(args, args.batch, args.seconds)
        except ImportError as e:  # torch or transformers missing on that machine
            th = {"error": f"PyTorch reference not run: {e}"}
        result["torch"] = th
        if "ex_per_s" in th:
            print(f"torch : {th['ex_per_s']:.1f} ex/s", flush=True)
            summary["torch_ex_per_s"] = th["ex_per_s"]
            summary["ratio_vs_torch"] = jx["ex_per_s"] / th["ex_per_s"]
            summary["torch_mfu_vs_spec_peak"] = (flops_torch * th["ex_per_s"] / peak if peak
                                                 else None)
    print(json.dumps(summary, indent=1), flush=True)
    write_results(result, args.out, card_slug)
    assert math.isfinite(jx["final_loss"]), "non-finite loss in the JAX benchmark"


if __name__ == "__main__":
    main()
