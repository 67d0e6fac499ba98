"""Paper-size ROC train step on a GPU: examples/s and MFU, JAX next to PyTorch, in one sweep.

bert-base and CLIP ViT-B/32 (224 px) shapes, 2 fusion layers, 23 x 5 descriptions, random weights,
synthetic 80-token batches on the device. Each variant of ``--runs``,
``b<batch>_jax_<einsum|fused>_<bf16|f32>`` (``fused``: cuDNN flash attention, trained without
attention dropout, which it lacks) or ``b<batch>_torch_bf16`` (``torch_roc.TorchROC``, SDPA,
autocast), trains ``--seconds`` after its compile (examples/s: the median over chunks of
``--chunk`` steps); one that would end after ``--budget`` seconds is skipped, one that fails
records its error; the file is rewritten after each. MFU: over the card's dense bf16 peak and
over the measured bf16 ``8192^3`` matmul rate.

    bash benchmarks/gpu.sh                       # writes benchmarks/results/gpu-<card>.json
    python benchmarks/gpu_train_step.py --tiny --seconds 1 --out /tmp/gpu.json   # CPU smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchlib  # noqa: E402

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
        "num_attention_heads": 4, "image_size": 32, "patch_size": 16}
RUNS = ("b256_jax_einsum_bf16", "b256_jax_fused_bf16", "b256_torch_bf16", "b256_jax_einsum_f32",
        "b32_jax_fused_bf16", "b32_torch_bf16", "b32_jax_einsum_bf16", "b32_jax_einsum_f32")


def batch_and_relations(args, batch_size: int) -> tuple[dict, dict]:
    text, vision = args.model
    return (benchlib.synthetic_batch(batch_size, args.seq, image_size=vision["image_size"],
                                     relations=R, object_tail_fields=False),
            benchlib.synthetic_relations(R, K, text["hidden_size"]))


def run_jax(args, batch_size: int, dtype_name: str, attention: str) -> dict:
    """Trains the JAX model for ``--seconds``: examples/s, compile time, final loss."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from roc_jax.models.bert import BertConfig, BertEncoder
    from roc_jax.models.roc import ROC, ROCConfig
    from roc_jax.models.vit import ViT, ViTConfig

    text, vision = args.model
    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[dtype_name]
    tcfg, vcfg = BertConfig.from_hf(text), ViTConfig.from_hf(vision)
    if attention != "einsum":  # the fused kernel has no attention-probability dropout
        tcfg, vcfg = (dataclasses.replace(c, attention_impl=attention,
                                          attention_probs_dropout_prob=0.0) for c in (tcfg, vcfg))
    rngs = nnx.Rngs(params=0, dropout=1)
    model = ROC(ROCConfig(num_relations=R, description_dim=tcfg.hidden_size, fusion_layers=FUSION,
                          proj_dim=PROJ, skip_vision_without_images=False),
                BertEncoder(tcfg, dtype=dtype, rngs=rngs), ViT(vcfg, dtype=dtype, rngs=rngs),
                image_dim=vcfg.hidden_size, dtype=dtype, rngs=rngs)
    step, _ = benchlib.jax_train_step(model, *batch_and_relations(args, batch_size))
    del model  # the trainer holds a copy of the parameters
    compile_s = benchlib.timed(lambda: jax.block_until_ready(step()))[1]
    for _ in range(args.warmup):
        jax.block_until_ready(step())
    rate, steps = benchlib.chunked_rate(step, jax.block_until_ready, batch_size, args.seconds,
                                        args.chunk)
    return {"ex_per_s": rate, "steps": steps, "compile_and_first_step_s": compile_s,
            "final_loss": float(step()), "attention_dropout": {
                "text": tcfg.attention_probs_dropout_prob,
                "image": vcfg.attention_probs_dropout_prob},
            "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count()}


def run_torch(args, batch_size: int) -> dict:
    """Trains the PyTorch reference (HF BERT + CLIP vision, SDPA attention, bf16 autocast)."""
    import torch
    from torch_roc import TorchROC, make_train_step
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync(_=None):
        return torch.cuda.synchronize() if dev.type == "cuda" else None

    text, vision = args.model
    tcfg = BertConfig(**{k: v for k, v in text.items() if k != "model_type"})
    vcfg = CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    model = TorchROC(BertModel(tcfg, add_pooling_layer=False), tcfg, CLIPVisionModel(vcfg),
                     vcfg.hidden_size, tcfg.hidden_size, FUSION, PROJ).to(dev).train()
    batch, rel = batch_and_relations(args, batch_size)
    step = functools.partial(make_train_step(model, bf16=True), benchlib.torch_batch(batch, dev),
                             *(torch.from_numpy(rel[k]).to(dev) for k in ("embeddings", "mask")))
    for _ in range(args.warmup + 1):
        step()
    sync()
    rate, steps = benchlib.chunked_rate(step, sync, batch_size, args.seconds, args.chunk)
    return {"ex_per_s": rate, "steps": steps, "final_loss": float(step()),
            "torch": torch.__version__, "attn": getattr(tcfg, "_attn_implementation", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS), help="variants, in order (see above)")
    for flag, default, help_ in (
            ("seconds", 12.0, "timed seconds per variant"), ("seq", 80, None), ("chunk", 10, None),
            ("warmup", 2, None), ("matmul", 8192, "side of the bf16 matmul probe"),
            ("budget", 480.0, "skip variants that would end after this many seconds")):
        ap.add_argument(f"--{flag}", type=type(default), default=default, help=help_)
    ap.add_argument("--tiny", action="store_true", help="a tiny model: CPU smoke test")
    ap.add_argument("--out", default="benchmarks/results/",
                    help="a file, or a folder ending in '/' (then gpu-<card>.json in it)")
    args = ap.parse_args()

    import jax

    # The text and vision config dicts (HF config.json style) of the benchmarked model.
    tiny = TINY if args.tiny else {}
    text, vision = args.model = {**TEXT, **tiny}, {**VISION, **tiny}
    device_kind = jax.devices()[0].device_kind
    card = next((k for k in PEAK_BF16 if k in device_kind), None)
    out = Path(args.out) / f"gpu-{(card or device_kind).lower().replace(' ', '-')}.json" \
        if args.out.endswith("/") else Path(args.out)
    peak = PEAK_BF16.get(card)
    matmul = benchlib.matmul_flops(args.matmul, dtype="bfloat16")["flops_per_s"]
    setting = {k: v for k, v in vars(args).items() if k != "model"}
    result = {"benchmark": "gpu_train_step", "setting": setting, "machine": benchlib.machine(),
              "model": {"text": text, "vision": vision, "relations": R, "descriptions": K,
                        "fusion_layers": FUSION},
              "summary": {"card": device_kind, "spec_peak_bf16_flops": peak,
                          "matmul_bf16_flops": matmul, "variants": {}},
              "variants": {}, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    table = result["summary"]["variants"]
    start, slowest_compile = time.perf_counter(), 80.0  # compile seconds until one is measured
    for key in args.runs.split(","):
        batch_size, framework, *rest = key.removeprefix("b").split("_")
        batch_size = int(batch_size)
        estimate = args.seconds + (20 if framework == "torch" else slowest_compile + 10)
        elapsed = time.perf_counter() - start
        if elapsed + estimate > args.budget:
            result["variants"][key] = table[key] = {"skipped": f"budget: {elapsed:.0f}s elapsed "
                                                    f"+ ~{estimate:.0f}s > {args.budget:.0f}s"}
            print(f"{key}: skipped (budget)", flush=True)
            continue
        try:
            if framework == "torch":
                res = run_torch(args, batch_size)
            else:
                res = run_jax(args, batch_size, rest[1], rest[0])
                slowest_compile = max(slowest_compile, res["compile_and_first_step_s"])
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others
            res = {"error": f"{type(e).__name__}: {e}"[:2000]}
        gc.collect()
        torch = sys.modules.get("torch")
        if framework == "torch" and torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()  # leave the memory to the next JAX variant
        result["variants"][key] = res
        row = {k: res[k] for k in ("ex_per_s", "error", "attention_dropout") if k in res}
        if "ex_per_s" in res:
            flops = benchlib.train_flops_per_example(text, args.seq, batch_size, (R, K), vision,
                                                     vision["image_size"], FUSION, PROJ,
                                                     pruned=framework == "jax")
            row["flops_per_example"] = flops
            row["mfu_vs_spec_peak"] = flops * res["ex_per_s"] / peak if peak else None
            row["mfu_vs_measured_matmul"] = flops * res["ex_per_s"] / matmul
        table[key] = row
        print(f"{key}: {json.dumps(row)}", flush=True)
        torch_rate = table.get(f"b{batch_size}_torch_bf16", {}).get("ex_per_s")
        for k, r in table.items():  # ratios against PyTorch at the same batch, once both exist
            if k.startswith(f"b{batch_size}_jax_") and torch_rate and "ex_per_s" in r:
                r["ratio_vs_torch"] = r["ex_per_s"] / torch_rate
        benchlib.write_json(out, result)
    print(json.dumps(result["summary"], indent=1), f"\nwrote {out}", flush=True)
    bad = [k for k, v in result["variants"].items()
           if "final_loss" in v and not math.isfinite(v["final_loss"])]
    assert not bad, f"non-finite loss in {bad}"


if __name__ == "__main__":
    main()
