"""Forward throughput of the Flax BERT encoder vs transformers' BertModel (same weights, MiniLM-L6,
float32, CPU, batch ``--batch`` x 64), and MNRE-2 val (text only, ``--mnre``) evaluated by the
library (``train_lib.evaluate`` over its eval batches) vs ``torch_roc.TorchROC`` with the same
weights on the same batches. The sides' blocks alternate in one process; a figure is the median
block. ``--profile``: the forward's XLA op time by kind in ``profiles/encoder_forward.txt``.
``dense_products``: each dense product of the forward alone (XLA vs ``torch.nn.functional.linear``).

    python benchmarks/encoders.py --mnre DIR [--repeats 9] [--iters 5] [--eval-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LENGTH = 64
PROFILE = Path(__file__).resolve().parent / "profiles" / "encoder_forward.txt"


def profile(fn, args: tuple, title: str, steps: int = 5) -> None:
    """Op time of ``steps`` traced calls of the jitted ``fn`` by kind, as ``train_step.py``."""
    wall, sums = benchlib.traced_op_times(fn.lower(*args).compile().as_text(),
                                          lambda: fn(*args), steps)
    t = sum(sums["category"].values())
    rows = [*sums["category"].most_common(20),
            *((f"{name:28s} {op[:90]}", ns) for (name, op), ns in sums["op"].most_common(20))]
    PROFILE.write_text("\n".join([f"{title}: {steps} calls, wall {wall * 1e3:.0f} ms/call, XLA op "
                                  f"time over threads {t / 1e6:.0f} ms/call; by kind, then top 20 "
                                  "ops:", *(f"  {v / t:6.1%}  {k}" for k, v in rows)]) + "\n")


def dense_products(tokens: int, repeats: int, iters: int) -> dict:
    """GFLOP/s of the forward's three dense shapes ``[tokens, K] . [K, N] + b``, both sides."""
    import torch
    import torch.nn.functional as F

    out, f = {}, jax.jit(lambda x, w, b: x @ w + b)
    for k, n in ((384, 1536), (1536, 384), (384, 384)):
        x = np.random.default_rng(0).standard_normal((tokens, k), np.float32)
        w = np.random.default_rng(1).standard_normal((k, n), np.float32)
        j = jnp.asarray(x), jnp.asarray(w), jnp.zeros(n)
        t = torch.from_numpy(x), torch.from_numpy(w.T.copy()), torch.zeros(n)
        fns = {"jax": lambda j=j: f(*j).block_until_ready(), "torch": lambda t=t: F.linear(*t)}
        with torch.inference_mode():
            benchlib.time_interleaved(fns, 1, 1)  # compile and warm up both sides
            blocks = benchlib.time_interleaved(fns, repeats, iters)
        out[f"{k}x{n}"] = {side: round(2 * tokens * k * n / statistics.median(v) / 1e9, 1)
                           for side, v in blocks.items()}
    return {"tokens": tokens, "unit": "GFLOP/s", **out}


def mnre_eval(data_dir: str, batch_size: int, repeats: int) -> dict:
    """Alternating passes over MNRE-2 val: ``train_lib.evaluate`` and ``TorchROC``."""
    import torch
    import train_step as ts

    from configs.mnre import get_config
    from roc_jax import metrics, parallel, train_lib
    from roc_jax.data import pipeline, sources
    from roc_jax.models import weights

    os.environ["ROC_DATA_DIR"] = data_dir
    config = get_config("offline")  # MiniLM-L6; synthetic description embeddings below
    config.data.source, config.data.use_images = "raw", False
    source, names = sources.load_sources(config, ["val"])["val"], sources.label_names_of(config)
    batches = list(pipeline.make_eval_batches(source, pipeline.load_tokenizer(weights.resolve(
        "minilm-l6")), train_lib.pipeline_config(config, None), batch_size))
    model = ts.build_roc(image=False)[0]
    pt = ts.build_torch(model, None).eval()
    trainer, state = train_lib.make_evaluator(model, parallel.make_mesh())
    rel = benchlib.synthetic_relations(len(names))
    jrel, trel = parallel.replicate(rel, trainer.mesh), [torch.from_numpy(v) for v in rel.values()]
    tbatches = [benchlib.torch_batch(b) for b in batches]

    def torch_pass() -> dict:
        acc = metrics.Accumulator()
        with torch.inference_mode():
            for b, t in zip(batches, tbatches, strict=True):
                acc.add(b["label"], pt(t, *trel).argmax(-1).numpy(), b["mask"])
        return acc.result(names)

    def jax_pass() -> dict:
        return train_lib.evaluate(trainer, state["params"], batches, jrel, names)

    first, compile_s = benchlib.timed(jax_pass)  # compiles one eval step per length bucket
    with jax.set_mesh(trainer.mesh), torch.inference_mode():
        ours = trainer.eval_step(state["params"], parallel.shard_batch(batches[0], trainer.mesh),
                                 jrel)["logits"]
        diff = float(np.abs(np.asarray(ours) - pt(tbatches[0], *trel).numpy()).max())
    blocks = benchlib.time_interleaved({"jax": jax_pass, "torch": torch_pass}, repeats, 1,
                                       usage=(usage := {}))
    return {"samples": len(source), "batch_size": batch_size, "batches": len(batches),
            "jax_first_pass_s": compile_s, "max_abs_diff_logits_first_batch": diff,
            "same_confusion_matrix": first["confusion"] == torch_pass()["confusion"],
            **{k: benchlib.rate_summary(v, len(source), usage[k]) for k, v in blocks.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("batch", 32), ("repeats", 9), ("iters", 5), ("eval-batch", 64),
                          ("eval-repeats", 3)):  # eval-batch: configs/mnre.py's; repeats 0: none
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--mnre", default=os.environ.get("ROC_DATA_DIR", ""), help="raw MNRE")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--note", default="", help="stored in the result")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoders.json"))
    args = parser.parse_args(argv)
    if args.eval_repeats and not args.mnre:
        parser.error("the eval part reads MNRE: --mnre DIR (or ROC_DATA_DIR), or --eval-repeats 0")
    import torch
    import transformers

    from roc_jax.models import weights

    host = benchlib.machine()  # before the run: its load average is the one at the start
    torch.set_num_threads(os.cpu_count() or 1)
    model = weights.load_text_encoder("minilm-l6")[0]
    model.eval()
    pt = transformers.BertModel.from_pretrained(str(weights.resolve("minilm-l6"))).eval()
    batch = benchlib.synthetic_batch(args.batch, LENGTH, object_tail_fields=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    # A pure function of (params, inputs): no NNX graph traversal inside the timed loop.
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
    compile_s = benchlib.timed(lambda: forward(state, j_ids, j_mask).block_until_ready())[1]
    if args.profile:
        profile(forward, (state, j_ids, j_mask),
                f"JAX encoder forward (minilm-l6, batch {args.batch} x {LENGTH})")

    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def torch_forward():
        with torch.inference_mode():
            return pt(input_ids=t_ids, attention_mask=t_mask).last_hidden_state

    max_diff = float(np.abs(np.asarray(forward(state, j_ids, j_mask)) - torch_forward().numpy())
                     .max())  # and PyTorch's warm-up
    blocks = benchlib.time_interleaved(
        {"jax": lambda: forward(state, j_ids, j_mask).block_until_ready(), "torch": torch_forward},
        args.repeats, args.iters, usage=(usage := {}))
    jax_r, torch_r = (benchlib.rate_summary(blocks[k], args.batch, usage[k])
                      for k in ("jax", "torch"))
    result = {
        "benchmark": "BERT encoder forward, minilm-l6 (6 x 384), float32, CPU; MNRE-2 val eval",
        "batch": args.batch, "length": LENGTH, "repeats": args.repeats,
        "iters_per_repeat": args.iters, "machine": host, "jax": {"compile_s": compile_s, **jax_r},
        "torch": {"num_threads": torch.get_num_threads(),
                  "attn_implementation": pt.config._attn_implementation, **torch_r},
        "max_abs_diff_last_hidden_state": max_diff, **({"note": args.note} if args.note else {}),
        "dense_products": dense_products(args.batch * LENGTH, args.repeats, args.iters),
        "summary": {"jax_ex_per_s": round(jax_r["ex_per_s"], 1),
                    "torch_ex_per_s": round(torch_r["ex_per_s"], 1),
                    "ratio_vs_torch": round(jax_r["ex_per_s"] / torch_r["ex_per_s"], 3)},
    }
    if args.eval_repeats:
        ev = result["eval"] = mnre_eval(args.mnre, args.eval_batch, args.eval_repeats)
        j, t = ev["jax"]["ex_per_s"], ev["torch"]["ex_per_s"]
        result["summary"] |= {"eval_jax_ex_per_s": round(j, 1), "eval_torch_ex_per_s": round(
            t, 1), "eval_ratio_vs_torch": round(j / t, 3)}
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    benchlib.write_json(args.out, result, indent=2)
    print(json.dumps(result["summary"]), "->", args.out)
    return result


if __name__ == "__main__":
    main()
