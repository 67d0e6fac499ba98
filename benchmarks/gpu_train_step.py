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
  relation projection 2*R*K*Dd*P per step (divided by the batch).
MFU is that count times examples/s over the card's dense bf16 peak (H100/H200 SXM: 989 TFLOP/s),
and also over the bf16 matmul throughput this run measures (8192^3 product).

Run through ``benchmarks/gpu.sh``; it writes ``benchmarks/results/gpu-<card>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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


def layer_flops(n: int, d: int, f: int) -> float:
    return 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d


def flops_per_example(seq: int, batch: int) -> float:
    d, f = TEXT["hidden_size"], TEXT["intermediate_size"]
    dv, fv, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]
    patches = (VISION["image_size"] // p) ** 2
    t = patches + 1
    fwd = TEXT["num_hidden_layers"] * layer_flops(seq, d, f)
    fwd += 2 * patches * 3 * p * p * dv + VISION["num_hidden_layers"] * layer_flops(t, dv, fv)
    fwd += 2 * t * dv * d
    fwd += FUSION * layer_flops(seq + t, d, f)
    fwd += 2 * (2 * d * d + d * PROJ) + 2 * R * PROJ + 2 * R * K * d * PROJ / batch
    return 3 * fwd


def synthetic_batch(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    return {
        "input_ids": (rng.integers(1000, 30000, size=(batch, seq)) * mask).astype(np.int32),
        "attention_mask": mask,
        "head_index": rng.integers(1, seq // 4, size=batch).astype(np.int32),
        "tail_index": rng.integers(seq // 4, seq // 2, size=batch).astype(np.int32),
        "pixel_values": rng.standard_normal((batch, 224, 224, 3)).astype(np.float32),
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


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from roc_jax import parallel
    from roc_jax.models.bert import BertConfig, BertEncoder
    from roc_jax.models.roc import ROC, ROCConfig
    from roc_jax.models.vit import ViT, ViTConfig
    from roc_jax.train_lib import make_trainer

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    rngs = nnx.Rngs(params=0, dropout=1)
    tcfg = BertConfig.from_hf(TEXT)
    vcfg = ViTConfig.from_hf(VISION)
    model = ROC(ROCConfig(num_relations=R, description_dim=tcfg.hidden_size, fusion_layers=FUSION,
                          proj_dim=PROJ, skip_vision_without_images=False),
                BertEncoder(tcfg, dtype=dtype, rngs=rngs), ViT(vcfg, dtype=dtype, rngs=rngs),
                image_dim=vcfg.hidden_size, dtype=dtype, rngs=rngs)
    mesh = parallel.make_mesh()
    train_cfg = types.SimpleNamespace(lr_encoder=1e-5, lr_head=1e-3, warmup_ratio=0.1,
                                      weight_decay=0.01, grad_clip=1.0)
    trainer, state = make_trainer(model, train_cfg, total_steps=100_000, mesh=mesh)
    batch = parallel.shard_batch(synthetic_batch(args.batch, args.seq), mesh)
    rng = np.random.default_rng(1)
    relations = parallel.replicate(
        {"embeddings": rng.standard_normal((R, K, tcfg.hidden_size)).astype(np.float32),
         "mask": np.ones((R, K), bool)}, mesh)
    holder = {"state": state}

    def step():
        holder["state"], out = trainer.train_step(holder["state"], batch, relations)
        return out["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(step())
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax.block_until_ready(step())
    rate, steps = chunked_rate(step, jax.block_until_ready, args.batch, args.seconds, args.chunk)
    loss = float(step())
    # The card's bf16 matmul throughput, measured the same way for the MFU denominator.
    n = args.matmul
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    jax.block_until_ready(mm(a))
    t0 = time.perf_counter()
    for _ in range(10):
        out = mm(a)
    jax.block_until_ready(out)
    matmul = 10 * 2 * n**3 / (time.perf_counter() - t0)
    return {"ex_per_s": rate, "steps": steps, "compile_s": compile_s, "final_loss": loss,
            "matmul_bf16_flops": matmul, "device_kind": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(), "jax": jax.__version__,
            "flax": __import__("flax").__version__}


def run_torch(args) -> dict:
    import torch
    from torch_roc import TorchROC, make_train_step
    from transformers import BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync(_=None):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    tcfg = BertConfig(**{k: v for k, v in TEXT.items() if k != "model_type"})
    vcfg = CLIPVisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"})
    model = TorchROC(BertModel(tcfg, add_pooling_layer=False), tcfg, CLIPVisionModel(vcfg),
                     vcfg.hidden_size, tcfg.hidden_size, FUSION, PROJ).to(dev).train()
    step_fn = make_train_step(model, bf16=args.dtype == "bfloat16")
    np_batch = synthetic_batch(args.batch, args.seq)
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
    rate, steps = chunked_rate(step, sync, args.batch, args.seconds, args.chunk)
    return {"ex_per_s": rate, "steps": steps, "final_loss": float(step()),
            "torch": torch.__version__, "attn": getattr(tcfg, "_attn_implementation", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=80)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=8192, help="side of the bf16 matmul probe")
    ap.add_argument("--out", default="")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()

    flops = flops_per_example(args.seq, args.batch)
    result = {"benchmark": "gpu_train_step", "setting": vars(args),
              "flops_per_example": flops, "model": {"text": TEXT, "vision": VISION, "relations": R,
                                                    "descriptions": K, "fusion_layers": FUSION},
              "host": {"platform": platform.platform(), "python": platform.python_version(),
                       "cpus": os.cpu_count()}}
    jx = run_jax(args)
    print(f"JAX   : {jx['ex_per_s']:.1f} ex/s ({jx['device_kind']}, compile {jx['compile_s']:.1f}s)",
          flush=True)
    result["jax"] = jx
    card = next((k for k in PEAK_BF16 if k in jx["device_kind"]), None)
    peak = PEAK_BF16.get(card) if card else None
    summary = {"card": jx["device_kind"], "jax_ex_per_s": jx["ex_per_s"],
               "mfu_vs_spec_peak": flops * jx["ex_per_s"] / peak if peak else None,
               "spec_peak_bf16_flops": peak,
               "mfu_vs_measured_matmul": flops * jx["ex_per_s"] / jx["matmul_bf16_flops"]}
    if not args.skip_torch:
        try:
            th = run_torch(args)
        except ImportError as e:  # torch or transformers missing on that machine
            th = {"error": f"PyTorch reference not run: {e}"}
        result["torch"] = th
        if "ex_per_s" in th:
            print(f"torch : {th['ex_per_s']:.1f} ex/s", flush=True)
            summary["torch_ex_per_s"] = th["ex_per_s"]
            summary["ratio_vs_torch"] = jx["ex_per_s"] / th["ex_per_s"]
            summary["torch_mfu_vs_spec_peak"] = flops * th["ex_per_s"] / peak if peak else None
    result["summary"] = summary
    print(json.dumps(summary, indent=1), flush=True)
    if args.out:
        name = args.out
        if name.endswith("/"):
            card_slug = (card or jx["device_kind"]).lower().replace(" ", "-")
            name = os.path.join(name, f"gpu-{card_slug}.json")
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(json.dumps(result, indent=1, default=float) + "\n")
        print(f"wrote {name}")
    assert math.isfinite(jx["final_loss"]), "non-finite loss in the JAX benchmark"


if __name__ == "__main__":
    main()
