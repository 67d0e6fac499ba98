"""Robustness: trained workdirs evaluated on MNRE-2 val clean and under every perturbation.

Variants: ``roc_jax.robustness.model_variants``. Runs accumulate in
``benchmarks/results/robustness.json`` (one per workdir and variant, never rerun); its
``summary`` (``roc_mean_drop``, ``cls_mean_drop``, over the shared perturbations) is recomputed.

    python benchmarks/robustness.py --data_dir /path/to/mnre --workdirs runs/roc_s0,runs/cls_s0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import benchlib

ROOT = Path(__file__).resolve().parents[1]
PARAPHRASE = ROOT / "roc_jax" / "labels" / "data" / "mnre_descriptions_paraphrase.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdirs", required=True, help="comma-separated trained workdirs")
    p.add_argument("--data_dir", default=os.environ.get("ROC_MNRE_DIR"), help="raw MNRE folder")
    p.add_argument("--split", default="val")
    p.add_argument("--perturbation_seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/robustness.json")
    p.add_argument("--paraphrase", type=Path, default=PARAPHRASE, help="second descriptions set")
    args = p.parse_args()
    import roc_jax
    from roc_jax import robustness

    old = json.loads(args.results.read_text()) if args.results.exists() else {}
    if old and (old["split"], old["perturbation_seed"]) != (args.split, args.perturbation_seed):
        raise SystemExit(f"{args.results} holds another split or perturbation seed")
    runs, read = old.get("runs", []), {}
    for workdir in args.workdirs.split(","):
        loaded = roc_jax.load(workdir, data_dir=args.data_dir)
        c = loaded.config
        if (key := (c.data.raw_dir, c.data.entity_types)) not in read:  # read and typed once
            read[key] = {s: robustness.read_split(c, s) for s in (args.split, "train")}
        splits = read[key]
        for name, perturbation, descriptions in robustness.model_variants(loaded, args.paraphrase):
            if any((r["workdir"], r["variant"]) == (workdir, name) for r in runs):
                continue
            t0 = time.time()
            ev, info = robustness.evaluate_variant(
                loaded, args.split, perturbation, seed=args.perturbation_seed,
                descriptions=descriptions, samples=splits[args.split],
                train_samples=splits["train"])
            runs.append(robustness.run_entry(loaded, workdir, name, ev, info, time.time() - t0))
            print(f"{workdir} {name}: F1 {runs[-1]['f1']:.2f} ({info['changed']} samples "
                  f"changed, {time.time() - t0:.0f} s)", flush=True)
            report = robustness.summarize(runs)
            report["summary"]["machine"] = benchlib.machine()
            benchlib.write_json(args.results, {"benchmark": "robustness", "split": args.split,
                                               "perturbation_seed": args.perturbation_seed,
                                               **report, "runs": runs})
    summary = robustness.summarize(runs)["summary"]
    print(f"mean drop: ROC {summary['roc_mean_drop']}, classification {summary['cls_mean_drop']}")


if __name__ == "__main__":
    main()
