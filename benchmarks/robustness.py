"""Robustness of trained models: each workdir evaluated clean and under every perturbation.

    python benchmarks/robustness.py --data_dir ../shared/data/mnre \\
        --workdirs runs/roc_s0,runs/cls_s0,runs/roc_s1,runs/cls_s1

Every workdir (ROC and classification, same budget and seeds) is evaluated on MNRE-2 val
(``--split``) clean, under each of ``roc_jax.robustness.PERTURBATIONS`` (seeded by
``--perturbation_seed``, the same perturbed copy for every model) and, for the retrieval head,
with the shipped paraphrase descriptions (``paraphrase``) and with the first description of each
relation only (``k1``). Results accumulate in ``benchmarks/results/robustness.json`` (one run per
workdir and variant; one already there is not rerun), so workdirs can be added as they finish;
the per variant and head figures and the ``summary`` (``roc_mean_drop``, ``cls_mean_drop``: the
mean drop in points over the perturbations both heads have) are recomputed from every run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchlib import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "robustness.json"
PARAPHRASE = ROOT / "roc_jax" / "labels" / "data" / "mnre_descriptions_paraphrase.json"


def variants(loaded, paraphrase: Path) -> list[tuple[str, str | None, dict | None]]:
    """``(variant name, perturbation, descriptions)`` to evaluate ``loaded`` under."""
    from roc_jax import robustness

    out = [("clean", None, None)] + [(p, p, None) for p in robustness.PERTURBATIONS]
    if loaded.config.model.head == "retrieval":
        out += [("paraphrase", None, robustness.description_set(loaded, paraphrase)),
                ("k1", None, robustness.description_set(loaded, k=1))]
    return out


def evaluate_workdir(workdir: str, args: argparse.Namespace, done: set, cache: dict):
    """Yields the results entry of every variant of ``workdir`` not yet in ``done``."""
    import roc_jax
    from roc_jax import robustness

    loaded = roc_jax.load(workdir, data_dir=args.data_dir)
    head = robustness.HEADS[loaded.config.model.head]
    config = loaded.config
    key = (config.data.raw_dir, config.data.entity_types)
    if key not in cache:  # both heads read (and type) the same splits once
        cache[key] = {s: robustness.read_split(config, s) for s in (args.split, "train")}
    for name, perturbation, descriptions in variants(loaded, args.paraphrase):
        if (workdir, name) in done and not args.force:
            print(f"[{head} seed {config.seed}] {name}: already in {args.results.name}")
            continue
        t0 = time.time()
        ev, info = robustness.evaluate_variant(
            loaded, args.split, perturbation, seed=args.perturbation_seed,
            descriptions=descriptions, samples=cache[key][args.split],
            train_samples=cache[key]["train"])
        m = ev.metrics
        print(f"[{head} seed {config.seed}] {name}: F1 {100 * m['f1']:.2f} "
              f"({info['changed']} of {info['samples']} samples changed, "
              f"{time.time() - t0:.0f} s)", flush=True)
        yield {"workdir": workdir, "head": head, "seed": int(config.seed), "step": loaded.step,
               "variant": name, **info, "f1": 100 * m["f1"], "precision": 100 * m["precision"],
               "recall": 100 * m["recall"], "accuracy": 100 * m["accuracy"],
               "per_relation_f1": {r["relation"]: 100 * r["f1"] for r in m["per_relation"]},
               "confusion": m["confusion"], "label_names": ev.label_names,
               "seconds": time.time() - t0}


def write(runs: list[dict], args: argparse.Namespace) -> dict:
    from roc_jax import robustness

    report = robustness.summarize(runs)
    report["summary"]["machine"] = machine()
    result = {"benchmark": "robustness", "split": args.split,
              "perturbation_seed": args.perturbation_seed, **report, "runs": runs}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.results)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdirs", required=True, help="comma-separated trained workdirs")
    p.add_argument("--data_dir", default=os.environ.get("ROC_MNRE_DIR"),
                   help="the raw MNRE folder (default: the one each run recorded)")
    p.add_argument("--split", default="val")
    p.add_argument("--perturbation_seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--paraphrase", type=Path, default=PARAPHRASE, help="the second descriptions set")
    p.add_argument("--force", action="store_true", help="rerun variants already in the results")
    args = p.parse_args()
    old = json.loads(args.results.read_text()) if args.results.exists() else {}
    if old and (old["split"], old["perturbation_seed"]) != (args.split, args.perturbation_seed):
        sys.exit(f"{args.results}: holds split {old['split']!r} with perturbation seed "
                 f"{old['perturbation_seed']}; use another --results")
    runs = old.get("runs", [])
    done = {(r["workdir"], r["variant"]) for r in runs}
    cache: dict = {}
    for workdir in args.workdirs.split(","):
        for entry in evaluate_workdir(workdir, args, done, cache):
            runs = [r for r in runs if (r["workdir"], r["variant"]) !=
                    (workdir, entry["variant"])] + [entry]
            write(runs, args)
    summary = write(runs, args)["summary"]
    print(json.dumps({k: v for k, v in summary.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
