"""Real MNRE-2 quality: ROC against the classification head on the same encoder, and ablations.

Every run is ``train.py --config configs/mnre.py:offline`` in its own process (MiniLM-L6 +
DINOv2-S/14 offline weights, real MNRE-2 train, dev = ``mnre_val.txt``), with the overrides of its
setting and a seed. The checkpoint is selected on val micro-F1 (the field's protocol, ``None``
excluded): the reported figures are those of the best dev evaluation, read from the run's
``dev_metrics/step_*.json``. Results accumulate in ``benchmarks/results/mnre_quality.json``
(one entry per setting, seed and budget; a finished entry is not rerun), so the runs can be
spread over several sessions; the ``summary`` is recomputed from every entry each time.

    python benchmarks/mnre_quality.py --data_dir ../shared/data/mnre --runs roc:0,cls:0
    python benchmarks/mnre_quality.py --runs all       # 3 seeds x {roc, cls} + the ablations
    python benchmarks/mnre_quality.py --runs roc:0 --set train.lr_encoder=5e-5   # tuning on val
    python benchmarks/mnre_quality.py --protocol low_resource --epochs 10 --runs roc:0,cls:0
    python benchmarks/mnre_quality.py --protocol zero_shot --runs roc:0
    python benchmarks/mnre_quality.py --runs roc:0,roc:1,cls:0,cls:1 --jobs 4   # a GPU shared by 4

``--jobs N`` trains N runs at once, each in its own process (a GPU that one small model leaves
mostly idle). ``--results`` writes another file (runs on another machine); ``--merge that_file``
adds its entries to this one.

Protocols (``PROTOCOLS``): ``full`` (all of MNRE-2 train); ``low_resource`` (a fixed seeded
10 % of train, the same subset for every head and seed: ``data.train_fraction``,
``data.subset_seed``); ``zero_shot`` (every training sample of ``UNSEEN_RELATIONS`` removed and
those relations no candidates in training; val keeps all 23 relations as candidates). A
*budget* is the epochs plus the ``--set`` overrides plus the protocol's; the summary compares
ROC and classification within each budget; the headline comes from the full-data budget with the
most ROC and classification seeds (then the higher ROC mean), ``low_resource`` likewise, and
``zero_shot`` reports F1 on the unseen relations' samples and on the rest, next to the same
setting trained on all relations at the same budget.

Settings (``SETTINGS``): ``roc`` (retrieval over the shipped descriptions, K=5, ``None`` one
more described relation: the paper's design as far as it is known, and the default of
``configs/mnre.py``), ``cls`` (the plain softmax head on the same encoder), and the ablations
``roc_untyped`` (markers without entity types), ``roc_label_names`` (K=1, the label path as text),
``roc_one_description`` (K=1, the first description), ``roc_trained_descriptions`` (the
description tower trained, not frozen) and ``roc_no_images``. Retired hypotheses (``RETIRED``)
stay in the results file and the summary with the commit that last had their code.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchlib import machine

from roc_jax.metrics import subset_prf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mnre_quality.json"
DESCRIPTIONS = ROOT / "roc_jax" / "labels" / "data" / "mnre_descriptions.json"

# setting -> config overrides (the ``{...}`` values are files this script writes in the workroot)
SETTINGS: dict[str, dict[str, Any]] = {
    "roc": {},
    "cls": {"model.head": "classification"},
    "roc_untyped": {"data.marker_style": "untyped"},
    "roc_label_names": {"data.descriptions": "{label_names}"},
    "roc_one_description": {"data.descriptions": "{one_description}"},
    "roc_trained_descriptions": {"model.train_description_tower": True},
    "roc_no_images": {"data.use_images": False},
}
# setting -> the commit that last had its code (hypotheses that lost on val; docs/results.md).
RETIRED = {"roc_centered": "0139920", "roc_lse": "0139920", "roc_bias": "0139920",
           "roc_threshold": "79f9902", "roc_offsets": "79f9902"}
SEEDED = ("roc", "cls")  # 3 seeds each; the ablations one seed
ALL_RUNS = [(s, seed) for s in SEEDED for seed in (0, 1, 2)] + \
    [(s, 0) for s in SETTINGS if s not in SEEDED]

LOW_RESOURCE_FRACTION = 0.1
# Five relations with at least 15 val samples each, none of the three largest (which would take
# most of the training signal with them).
UNSEEN_RELATIONS = ("/misc/loc/held_on", "/per/loc/place_of_residence", "/org/org/subsidiary",
                    "/per/per/couple", "/per/misc/nationality")
PROTOCOLS: dict[str, dict[str, str]] = {
    "full": {},
    "low_resource": {"data.train_fraction": str(LOW_RESOURCE_FRACTION)},
    "zero_shot": {"data.unseen_relations": repr(UNSEEN_RELATIONS)},
}


def protocol_of(sets: dict[str, Any]) -> str:
    for name in ("zero_shot", "low_resource"):
        if all(sets.get(k) == v for k, v in PROTOCOLS[name].items()):
            return name
    return "full"


def label_name_text(name: str) -> str:
    """``'/per/per/couple'`` -> ``'per per couple'``: the label path as text (``None`` stays)."""
    return " ".join(p for p in name.split("/") if p) or name


def write_ablation_descriptions(out_dir: Path) -> dict[str, str]:
    """The K=1 description files of two ablations, derived from the shipped file."""
    shipped = json.loads(DESCRIPTIONS.read_text())
    files = {}
    for key, pick in (("label_names", lambda name, d: label_name_text(name)),
                      ("one_description", lambda name, d: d[0])):
        rels = {name: {"descriptions": [pick(name, e["descriptions"])]}
                for name, e in shipped["relations"].items()}
        path = out_dir / f"descriptions_{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": {"derived_from": DESCRIPTIONS.name, "ablation": key},
                                    "relations": rels}, indent=1) + "\n")
        files[key] = str(path)
    return files


def overrides_of(setting: str, files: dict[str, str]) -> dict[str, Any]:
    return {k: (v.format(**files) if isinstance(v, str) else v)
            for k, v in SETTINGS[setting].items()}


def best_dev(workdir: Path) -> dict[str, Any]:
    """The dev evaluation with the highest micro-F1 (the selected checkpoint's metrics)."""
    reports = [json.loads(p.read_text()) for p in sorted((workdir / "dev_metrics").glob("*.json"))]
    if not reports:
        raise RuntimeError(f"{workdir}: no dev_metrics/*.json; the run did not reach an eval")
    return max(reports, key=lambda r: (r["f1"], -r["step"]))


def dev_curve(workdir: Path) -> dict[str, float]:
    """``{step: val micro-F1 in percent}`` of every dev evaluation of the run (the learning curve)."""
    reports = [json.loads(p.read_text()) for p in (workdir / "dev_metrics").glob("*.json")]
    return {str(r["step"]): 100 * r["f1"] for r in sorted(reports, key=lambda r: r["step"])}


def logged_progress(workdir: Path) -> tuple[int, float | None]:
    """From ``metrics.jsonl``: the last step logged (all attempts together) and the median of the
    logged ``train/examples_per_sec`` (steady state: the first, compile-heavy interval left out)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    steps = max(row["step"] for row in rows if "step" in row)
    rates = [row["train/examples_per_sec"] for row in rows if "train/examples_per_sec" in row]
    median = statistics.median(rates[1:] if len(rates) > 1 else rates) if rates else None
    return steps, median


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``['train.lr_encoder=5e-5', ...]`` -> ``{'train.lr_encoder': '5e-5'}`` (config_flags parses
    the values)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {item!r}: expected key=value (a config field)")
        out[key] = value
    return out


def budget_id(epochs: int, sets: dict[str, Any]) -> str:
    """``'e1'`` or ``'e1 train.lr_encoder=5e-5'``: the key that groups comparable runs."""
    return " ".join([f"e{epochs}"] + [f"{k}={v}" for k, v in sorted(sets.items())])


def entry_budget(entry: dict[str, Any]) -> str:
    return budget_id(entry["epochs"], entry.get("sets", {}))


def entry_key(entry: dict[str, Any]) -> tuple[str, int, str]:
    """(setting, seed, budget): what makes an entry unique in a results file."""
    return entry["setting"], entry["seed"], entry_budget(entry)


def run_dirname(setting: str, seed: int, epochs: int, sets: dict[str, Any]) -> str:
    """``'roc_s0_e1_lr_encoder5e-5'``: one folder per run, directly under the workroot (a value's
    path separators, as in a local encoder folder, become '-')."""
    suffix = "".join("_" + k.split(".")[-1] + re.sub(r"[^\w.=-]+", "-", str(v))
                     for k, v in sorted(sets.items()))
    return f"{setting}_s{seed}_e{epochs}{suffix}"


def run_one(setting: str, seed: int, epochs: int, sets: dict[str, Any],
            args: argparse.Namespace, files: dict[str, str]) -> dict[str, Any]:
    """Trains one setting and seed in its own process; returns the results entry."""
    workdir = Path(args.workroot) / run_dirname(setting, seed, epochs, sets)
    workdir.mkdir(parents=True, exist_ok=True)
    overrides = {"seed": seed, "num_epochs": epochs, "data.tfds_dir": args.tfds_dir,
                 **sets, **overrides_of(setting, files)}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", "configs/mnre.py:offline",
           "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "ROC_DATA_DIR": args.data_dir}
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(args.workroot) / "jax_cache"))
    if args.jobs > 1:
        # JAX takes 75 % of a GPU's memory by default: N processes must share it.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.jobs:.3f}")
    print(f"[{setting} seed {seed}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with (workdir / "train.log").open("a") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall = time.time() - t0
    # A run stopped and resumed in the same workdir adds its attempts' times.
    attempts_path = workdir / "attempts.json"
    attempts = json.loads(attempts_path.read_text()) if attempts_path.exists() else []
    attempts.append(wall)
    attempts_path.write_text(json.dumps(attempts))
    dev = best_dev(workdir)
    steps, logged_rate = logged_progress(workdir)
    return {
        "setting": setting, "seed": seed, "epochs": epochs, "sets": sets,
        "budget": budget_id(epochs, sets), "overrides": overrides,
        "command": " ".join(cmd), "workdir": str(workdir),
        "val": {"precision": 100 * dev["precision"], "recall": 100 * dev["recall"],
                "f1": 100 * dev["f1"], "accuracy": 100 * dev["accuracy"],
                "best_step": dev["step"]},
        "val_per_relation_f1": {r["relation"]: 100 * r["f1"] for r in dev["per_relation"]},
        "label_names": [r["relation"] for r in dev["per_relation"]],
        "val_confusion": dev["confusion"],
        "protocol": protocol_of(sets),
        "val_f1_by_step": dev_curve(workdir),
        "train_steps": steps,
        "train_time_s": sum(attempts),
        "attempts": len(attempts),
        # Whole process: model load, compiles, training, dev evaluations.
        "examples_per_s_wall": steps * args.batch_size / max(sum(attempts), 1e-9),
        "examples_per_s_logged_median": logged_rate,
        "concurrent_jobs": args.jobs,
    }


def _stats(xs: list[float]) -> tuple[float | None, float | None]:
    return (statistics.mean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None)


def budget_summary(group: list[dict[str, Any]]) -> dict[str, Any]:
    """ROC (``roc``), classification (``cls``) and every other setting of one budget."""
    names = [*SETTINGS, *RETIRED]
    f1s = {s: [e["val"]["f1"] for e in group if e["setting"] == s] for s in names}
    roc_m, roc_s = _stats(f1s["roc"])
    cls_m, cls_s = _stats(f1s["cls"])
    vs_cls = {}
    for s, xs in f1s.items():
        if s == "cls" or not xs or cls_m is None:
            continue
        m, sd = _stats(xs)
        row = {"mean": m, "std": sd, "seeds": len(xs), "minus_cls": m - cls_m}
        if sd is not None and cls_s is not None:
            # "beats by more than the seeds' spread": the gap exceeds the larger std
            row["beats_cls_beyond_spread"] = m - cls_m > max(sd, cls_s)
        if s in RETIRED:
            row["retired_after"] = RETIRED[s]
        vs_cls[s] = row
    b = {"roc_val_f1_mean": roc_m, "roc_val_f1_std": roc_s, "roc_seeds": len(f1s["roc"]),
         "cls_val_f1_mean": cls_m, "cls_val_f1_std": cls_s, "cls_seeds": len(f1s["cls"])}
    if "roc" in vs_cls:
        b["roc_minus_cls"] = vs_cls["roc"]["minus_cls"]
        if "beats_cls_beyond_spread" in vs_cls["roc"]:
            b["roc_beats_cls_beyond_spread"] = vs_cls["roc"]["beats_cls_beyond_spread"]
    b["per_setting_val_f1"] = {s: v for s, v in f1s.items() if v}
    b["vs_cls"] = vs_cls
    return b


def _headline(budgets: dict[str, dict[str, Any]]) -> str | None:
    """The budget with the most ROC and classification seeds, then the higher ROC mean."""
    if not budgets:
        return None
    return max(budgets, key=lambda k: (min(budgets[k]["roc_seeds"], budgets[k]["cls_seeds"]),
                                       budgets[k]["roc_seeds"] + budgets[k]["cls_seeds"],
                                       budgets[k]["roc_val_f1_mean"] or 0.0))


def _without_protocol(entry: dict[str, Any]) -> str:
    """The budget an entry would have on full data (its protocol's overrides left out)."""
    proto = PROTOCOLS[protocol_of(entry.get("sets", {}))]
    return budget_id(entry["epochs"], {k: v for k, v in entry.get("sets", {}).items()
                                       if k not in proto})


def zero_shot_summary(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """F1 on the unseen relations' val samples and on the seen relations', for the ``roc``
    setting of the zero-shot protocol, next to ``roc`` trained on all relations at the same
    budget and seeds (``seen_f1_all_relations``: its F1 on the same seen relations)."""
    runs = [e for e in entries if e["setting"] == "roc" and "val_confusion" in e
            and protocol_of(e.get("sets", {})) == "zero_shot"]
    if not runs:
        return None
    names = runs[0]["label_names"]
    unseen = [names.index(r) for r in UNSEEN_RELATIONS]
    seen = [i for i, n in enumerate(names) if n != "None" and i not in unseen]
    full = {(e["seed"], entry_budget(e)): e for e in entries if e["setting"] == "roc"
            and "val_confusion" in e and protocol_of(e.get("sets", {})) == "full"}
    rows = []
    for e in runs:
        row = {"seed": e["seed"], "budget": entry_budget(e),
               "unseen_f1": 100 * subset_prf(e["val_confusion"], unseen)["f1"],
               "seen_f1": 100 * subset_prf(e["val_confusion"], seen)["f1"],
               "all_f1": e["val"]["f1"]}
        ref = full.get((e["seed"], _without_protocol(e)))
        if ref is not None:
            row["seen_f1_all_relations"] = 100 * subset_prf(ref["val_confusion"], seen)["f1"]
        rows.append(row)
    out = {"unseen_relations": list(UNSEEN_RELATIONS),
           "unseen_val_samples": subset_prf(runs[0]["val_confusion"], unseen)["support"],
           "unseen_f1": statistics.mean(r["unseen_f1"] for r in rows),
           "seen_f1": statistics.mean(r["seen_f1"] for r in rows),
           "seeds": len(rows), "runs": rows,
           "classification": "cannot predict a relation it was not trained on: unseen F1 is 0"}
    refs = [r["seen_f1_all_relations"] for r in rows if "seen_f1_all_relations" in r]
    if len(refs) == len(rows):
        out["seen_f1_all_relations"] = statistics.mean(refs)
    return out


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per budget: ROC and classification val F1 over seeds; the headline from the best full-data
    budget; ``low_resource`` and ``zero_shot`` objects for those protocols."""
    budgets = {}
    for budget in sorted({entry_budget(e) for e in entries}):
        budgets[budget] = budget_summary([e for e in entries if entry_budget(e) == budget])
    protocols = {entry_budget(e): protocol_of(e.get("sets", {})) for e in entries}

    def pick(protocol):
        return _headline({k: v for k, v in budgets.items() if protocols[k] == protocol})

    keys = ("roc_val_f1_mean", "roc_val_f1_std", "roc_seeds", "cls_val_f1_mean",
            "cls_val_f1_std", "cls_seeds", "roc_minus_cls", "roc_beats_cls_beyond_spread")
    out: dict[str, Any] = {}
    head = pick("full")
    if head is not None:
        out = {"headline_budget": head, **{k: budgets[head][k] for k in keys
                                           if k in budgets[head]}, "vs_cls": budgets[head]["vs_cls"]}
    full_entries = [e for e in entries if protocols[entry_budget(e)] == "full"]
    best = max(full_entries, key=lambda e: e["val"]["f1"]) if full_entries else None
    out["best_val_f1"] = best["val"]["f1"] if best else None
    out["best_run"] = f"{best['setting']} seed {best['seed']} ({entry_budget(best)})" \
        if best else None
    low = pick("low_resource")
    if low is not None:
        out["low_resource"] = {"fraction": LOW_RESOURCE_FRACTION, "budget": low,
                               **{k: budgets[low][k] for k in keys if k in budgets[low]}}
    zero = zero_shot_summary(entries)
    if zero is not None:
        out["zero_shot"] = zero
    out["budgets"] = budgets
    return out


def markdown_table(result: dict[str, Any]) -> str:
    """The README's Results table: one row per budget and setting (mean, std over seeds)."""
    rows = ["| budget | setting | seeds | val micro-F1 (mean) | std | P | R | acc | train time |",
            "|---|---|---|---|---|---|---|---|---|"]
    runs = result["runs"]
    for budget in summarize(runs)["budgets"]:
        for setting in [*SETTINGS, *RETIRED]:
            group = [e for e in runs if entry_budget(e) == budget and e["setting"] == setting]
            if not group:
                continue
            f1 = [e["val"]["f1"] for e in group]

            def mean(key, group=group):
                return statistics.mean(e["val"][key] for e in group)

            std = f"{statistics.stdev(f1):.2f}" if len(f1) > 1 else "-"
            minutes = statistics.mean(e["train_time_s"] for e in group) / 60
            rows.append(f"| {budget} | {setting} | {len(f1)} | {statistics.mean(f1):.2f} | {std} "
                        f"| {mean('precision'):.2f} | {mean('recall'):.2f} "
                        f"| {mean('accuracy'):.2f} | {minutes:.1f} min |")
    return "\n".join(rows)


def parse_runs(spec: str) -> list[tuple[str, int]]:
    if spec == "all":
        return list(ALL_RUNS)
    runs = []
    for item in spec.split(","):
        setting, _, seed = item.partition(":")
        if setting not in SETTINGS:
            raise SystemExit(f"--runs: unknown setting {setting!r} (known: {sorted(SETTINGS)})")
        runs.append((setting, int(seed or 0)))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=os.environ.get("ROC_DATA_DIR")
                   or os.environ.get("ROC_MNRE_DIR", ""),
                   help="the raw MNRE folder (mnre_train.txt, mnre_val.txt, ours_rel2id.json)")
    p.add_argument("--runs", default="roc:0,cls:0", help="'all' or setting:seed,...")
    p.add_argument("--epochs", type=int, default=1, help="the budget of every run (same for all)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full",
                   help="full data, a seeded 10 %% of train, or zero-shot relations")
    p.add_argument("--batch_size", type=int, default=32, help="must match the config's")
    p.add_argument("--workroot", default=str(ROOT / "workdirs" / "mnre_quality"))
    p.add_argument("--tfds_dir", default="", help="shared TFDS build folder ('' -> default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override common to every run of this call (part of the budget)")
    p.add_argument("--force", action="store_true", help="rerun entries already in the results")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (a GPU has room for several)")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file to update")
    p.add_argument("--merge", type=Path, default=None,
                   help="add the entries of another results file that --results lacks, and exit")
    p.add_argument("--table", action="store_true",
                   help="print the README table of the results file and exit (runs nothing)")
    args = p.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.results.read_text())))
        return
    if args.merge:
        merge_results(args.merge, args.results)
        return
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs}: expected 1 or more")
    if not (Path(args.data_dir) / "mnre_train.txt").exists():
        raise SystemExit(f"--data_dir={args.data_dir!r}: mnre_train.txt not found "
                         "(point it, or ROC_DATA_DIR, at the raw MNRE folder)")
    files = write_ablation_descriptions(Path(args.workroot))
    old = json.loads(args.results.read_text()) if args.results.exists() else {}
    entries = old.get("runs", [])
    sets = {**PROTOCOLS[args.protocol], **parse_sets(args.set)}
    budget = budget_id(args.epochs, sets)

    todo, done = [], {entry_key(e) for e in entries}
    for setting, seed in parse_runs(args.runs):
        if (setting, seed, budget) in done and not args.force:
            print(f"[{setting} seed {seed}] already in {args.results.name}: skipped", flush=True)
        else:
            todo.append((setting, seed))
    if todo and args.jobs > 1:
        # The runs would otherwise all build the shared TFDS folder at once.
        prebuild_tfds(args, sets)
    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, setting, seed, args.epochs, sets, args, files):
                   (setting, seed) for setting, seed in todo}
        for future in as_completed(futures):
            setting, seed = futures[future]
            try:
                entry = future.result()
            except (subprocess.CalledProcessError, RuntimeError) as e:
                # The other runs go on; this one's train.log says why.
                print(f"[{setting} seed {seed}] FAILED ({e}); see its train.log", flush=True)
                failed += 1
                continue
            entry["machine"] = machine()
            entry["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            key = (setting, seed, budget)
            entries = [e for e in entries if entry_key(e) != key] + [entry]
            print(f"[{setting} seed {seed}] val F1 {entry['val']['f1']:.2f} "
                  f"(P {entry['val']['precision']:.2f} R {entry['val']['recall']:.2f}) in "
                  f"{entry['train_time_s'] / 60:.1f} min", flush=True)
            write_results(entries, args.results)
    if failed:
        raise SystemExit(f"{failed} of {len(todo)} runs failed")


def prebuild_tfds(args: argparse.Namespace, sets: dict[str, Any]) -> None:
    """Builds the TFDS folder once, before parallel runs read it: the build of train.py's
    ``load_sources``, with this call's ``data.*`` overrides (they name the build). No JAX
    computation runs here, so no accelerator memory is taken from the runs."""
    sys.path.insert(0, str(ROOT))
    os.environ["ROC_DATA_DIR"] = args.data_dir
    from configs.mnre import get_config
    from roc_jax.data import sources

    config = get_config("offline")
    config.data.tfds_dir = args.tfds_dir
    for key, value in sets.items():
        if key.startswith("data."):
            field = key.split(".", 1)[1]
            current = config.data[field]
            config.data[field] = value if isinstance(current, str) else ast.literal_eval(value)
    sources.load_sources(config, ("train", "val"))


def merge_results(other: Path, path: Path = RESULTS) -> list[dict[str, Any]]:
    """Adds the entries of ``other`` (same setting, seed and budget not yet in ``path``) to
    ``path``; an entry already there is kept, not overwritten. Returns the added entries."""
    entries = json.loads(path.read_text())["runs"] if path.exists() else []
    have = {entry_key(e) for e in entries}
    added = [e for e in json.loads(other.read_text())["runs"] if entry_key(e) not in have]
    print(f"{other}: {len(added)} entries added to {path}", flush=True)
    write_results(entries + added, path)
    return added


def write_results(entries: list[dict[str, Any]], path: Path = RESULTS) -> None:
    """Atomically rewrites the results file: every entry and the summary over them."""
    result = {"benchmark": "mnre_quality", "summary": summarize(entries), "runs": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, path)
    print(json.dumps(result["summary"], indent=1), flush=True)


if __name__ == "__main__":
    main()
