"""The sentence prior (``roc_jax.sentence_prior``) on trained MNRE-2 workdirs, val, every weight.

``zero_shot=DIR``: trained with ``mnre_quality.py --protocol zero_shot``; ``full=DIR``: trained
on all relations (no offsets: nothing is unseen). Updates ``benchmarks/results/sentence_prior.json``
(a run of the same kind and seed is replaced); see docs/results.md.

    python benchmarks/sentence_prior.py --data_dir /path/to/mnre --workdirs zero_shot=runs/zs_s0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import machine, write_json
from mnre_quality import UNSEEN_RELATIONS

RESULTS = Path(__file__).resolve().parent / "results" / "sentence_prior.json"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)  # w, in units of 1 / T
OFFSETS = tuple(round(0.025 * i, 3) for i in range(13))  # b, cosine units (0 to 0.3), zero-shot runs only


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="the raw MNRE folder")
    p.add_argument("--workdirs", nargs="+", required=True, help="zero_shot=DIR or full=DIR")
    args = p.parse_args()
    import roc_jax
    from roc_jax import sentence_prior
    from roc_jax.data import sources

    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
    for item in args.workdirs:
        kind, _, workdir = item.partition("=")
        if kind not in ("zero_shot", "full") or not workdir:
            raise SystemExit(f"--workdirs {item!r}: expected zero_shot=DIR or full=DIR")
        t0 = time.time()
        loaded = roc_jax.load(workdir, data_dir=args.data_dir)
        if kind == "zero_shot" and tuple(loaded.config.data.unseen_relations) != UNSEEN_RELATIONS:
            raise SystemExit(f"{workdir}: not trained with mnre_quality.py --protocol zero_shot")
        source = sources.load_sources(loaded.config, ["val"])["val"]
        run = {"kind": kind, "workdir": workdir, "seed": int(loaded.config.seed),
               **sentence_prior.sweep(loaded, source, WEIGHTS, UNSEEN_RELATIONS,
                                      OFFSETS if kind == "zero_shot" else (0.0,))}
        runs = [r for r in runs if (r["kind"], r["seed"]) != (kind, run["seed"])]
        runs.append({**run, "without_prior": run["by_weight"]["0.0"], "seconds": time.time() - t0})
        print(kind, run["seed"], run["selected_weight"], run["selected"], run.get("calibrated"),
              flush=True)
    write_json(RESULTS, {"benchmark": "sentence_prior", "machine": machine(), "weights": list(WEIGHTS),
                         "offsets": list(OFFSETS), "summary": sentence_prior.summarize(runs),
                         "runs": runs})


if __name__ == "__main__":
    main()
