"""Forward throughput of the Flax BERT encoder vs transformers' PyTorch BertModel, same weights.

Both run MiniLM-L6 (``minilm-l6`` preset, offline) on a batch of 32 x 64 tokens in float32 on the
CPU: JAX under ``jax.jit`` after compilation, PyTorch in ``inference_mode`` with
``torch.set_num_threads(os.cpu_count())`` and its default attention implementation. Each side
runs ``--repeats`` timed blocks of ``--iters`` forwards, the two sides' blocks alternating; the
figure is the median block (the best block is recorded too).
The results (with the machine's description) go to ``benchmarks/results/encoders.json``.

    python benchmarks/encoders.py [--repeats 7] [--iters 10] [--out benchmarks/results/encoders.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BATCH, LENGTH = 32, 64


def machine() -> dict:
    """CPU model, cores, memory, load and library versions."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except OSError:
        pass
    info["cpu_count"] = os.cpu_count()
    info["load_average_at_start"] = os.getloadavg()
    import flax
    import torch
    import transformers

    info["versions"] = {
        "jax": jax.__version__,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }
    info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def _time_interleaved(fns: dict, repeats: int, iters: int) -> dict[str, list[float]]:
    """Seconds per call for each of ``repeats`` blocks of ``iters`` calls of every function.

    The blocks of the functions alternate, so that on a shared machine both sides see the same
    load over time (timing one side after the other measured the neighbours, not the code).
    """
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            out[name].append((time.perf_counter() - start) / iters)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/encoders.json"))
    args = parser.parse_args(argv)

    import torch
    import transformers

    from roc_jax.models import weights

    host = machine()  # before the run: its load average is the one at the start
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer, config = weights.load_text_encoder("minilm-l6")
    folder = weights.resolve("minilm-l6")
    pt = transformers.BertModel.from_pretrained(str(folder)).eval()

    rng = np.random.default_rng(0)
    ids = rng.integers(1000, config.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)
    ids[:, 0] = tokenizer.cls_token_id
    lengths = rng.integers(LENGTH // 2, LENGTH + 1, size=BATCH)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = ids * mask

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
    blocks = _time_interleaved(
        {
            "jax": lambda: forward(state, j_ids, j_mask).block_until_ready(),
            "torch": torch_forward,
        },
        args.repeats,
        args.iters,
    )
    jax_blocks, torch_blocks = blocks["jax"], blocks["torch"]

    jax_s, torch_s = statistics.median(jax_blocks), statistics.median(torch_blocks)
    result = {
        "benchmark": "BERT encoder forward, minilm-l6 (6 x 384), float32, CPU",
        "batch": BATCH,
        "length": LENGTH,
        "repeats": args.repeats,
        "iters_per_repeat": args.iters,
        "machine": host,
        "jax": {
            "compile_s": compile_s,
            "s_per_batch_blocks": jax_blocks,
            "ex_per_s": BATCH / jax_s,
            "best_ex_per_s": BATCH / min(jax_blocks),
        },
        "torch": {
            "num_threads": torch.get_num_threads(),
            "attn_implementation": pt.config._attn_implementation,
            "s_per_batch_blocks": torch_blocks,
            "ex_per_s": BATCH / torch_s,
            "best_ex_per_s": BATCH / min(torch_blocks),
        },
        "max_abs_diff_last_hidden_state": max_diff,
        "note": "machine shared with other jobs during the run; see load_average_*",
        "summary": {
            "jax_ex_per_s": round(BATCH / jax_s, 1),
            "torch_ex_per_s": round(BATCH / torch_s, 1),
            "ratio_vs_torch": round(torch_s / jax_s, 3),
        },
    }
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"]), "->", args.out)
    return result


if __name__ == "__main__":
    main()
