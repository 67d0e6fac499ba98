"""CPU throughput of the full ROC train step: JAX next to PyTorch, and next to the hardware's limit.

Parts (``--parts``; each replaces its section of ``--out``): ``matmul``, XLA's float32 ``2048^3``
product (the MFU denominator); ``text``, the minilm-l6 train step at batch 32 x 64 (real weights,
synthetic batch and descriptions) against ``torch_roc.TorchROC`` with the same weights;
``multimodal``, the same with the dinov2-s14-offline tower at ``--image-size`` px; ``profile``,
the XLA ops' time by kind and phase in ``benchmarks/profiles/*_train_step.txt``. Each framework
runs in its own fresh processes, alternating for ``--rounds`` rounds (docs/performance.md).

    python benchmarks/train_step.py [--parts text,profile] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchlib  # noqa: E402

PARTS = ("matmul", "text", "multimodal", "profile")
PROFILES = ROOT / "benchmarks" / "profiles"
BATCH, LENGTH, FUSION, PROJ = 32, 64, 2, 256
# Each framework's processes run on its faster host-memory setting (docs/performance.md).
PROCESS_ENV = {"jax": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "torch": {"GLIBC_TUNABLES": ""}}
RELATIONS = benchlib.synthetic_relations()  # 23 MNRE relations x 5 descriptions, MiniLM's width


def build_roc(image: bool, seed: int = 0) -> tuple[Any, Any, Any]:
    """The ROC model with real minilm-l6 (and dinov2-s14-offline) weights: (model, tcfg, vcfg)."""
    from flax import nnx

    from roc_jax.models import weights
    from roc_jax.models.roc import ROC, ROCConfig

    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    text, _, tcfg = weights.load_text_encoder("minilm-l6", rngs=rngs)
    vision, _, vcfg = (weights.load_image_encoder("dinov2-s14-offline", rngs=rngs) if image
                       else (None, None, None))
    r, _, dim = RELATIONS["embeddings"].shape
    cfg = ROCConfig(num_relations=r, description_dim=dim, fusion_layers=FUSION, proj_dim=PROJ,
                    skip_vision_without_images=False)
    model = ROC(cfg, text, vision, image_dim=vcfg.hidden_size if vcfg else None,
                rngs=nnx.Rngs(params=seed + 4, dropout=seed + 5))
    return model, tcfg, vcfg


def head_name_map(model: Any) -> dict[str, tuple[tuple, str]]:
    """``TorchROC``'s fusion-layer and head tensor names -> (path in the JAX ROC, layout), in the
    form of ``roc_jax.models.weights``' name maps."""
    from roc_jax.models import weights

    one = weights.bert_name_map(dataclasses.replace(model.text.config, num_hidden_layers=1,
                                                    add_pooler=False))
    out = {f"fusion.{i}.{hf.removeprefix('encoder.layer.0.')}": (("fusion", i, *path[2:]), kind)
           for i in range(len(model.fusion)) for hf, (path, kind) in one.items()
           if hf.startswith("encoder.layer.0.")}
    image = ("image_proj", "image_type") if model.vision is not None else ()
    for name in ("pair_mlp", "pair_proj", "rel_proj", "pair_norm", "log_temperature", *image):
        w = ("scale", "id") if name == "pair_norm" else ("kernel", "linear")
        out |= {name: ((name,), "id")} if name in ("image_type", "log_temperature") else {
            f"{name}.weight": ((name, w[0]), w[1]), f"{name}.bias": ((name, "bias"), "id")}
    return out


def build_torch(jax_model: Any, vcfg: Any) -> Any:
    """``TorchROC`` over the same checkpoints as ``build_roc``; its fusion layers and heads are
    then loaded into ``jax_model`` (``weights.apply_weights``), so both hold the same weights."""
    import torch
    import transformers
    from torch_roc import TorchROC

    from roc_jax.models import weights

    torch.manual_seed(0)
    text = transformers.BertModel.from_pretrained(str(weights.resolve("minilm-l6")),
                                                  add_pooling_layer=False)
    vision = None if vcfg is None else transformers.Dinov2Model.from_pretrained(
        str(weights.resolve("dinov2-s14-offline")))
    model = TorchROC(text, text.config, vision, vcfg.hidden_size if vcfg else None,
                     jax_model.config.description_dim, FUSION, PROJ, pair_gelu="tanh")
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()
               if not k.startswith(("text.", "vision."))}
    weights.apply_weights(jax_model, tensors, head_name_map(jax_model), source="TorchROC",
                          allow_missing=("text.*", "vision.*"))
    return model


def side_child(args: argparse.Namespace) -> None:
    """One framework's step (and, for JAX, the matmul probe) in alternating blocks in this fresh
    process; prints one JSON line (blocks, page faults and kernel time, final loss, parity)."""
    import jax

    batch = benchlib.synthetic_batch(BATCH, LENGTH, image_size=args.image_size)
    model, tcfg, vcfg = build_roc(args.image_size > 0)
    out: dict[str, Any] = {"load_average": os.getloadavg(), "flops": {
        name: benchlib.train_flops_per_example(tcfg, LENGTH, BATCH, RELATIONS["mask"].shape, vcfg,
                                               args.image_size, FUSION, PROJ, pruned=pruned,
                                               object_tails=True)
        for name, pruned in (("jax", True), ("torch", False))}}
    fns: dict[str, Any] = {}
    if args.side == "torch":
        import torch
        from torch_roc import make_train_step

        torch.set_num_threads(os.cpu_count())
        tmodel = build_torch(model, vcfg).eval()
        _, js = benchlib.jax_train_step(model, batch, RELATIONS, jax.devices()[:1])  # parity
        ref = js["trainer"].eval_step(js["state"]["params"], js["batch"], js["rel"])["logits"]
        tb = benchlib.torch_batch(batch)
        rel = [torch.from_numpy(RELATIONS[k]) for k in ("embeddings", "mask")]
        with torch.no_grad():
            out["parity"] = float(np.max(np.abs(np.asarray(ref) - tmodel(tb, *rel).numpy())))
        fns["torch"] = functools.partial(make_train_step(tmodel.train()), tb, *rel)
        out["torch_num_threads"] = torch.get_num_threads()
        out["attn"] = tmodel.text.config._attn_implementation
    else:
        fns["jax"] = benchlib.jax_train_step(model, batch, RELATIONS, jax.devices()[:1])[0]
        out["compile_and_first_step_s"] = benchlib.timed(lambda: jax.block_until_ready(
            fns["jax"]()))[1]
        fns["matmul"] = benchlib.matmul_probe(args.matmul)[0]

    sync = jax.block_until_ready  # passes other leaves (PyTorch's loss) through
    for _ in range(args.warmup):
        for fn in fns.values():
            sync(fn())
    out["blocks"] = benchlib.time_interleaved(fns, args.repeats, args.iters, sync, (usage := {}))
    out["usage"] = usage[args.side]
    out["final_loss"] = float(fns[args.side]())
    print(json.dumps(out, default=float), flush=True)


def child(args: argparse.Namespace, side: str, image_size: int) -> dict[str, Any]:
    """Runs ``side_child`` in a fresh process; returns the JSON line it prints."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--image-size",
           str(image_size), *(f"--{k}={getattr(args, k)}" for k in ("repeats", "iters", "warmup",
                                                                    "matmul"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=1800,
                          env={**os.environ, **PROCESS_ENV[side]})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} process failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def compare(name: str, image_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """The JAX train step against the PyTorch one, each in its own processes, alternating; a
    side's figure is the median of all its timed blocks."""
    runs: dict[str, list[dict[str, Any]]] = {"jax": [], "torch": []}
    for rnd in range(args.rounds):
        for side in (("jax", "torch") if rnd % 2 == 0 else ("torch", "jax")):
            runs[side].append(child(args, side, image_size))
            rate = BATCH / statistics.median(runs[side][-1]["blocks"][side])
            print(f"[{name}] round {rnd} {side}: {rate:.2f} ex/s", flush=True)
    flops = runs["jax"][0]["flops"]
    res: dict[str, Any] = {"batch": BATCH, "length": LENGTH, "image_size": image_size,
                           "rounds": args.rounds, "flops_per_example": flops,
                           "process_env": PROCESS_ENV, "processes": runs,
                           **{k: runs["torch"][0][k] for k in ("parity", "attn",
                                                               "torch_num_threads")}}
    res["mfu_denominator_flops_per_s"] = peak = 2.0 * args.matmul**3 / statistics.median(
        t for c in runs["jax"] for t in c["blocks"]["matmul"])
    for side, children in runs.items():
        usage = {k: [v for c in children for v in c["usage"][k]] for k in ("minor_faults", "sys_s")}
        res[side] = benchlib.rate_summary([t for c in children for t in c["blocks"][side]], BATCH,
                                          usage, per="step")
        res[side]["final_loss"] = children[-1]["final_loss"]
        res[side]["mfu"] = flops[side] * res[side]["ex_per_s"] / peak
    res["ratio_vs_torch"] = res["jax"]["ex_per_s"] / res["torch"]["ex_per_s"]
    res["mfu"], res["torch_mfu"] = res["jax"]["mfu"], res["torch"]["mfu"]
    print(f"[{name}] jax {res['jax']['ex_per_s']:.2f} ex/s, torch {res['torch']['ex_per_s']:.2f}, "
          f"ratio {res['ratio_vs_torch']:.2f}, mfu {res['mfu']:.3f}", flush=True)
    return res


def profile(image_size: int, out_txt: Path, steps: int = 2) -> dict[str, Any]:
    """Traces ``steps`` train steps; sums the XLA ops' durations (over the worker threads) by
    category and phase; writes the table to ``out_txt``."""
    import jax

    model = build_roc(image=bool(image_size))[0]
    batch = benchlib.synthetic_batch(BATCH, LENGTH, image_size=image_size)
    step, js = benchlib.jax_train_step(model, batch, RELATIONS, jax.devices()[:1])
    trainer = js["trainer"]
    jax.block_until_ready(step())  # compile
    hlo = trainer.jit_train.lower(js["state"], js["batch"], js["rel"], trainer.rest).compile()
    wall, sums = benchlib.traced_op_times(hlo.as_text(), step, steps)
    by_cat, by_phase, by_op = sums["category"], sums["phase"], sums["op"]
    total = sum(by_cat.values())
    kind = f"multimodal (DINOv2-S/14 at {image_size} px)" if image_size else "text"
    lines = [f"JAX {kind} train step (minilm-l6, batch {BATCH} x {LENGTH}), jax.profiler trace "
             f"of {steps} steps; wall {wall:.2f} s/step; XLA op time summed over threads "
             f"{total / 1e9:.2f} s/step", "", "share of op time by category:"]
    lines += [f"  {v / total:6.1%}  {k}" for k, v in by_cat.most_common()]
    lines += ["", "by phase:", *(f"  {v / total:6.1%}  {k}" for k, v in by_phase.most_common()),
              "", "top 25 ops (name, share, op_name):", *(f"  {v / total:6.1%}  {n:32s} {o[:110]}"
                                                          for (n, o), v in by_op.most_common(25))]
    out_txt.parent.mkdir(parents=True, exist_ok=True)
    out_txt.write_text("\n".join(lines) + "\n")
    print(f"[profile] {kind}: {wall:.2f} s/step -> {out_txt}", flush=True)
    return {"wall_s_per_step": wall, "op_s_per_step_summed_over_threads": total / 1e9,
            "by_category": {k: round(v / total, 4) for k, v in by_cat.most_common()},
            "by_phase": {k: round(v / total, 4) for k, v in by_phase.most_common()},
            "summary_file": str(out_txt.relative_to(ROOT))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"a subset of {','.join(PARTS)}")
    for flag, default, help_ in (("rounds", 3, "JAX and PyTorch processes each"),
                                 ("repeats", 5, "timed blocks per process"),
                                 ("iters", 1, "steps per timed block"), ("warmup", 1, None),
                                 ("image-size", 112, None), ("matmul", 2048, "matmul probe side")):
        ap.add_argument(f"--{flag}", type=int, default=default, help=help_)
    ap.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)  # a child
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = ap.parse_args()
    if args.side:  # a child process of compare()
        return side_child(args)
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        raise SystemExit(f"--parts: unknown {sorted(set(parts) - set(PARTS))}; known: {PARTS}")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"benchmark": "train_step (CPU)"}
    host = benchlib.machine()
    runs = {"matmul": lambda: benchlib.matmul_flops(args.matmul),
            "text": lambda: compare("text", 0, args),
            "multimodal": lambda: compare("multimodal", args.image_size, args),
            "profile": lambda: {kind: profile(size, PROFILES / f"{kind}_train_step.txt")
                                for kind, size in (("text", 0), ("multimodal", args.image_size))}}
    for part in parts:
        result[part] = {**runs[part](), "setting": vars(args), "machine": host,
                        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t, m = result.get("text", {}), result.get("multimodal", {})
    result["summary"] = {f"{s}_ex_per_s": t.get(s, {}).get("ex_per_s") for s in ("jax", "torch")}
    result["summary"] |= {"ratio_vs_torch": t.get("ratio_vs_torch"), "mfu": t.get("mfu"),
                          "mm_ratio_vs_torch": m.get("ratio_vs_torch"), "mm_mfu": m.get("mfu")}
    print(json.dumps(result["summary"], indent=1), flush=True)
    benchlib.write_json(out, result)
    print(f"wrote {out}")
    for sec in {"text", "multimodal"} & set(parts):
        assert all(np.isfinite(result[sec][s]["final_loss"]) for s in ("jax", "torch")), sec


if __name__ == "__main__":
    main()
