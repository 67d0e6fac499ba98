"""The sentence prior (``roc_jax.sentence_prior``) on trained MNRE-2 workdirs, val, every weight.

``KIND=DIR``: a workdir trained with ``mnre_quality.py --protocol KIND`` (``zero_shot``,
``full`` or ``low_resource``; the last two on all relations, so without offsets). Either head;
a classification run's kind is suffixed ``_classification`` (``_classification_same_loss`` with
ROC's column loss, the ``cls_symmetric`` control). Updates
``benchmarks/results/sentence_prior.json`` (a run of the same kind and seed is replaced; each run
records the machine it ran on); see docs/results.md.

    python benchmarks/sentence_prior.py --data_dir /path/to/mnre --workdirs zero_shot=runs/zs_s0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchlib import machine, write_json
from mnre_quality import LOW_RESOURCE_FRACTION, UNSEEN_RELATIONS

RESULTS = Path(__file__).resolve().parent / "results" / "sentence_prior.json"
# In logits; ROC's are cosines / T with T about 0.07, so w = 10 weighs the prior about like the
# model's own cosine.
WEIGHTS = (0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0, 17.5, 20.0, 25.0, 30.0, 40.0)
OFFSETS = tuple(0.25 * i for i in range(13))  # zero-shot runs only
# kind -> (data.unseen_relations, data.train_fraction) of mnre_quality.py's --protocol kind
TRAINED_ON = {"zero_shot": (UNSEEN_RELATIONS, 1.0), "full": ((), 1.0),
              "low_resource": ((), LOW_RESOURCE_FRACTION)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", required=True, help="the raw MNRE folder")
    p.add_argument("--workdirs", nargs="+", required=True,
                   help="KIND=DIR, KIND one of " + ", ".join(TRAINED_ON))
    args = p.parse_args()
    import roc_jax
    from roc_jax import sentence_prior
    from roc_jax.data import sources

    runs = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
    for item in args.workdirs:
        kind, _, workdir = item.partition("=")
        if kind not in TRAINED_ON or not workdir:
            raise SystemExit(f"--workdirs {item!r}: expected KIND=DIR, KIND one of "
                             + ", ".join(TRAINED_ON))
        t0 = time.time()
        loaded = roc_jax.load(workdir, data_dir=args.data_dir)
        data = loaded.config.data
        if (tuple(data.unseen_relations), float(data.train_fraction)) != TRAINED_ON[kind]:
            raise SystemExit(f"{workdir}: not trained with mnre_quality.py --protocol {kind}")
        source = sources.load_sources(loaded.config, ["val"])["val"]
        if loaded.config.model.head != "retrieval":
            kind = f"{kind}_{loaded.config.model.head}"
            if loaded.config.train.get("softmax_relation_to_pair", False):
                kind += "_same_loss"
        run = {"kind": kind, "workdir": workdir, "seed": int(loaded.config.seed),
               **sentence_prior.sweep(loaded, source, WEIGHTS, UNSEEN_RELATIONS,
                                      OFFSETS if kind.startswith("zero_shot") else (0.0,))}
        runs = [r for r in runs if (r["kind"], r["seed"]) != (kind, run["seed"])]
        runs.append({**run, "without_prior": run["by_weight"]["0.0"], "seconds": time.time() - t0,
                     "machine": machine()})
        print(kind, run["seed"], run["selected_weight"], run["selected"], run.get("calibrated"),
              flush=True)
    write_json(RESULTS, {"benchmark": "sentence_prior", "weights": list(WEIGHTS),
                         "offsets": list(OFFSETS), "summary": sentence_prior.summarize(runs),
                         "runs": runs})


if __name__ == "__main__":
    main()
