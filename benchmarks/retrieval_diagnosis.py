"""Why ROC does or does not beat classification: measurements on the trained MNRE runs.

Reads the runs that ``benchmarks/mnre_quality.py`` recorded (their workdirs) and writes
``benchmarks/results/retrieval_diagnosis.json``:

- **error structure** (every run, from its selected dev evaluation's confusion matrix): gold
  relations predicted ``None``, ``None`` predicted as a relation, a relation predicted as another,
  and correct relations;
- **temperature sweep** (retrieval runs): the trained model's pair and description vectors are
  computed once on the first ``--examples`` of val and of train, and the cross-entropy is
  re-evaluated with other temperatures. If the learned temperature sits at the sweep's minimum,
  the temperature is not what holds the loss up for this geometry;
- **relation crowding** (retrieval runs): cosine between the relations' projected description
  vectors (the mean of a relation's K normalized descriptions, normalized), on average and for the
  most similar pairs, beside the same figure for the raw description embeddings;
- **training loss** of each retrieval run minus the classification run of the same seed and
  budget, at every logged step;
- **``None`` threshold** (every run): val micro-F1 when ``None`` is predicted only at a probability
  of at least tau, for a few tau, beside the field's argmax rule. Tau is chosen on the split it
  is reported on, so the best figure is optimistic; it tells whether the errors are in the
  ranking of the relations or in the ``None`` decision.

``--parts`` picks the measurements; a run's other parts already in the results file are kept.

    python benchmarks/retrieval_diagnosis.py --data_dir ../shared/data/mnre
    python benchmarks/retrieval_diagnosis.py --settings roc,cls,roc_lse --parts none_threshold
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from benchlib import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "retrieval_diagnosis.json"
QUALITY = ROOT / "benchmarks" / "results" / "mnre_quality.json"
TEMPERATURES = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15)


def error_structure(confusion: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """Counts of a ``[R, R]`` confusion matrix (row gold, column predicted) by kind of error."""
    cm = np.asarray(confusion, np.int64)
    from roc_jax.data.records import NONE_LABEL

    n = list(names).index(NONE_LABEL)
    correct_none = int(cm[n, n])
    return {
        "gold_relation_predicted_none": int(cm[:, n].sum()) - correct_none,
        "none_predicted_as_relation": int(cm[n].sum()) - correct_none,
        "relation_predicted_as_other_relation": int(cm.sum() - np.trace(cm)
                                                    - (cm[:, n].sum() - correct_none)
                                                    - (cm[n].sum() - correct_none)),
        "correct_relation": int(np.trace(cm)) - correct_none,
        "gold_relations": int(cm.sum() - cm[n].sum()),
    }


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of ``[N, R]`` logits against ``[N]`` integer labels."""
    z = logits - logits.max(axis=1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(logz - z[np.arange(len(labels)), labels]))


def prototype_cosines(pair: np.ndarray, projected: np.ndarray, mask: np.ndarray, mode: str
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The cosines the retrieval head divides by its temperature.

    pair: ``[N, P]`` unit pair vectors; projected: ``[R, K, P]`` unit description vectors; mask:
    ``[R, K]``. Mode ``mean`` (a relation is the normalized mean of its descriptions) gives
    ``([N, R, 1], [R, 1])``; mode ``lse`` (every description scored) gives ``([N, R, K], mask)``.
    """
    m = np.asarray(mask, bool)
    if mode == "lse":
        return np.einsum("np,rkp->nrk", pair, projected), m
    rel = (projected * m[..., None]).sum(axis=1) / np.maximum(m.sum(axis=1), 1)[:, None]
    rel = rel / np.maximum(np.linalg.norm(rel, axis=-1, keepdims=True), 1e-12)
    return (pair @ rel.T)[..., None], m.any(axis=1)[:, None]


def temperature_sweep(sims: np.ndarray, mask: np.ndarray, labels: np.ndarray,
                      temperatures: Sequence[float], bias: np.ndarray | None = None
                      ) -> dict[str, Any]:
    """Cross-entropy of fixed cosines under other temperatures.

    sims: ``[N, R, K]`` and mask ``[R, K]`` from ``prototype_cosines``; a relation scores
    ``logsumexp_k(cos_k / T) - log K_r`` (``roc_jax.labels.cache.relation_scores``; with K = 1
    that is ``cos / T``), plus ``bias [R]`` when the run learned one (``model.relation_bias``;
    held fixed like the cosines). Returns the cross-entropy per temperature and the best one.
    """
    m = np.asarray(mask, bool)
    count = np.maximum(m.sum(axis=1), 1)
    out = {}
    for t in temperatures:
        s = np.where(m[None], sims / t, -np.inf)
        peak = np.where(m.any(axis=1)[None, :, None], s.max(axis=2, keepdims=True), 0.0)
        lse = peak[..., 0] + np.log(np.exp(s - peak).sum(axis=2)) - np.log(count)[None]
        if bias is not None:
            lse = lse + np.asarray(bias)[None]
        out[f"{t:g}"] = round(cross_entropy(lse, labels), 4)
    return {"cross_entropy": out, "best_temperature": float(min(out, key=out.get))}


NONE_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def none_threshold_sweep(logits: np.ndarray, labels: np.ndarray, none_id: int,
                         thresholds: Sequence[float]) -> dict[str, Any]:
    """Micro-F1 (without ``None``) when ``None`` is predicted only if its probability is at least
    ``tau``, else the most probable relation: is the head's error ranking or ``None`` calibration?

    logits: ``[N, R]``; labels: ``[N]``. ``argmax`` is the field's rule, reported beside.
    """
    from roc_jax.metrics import micro_prf

    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    others = np.where(np.arange(logits.shape[1])[None] == none_id, -np.inf, logits)
    best_relation = others.argmax(axis=1)
    out = {"argmax": micro_prf(labels, logits.argmax(axis=1), none_id)["f1"] * 100}
    for tau in thresholds:
        preds = np.where(prob[:, none_id] >= tau, none_id, best_relation)
        out[f"{tau:g}"] = micro_prf(labels, preds, none_id)["f1"] * 100
    best = max((k for k in out if k != "argmax"), key=out.get)
    return {"f1": {k: round(v, 2) for k, v in out.items()}, "best_threshold": float(best),
            "best_f1": round(out[best], 2)}


def val_logits(loaded: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """``(logits [N, R], labels [N], none_id)`` of a restored run (``roc_jax.load``) on all of
    val."""
    import jax

    from roc_jax import parallel, train_lib
    from roc_jax.data import pipeline
    from roc_jax.data.records import NONE_LABEL

    trainer = loaded.exp.trainer
    source = train_lib.load_sources(loaded.config, ["val"])["val"]
    logits, labels = [], []
    with jax.set_mesh(trainer.mesh):
        for batch in pipeline.make_eval_batches(source, loaded.tokenizer, loaded.exp.pipeline_cfg,
                                                64):
            keep = np.asarray(batch["mask"]).astype(bool)
            out = trainer.eval_step(loaded.params, parallel.shard_batch(batch, trainer.mesh),
                                    loaded.exp.relations)
            logits.append(np.asarray(out["logits"], np.float64)[keep])
            labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(logits), np.concatenate(labels), loaded.label_names.index(NONE_LABEL)


def relation_crowding(vectors: np.ndarray, mask: np.ndarray, names: Sequence[str],
                      top: int = 8) -> dict[str, Any]:
    """Cosine between relation vectors: each relation is the normalized mean of its valid
    normalized description vectors ``[R, K, D]`` (the retrieval head's ``mean`` mode)."""
    v = np.asarray(vectors, np.float64)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    m = np.asarray(mask, np.float64)[..., None]
    rel = (v * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    rel = rel / np.linalg.norm(rel, axis=-1, keepdims=True)
    cos = rel @ rel.T
    iu = np.triu_indices(len(names), 1)
    order = np.argsort(-cos[iu])[:top]
    return {"mean_offdiagonal_cosine": float(cos[iu].mean()),
            "max_offdiagonal_cosine": float(cos[iu].max()),
            "most_similar_pairs": [[names[iu[0][o]], names[iu[1][o]], round(float(cos[iu][o]), 4)]
                                   for o in order]}


def loss_gaps(run_dir: Path, baseline_dir: Path) -> dict[str, float]:
    """``train/loss`` of a run minus that of the baseline run at every step both logged."""
    def losses(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").open()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    a, b = losses(run_dir), losses(baseline_dir)
    return {str(s): round(a[s] - b[s], 4) for s in sorted(set(a) & set(b))}


def retrieval_vectors(loaded: Any, splits: Sequence[str], examples: int) -> dict[str, Any]:
    """A restored retrieval run (``roc_jax.load``): its unit pair vectors ``[N, P]`` and labels on the
    first ``examples`` of each split, its projected ``[R, K, P]`` and raw ``[R, K, Dd]``
    description vectors, the mask, the temperature, the score mode and the learned relation bias
    ``[R]`` (None without ``model.relation_bias``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from roc_jax import parallel, train_lib
    from roc_jax.data import pipeline

    trainer, relations = loaded.exp.trainer, loaded.exp.relations

    @jax.jit
    def encode(params, rest, batch):
        model = nnx.merge(trainer.graphdef_eval, params, rest, copy=True)
        return model.encode_pair(batch)

    out: dict[str, Any] = {}
    for split in splits:
        source = train_lib.load_sources(loaded.config, [split])[split]
        pairs, labels = [], []
        with jax.set_mesh(trainer.mesh):
            for batch in pipeline.make_eval_batches(source, loaded.tokenizer,
                                                    loaded.exp.pipeline_cfg, 64):
                keep = np.asarray(batch["mask"]).astype(bool)
                sharded = parallel.shard_batch(batch, trainer.mesh)
                pairs.append(np.asarray(encode(loaded.params, trainer.rest, sharded))[keep])
                labels.append(np.asarray(batch["label"])[keep])
                if sum(len(x) for x in labels) >= examples:
                    break
        out[split] = (np.concatenate(pairs)[:examples], np.concatenate(labels)[:examples])
    model = loaded.model
    out["projected"] = np.asarray(model.encode_relations(
        {k: jnp.asarray(v) for k, v in relations.items()}), np.float64)
    out["raw"] = np.asarray(relations["embeddings"], np.float64)
    out["mask"] = np.asarray(relations["mask"], bool)
    out["temperature"] = float(model.temperature())
    out["mode"] = model.config.description_mode
    out["bias"] = (None if model.relation_bias is None
                   else np.asarray(model.relation_bias[...], np.float64))
    out["names"] = list(loaded.label_names)
    return out


def diagnose_retrieval(loaded: Any, examples: int) -> dict[str, Any]:
    """Temperature sweep on val and train, and crowding of the projected and raw relations."""
    v = retrieval_vectors(loaded, ("val", "train"), examples)
    out: dict[str, Any] = {"learned_temperature": v["temperature"], "mode": v["mode"]}
    for split in ("val", "train"):
        pair, labels = v[split]
        sims, mask = prototype_cosines(pair.astype(np.float64), v["projected"], v["mask"],
                                       v["mode"])
        out[f"sweep_{split}"] = {"examples": int(len(labels)),
                                 **temperature_sweep(sims, mask, labels, TEMPERATURES,
                                                     v["bias"])}
    out["crowding_projected"] = relation_crowding(v["projected"], v["mask"], v["names"])
    out["crowding_raw_descriptions"] = relation_crowding(v["raw"], v["mask"], v["names"])
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.environ.get("ROC_DATA_DIR")
                   or os.environ.get("ROC_MNRE_DIR", ""), help="the raw MNRE folder")
    p.add_argument("--settings", default="",
                   help="comma-separated settings of mnre_quality.json ('' -> all)")
    p.add_argument("--parts", default="errors,retrieval,none_threshold",
                   help="comma-separated: errors, retrieval (sweep, crowding, loss gaps), "
                        "none_threshold; rows already in the results file keep their other parts")
    p.add_argument("--examples", type=int, default=1024,
                   help="examples per split (the first ones) for the temperature sweep")
    args = p.parse_args()
    import mnre_quality as mq

    import roc_jax

    entries = json.loads(QUALITY.read_text())["runs"]
    wanted = set(filter(None, args.settings.split(",")))
    parts = set(args.parts.split(","))
    old = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []

    def key(r):
        return r["setting"], r["seed"], r["budget"]

    previous = {key(r): r for r in old}
    runs = []
    for e in entries:
        if wanted and e["setting"] not in wanted:
            continue
        workdir = Path(e["workdir"])
        row: dict[str, Any] = {"setting": e["setting"], "seed": e["seed"],
                               "budget": mq.entry_budget(e), "val_f1": e["val"]["f1"]}
        row = {**previous.pop(key(row), {}), **row}
        if not workdir.exists():
            row["missing"] = f"{workdir} is not on this machine"
            runs.append(row)
            continue
        start = time.perf_counter()
        retrieval = e["setting"] != "cls" and "retrieval" in parts
        # One restore per run, shared by the parts that need the model.
        loaded = roc_jax.load(workdir, checkpoint="best", data_dir=args.data_dir) \
            if retrieval or "none_threshold" in parts else None
        if "errors" in parts:
            dev = mq.best_dev(workdir)
            names = [r["relation"] for r in dev["per_relation"]]
            row["errors"] = error_structure(np.asarray(dev["confusion"]), names)
        if "none_threshold" in parts:
            logits, labels, none_id = val_logits(loaded)
            row["none_threshold"] = none_threshold_sweep(logits, labels, none_id,
                                                         NONE_THRESHOLDS)
        baseline = [b for b in entries if b["setting"] == "cls" and b["seed"] == e["seed"]
                    and mq.entry_budget(b) == row["budget"]]
        if retrieval:
            if baseline and Path(baseline[0]["workdir"]).exists():
                row["train_loss_minus_cls"] = loss_gaps(workdir, Path(baseline[0]["workdir"]))
            row.update(diagnose_retrieval(loaded, args.examples))
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps({k: row[k] for k in row if k in ("setting", "seed", "budget", "val_f1",
                                                          "learned_temperature")}), flush=True)
        runs.append(row)
    runs += previous.values()  # rows of runs not selected this time
    RESULTS.write_text(json.dumps({"machine": machine(), "runs": runs,
                                   "summary": summarize(runs)}, indent=1) + "\n")
    print(json.dumps(summarize(runs), indent=1))


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per setting and budget: mean error counts, val F1 with the best ``None`` threshold, and
    (retrieval) the best sweep temperatures, the learned temperature and the relations' crowding."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if "errors" in r:
            groups.setdefault(f"{r['setting']} ({r['budget']})", []).append(r)
    out = {}
    for key, rows in groups.items():
        s: dict[str, Any] = {"runs": len(rows)}
        for name in rows[0]["errors"]:
            s[name] = statistics.mean(r["errors"][name] for r in rows)
        if "learned_temperature" in rows[0]:
            s["learned_temperature"] = [round(r["learned_temperature"], 5) for r in rows]
            s["best_temperature_val"] = [r["sweep_val"]["best_temperature"] for r in rows]
            s["best_temperature_train"] = [r["sweep_train"]["best_temperature"] for r in rows]
            s["projected_mean_cosine"] = statistics.mean(
                r["crowding_projected"]["mean_offdiagonal_cosine"] for r in rows)
            s["projected_max_cosine"] = max(
                r["crowding_projected"]["max_offdiagonal_cosine"] for r in rows)
        if all("none_threshold" in r for r in rows):
            s["val_f1_argmax"] = statistics.mean(r["none_threshold"]["f1"]["argmax"]
                                                 for r in rows)
            s["val_f1_best_none_threshold"] = statistics.mean(r["none_threshold"]["best_f1"]
                                                              for r in rows)
            s["best_none_threshold"] = [r["none_threshold"]["best_threshold"] for r in rows]
        out[key] = s
    return out


if __name__ == "__main__":
    main()
