"""Forward throughput of the Flax BERT encoder vs transformers' PyTorch BertModel, same weights.

MiniLM-L6 (``minilm-l6``, offline) on a batch of 32 x 64 tokens in float32 on the CPU: JAX jitted
after compilation, PyTorch in ``inference_mode`` on every core with its default attention. The
two sides' blocks of ``--iters`` forwards alternate; the figure is the median block.

    python benchmarks/encoders.py [--repeats 9] [--iters 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

BATCH, LENGTH = 32, 64


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoders.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    from roc_jax.models import weights

    host = benchlib.machine()  # before the run: its load average is the one at the start
    torch.set_num_threads(os.cpu_count() or 1)
    model, _, _ = weights.load_text_encoder("minilm-l6")
    pt = transformers.BertModel.from_pretrained(str(weights.resolve("minilm-l6"))).eval()
    batch = benchlib.synthetic_batch(BATCH, LENGTH, object_tail_fields=False)
    ids, mask = batch["input_ids"], batch["attention_mask"]

    # A pure function of (params, inputs): no NNX graph traversal inside the timed loop.
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)
    t0 = time.perf_counter()
    forward(state, j_ids, j_mask).block_until_ready()
    compile_s = time.perf_counter() - t0

    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def torch_forward():
        with torch.inference_mode():
            return pt(input_ids=t_ids, attention_mask=t_mask).last_hidden_state

    ref = torch_forward()  # warm-up
    ours = np.asarray(forward(state, j_ids, j_mask))
    max_diff = float(np.abs(ours - ref.numpy()).max())
    blocks = benchlib.time_interleaved(
        {"jax": lambda: forward(state, j_ids, j_mask).block_until_ready(), "torch": torch_forward},
        args.repeats, args.iters)
    jax_r, torch_r = (benchlib.rate_summary(blocks[k], BATCH) for k in ("jax", "torch"))
    result = {
        "benchmark": "BERT encoder forward, minilm-l6 (6 x 384), float32, CPU", "batch": BATCH,
        "length": LENGTH, "repeats": args.repeats, "iters_per_repeat": args.iters,
        "machine": host, "jax": {"compile_s": compile_s, **jax_r},
        "torch": {"num_threads": torch.get_num_threads(),
                  "attn_implementation": pt.config._attn_implementation, **torch_r},
        "max_abs_diff_last_hidden_state": max_diff,
        "summary": {"jax_ex_per_s": round(jax_r["ex_per_s"], 1),
                    "torch_ex_per_s": round(torch_r["ex_per_s"], 1),
                    "ratio_vs_torch": round(jax_r["ex_per_s"] / torch_r["ex_per_s"], 3)},
    }
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"]), "->", args.out)
    return result


if __name__ == "__main__":
    main()
