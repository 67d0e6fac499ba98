"""Real MNRE-2 quality: ROC against the classification head on the same encoder, and ablations.

Every run is ``train.py --config configs/mnre.py:offline`` (MiniLM-L6 + DINOv2-S/14, MNRE-2
train, dev = val) in its own process with a seed and the overrides of its setting (``SETTINGS``:
``roc``, ``cls`` and the ablations; ``RETIRED`` ones keep the commit of their code) and protocol
(``PROTOCOLS``: ``full``, ``low_resource``, ``zero_shot``); its figures are its best dev
evaluation's (val micro-F1 without ``None``). Results accumulate in
``benchmarks/results/mnre_quality.json``, one entry per setting, seed and budget (the epochs plus
the ``--set`` and protocol overrides; never rerun), with a ``summary`` over every entry whose
headline is the full-data budget with the most seeds of both heads. See docs/results.md.

    python benchmarks/mnre_quality.py --data_dir /path/to/mnre --runs roc:0,cls:0
    python benchmarks/mnre_quality.py --runs all --set train.lr_encoder=5e-5   # 3 seeds + ablations
    python benchmarks/mnre_quality.py --protocol low_resource --epochs 10 --runs roc:0 --jobs 4
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

from benchlib import machine, write_json

from roc_jax.metrics import subset_prf

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mnre_quality.json"
DESCRIPTIONS = ROOT / "roc_jax" / "labels" / "data" / "mnre_descriptions.json"

# setting -> config overrides (``{...}``: files written in the workroot). ``roc``: the paper's
# one-way loss, which the ablations change; ``roc_symmetric``: configs/mnre.py's default.
ONE_WAY = {"train.relation_to_pair_weight": 0.0}
SETTINGS: dict[str, dict[str, Any]] = {
    "roc": ONE_WAY, "cls": {"model.head": "classification"},
    "roc_untyped": {**ONE_WAY, "data.marker_style": "untyped"},
    "roc_label_names": {**ONE_WAY, "data.descriptions": "{label_names}"},
    "roc_one_description": {**ONE_WAY, "data.descriptions": "{one_description}"},
    "roc_trained_descriptions": {**ONE_WAY, "model.train_description_tower": True},
    "roc_no_images": {**ONE_WAY, "data.use_images": False},
    "roc_symmetric": {"train.relation_to_pair_weight": 1.0},
    "cls_symmetric": {"model.head": "classification",  # a control: the default's column loss
                      "train.relation_to_pair_weight": 1.0, "train.softmax_relation_to_pair": True}}
# setting -> the commit that last had its code (hypotheses that lost on val; docs/results.md).
RETIRED = {"roc_centered": "0139920", "roc_lse": "0139920", "roc_bias": "0139920",
           "roc_threshold": "79f9902", "roc_offsets": "79f9902", "roc_prompts": "b22b7bd",
           "roc_la": "896660f", "roc_symmetric_w2": "90e2a10", "roc_symmetric_supcon": "c8db10a",
           "roc_symmetric_offsets": "b41bef3", "roc_symmetric_norm": "82a217e",
           "roc_symmetric_prior": "daa88d5", "roc_symmetric_fixed": "8a0b6d5"}
DEFAULT_ROC = "roc_symmetric"  # the summary's ROC where a budget has it, else roc
ALL_RUNS = [(s, seed) for s in ("roc", "cls", DEFAULT_ROC) for seed in (0, 1, 2)] + \
    [(s, 0) for s in list(SETTINGS)[2:] if s != DEFAULT_ROC]  # 3 seeds; the ablations one

LOW_RESOURCE_FRACTION = 0.1
# Five relations with at least 15 val samples each, none of the three largest (most of the signal).
UNSEEN_RELATIONS = ("/misc/loc/held_on", "/per/loc/place_of_residence", "/org/org/subsidiary",
                    "/per/per/couple", "/per/misc/nationality")
PROTOCOLS: dict[str, dict[str, str]] = {
    "full": {}, "low_resource": {"data.train_fraction": str(LOW_RESOURCE_FRACTION)},
    "zero_shot": {"data.unseen_relations": repr(UNSEEN_RELATIONS)}}
SUMMARY_KEYS = ("roc_setting", "roc_val_f1_mean", "roc_val_f1_std", "roc_seeds", "cls_val_f1_mean",
                "cls_val_f1_std", "cls_seeds", "roc_minus_cls", "roc_beats_cls_beyond_spread",
                "cls_same_loss_val_f1_mean", "cls_same_loss_val_f1_std", "cls_same_loss_seeds")


def protocol_of(sets: dict[str, Any]) -> str:
    return next((name for name in ("zero_shot", "low_resource")
                 if all(sets.get(k) == v for k, v in PROTOCOLS[name].items())), "full")


def write_ablation_descriptions(out_dir: Path) -> dict[str, str]:
    """The K=1 description files of two ablations, derived from the shipped file: the label path
    as text (``'/per/per/couple'`` -> ``'per per couple'``, ``None`` stays) and the first one."""
    shipped = json.loads(DESCRIPTIONS.read_text())["relations"]
    picks = {"label_names": lambda name, d: " ".join(p for p in name.split("/") if p) or name,
             "one_description": lambda name, d: d[0]}
    out_dir.mkdir(parents=True, exist_ok=True)
    for key, pick in picks.items():
        rels = {name: {"descriptions": [pick(name, e["descriptions"])]}
                for name, e in shipped.items()}
        meta = {"derived_from": DESCRIPTIONS.name, "ablation": key}
        (out_dir / f"descriptions_{key}.json").write_text(
            json.dumps({"meta": meta, "relations": rels}, indent=1) + "\n")
    return {key: str(out_dir / f"descriptions_{key}.json") for key in picks}


def overrides_of(setting: str, files: dict[str, str]) -> dict[str, Any]:
    return {k: (v.format(**files) if isinstance(v, str) else v)
            for k, v in SETTINGS[setting].items()}


def _dev_reports(workdir: Path) -> list[dict[str, Any]]:  # every dev evaluation of a run
    return [json.loads(p.read_text()) for p in (workdir / "dev_metrics").glob("*.json")]


def best_dev(workdir: Path) -> dict[str, Any]:
    """The dev evaluation with the highest micro-F1 (the selected checkpoint's metrics)."""
    if not (reports := _dev_reports(workdir)):
        raise RuntimeError(f"{workdir}: no dev_metrics/*.json; the run did not reach an eval")
    return max(reports, key=lambda r: (r["f1"], -r["step"]))


def dev_curve(workdir: Path) -> dict[str, float]:
    """``{step: val micro-F1 in percent}`` of every dev evaluation (the learning curve)."""
    return {str(r["step"]): 100 * r["f1"]
            for r in sorted(_dev_reports(workdir), key=lambda r: r["step"])}


def logged_progress(workdir: Path) -> tuple[int, float | None]:
    """The last logged step (all attempts), the median logged examples/s (compile interval out)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    rates = [row["train/examples_per_sec"] for row in rows if "train/examples_per_sec" in row]
    return (max(row["step"] for row in rows if "step" in row),
            statistics.median(rates[1:] or rates) if rates else None)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``['train.lr_encoder=5e-5']`` -> ``{'train.lr_encoder': '5e-5'}`` (values parsed later)."""
    if bad := [item for item in items if not item.partition("=")[0] or "=" not in item]:
        raise SystemExit(f"--set {bad[0]!r}: expected key=value (a config field)")
    return dict(item.split("=", 1) for item in items)


def budget_id(epochs: int, sets: dict[str, Any]) -> str:
    """``'e1'`` or ``'e1 train.lr_encoder=5e-5'``: the key that groups comparable runs."""
    return " ".join([f"e{epochs}"] + [f"{k}={v}" for k, v in sorted(sets.items())])


def entry_budget(entry: dict[str, Any]) -> str:
    return budget_id(entry["epochs"], entry.get("sets", {}))


def entry_key(entry: dict[str, Any]) -> tuple[str, int, str]:  # unique in a results file
    return entry["setting"], entry["seed"], entry_budget(entry)


def run_dirname(setting: str, seed: int, epochs: int, sets: dict[str, Any]) -> str:
    """``'roc_s0_e1_lr_encoder5e-5'``: the run's folder in the workroot (separators become '-')."""
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
    if args.jobs > 1:  # JAX takes 75 % of a GPU's memory by default: N processes must share it.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.jobs:.3f}")
    print(f"[{setting} seed {seed}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with (workdir / "train.log").open("a") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    # A run stopped and resumed in the same workdir adds its attempts' times.
    path = workdir / "attempts.json"
    attempts = [*(json.loads(path.read_text()) if path.exists() else []), time.time() - t0]
    path.write_text(json.dumps(attempts))
    dev = best_dev(workdir)
    steps, logged_rate = logged_progress(workdir)
    return {
        "setting": setting, "seed": seed, "epochs": epochs, "sets": sets,
        "budget": budget_id(epochs, sets), "overrides": overrides, "command": " ".join(cmd),
        "workdir": str(workdir), "val": {**{k: 100 * dev[k] for k in (
            "precision", "recall", "f1", "accuracy")}, "best_step": dev["step"]},
        "val_per_relation_f1": {r["relation"]: 100 * r["f1"] for r in dev["per_relation"]},
        "label_names": [r["relation"] for r in dev["per_relation"]],
        "val_confusion": dev["confusion"], "protocol": protocol_of(sets),
        "val_f1_by_step": dev_curve(workdir), "train_steps": steps,
        "train_time_s": sum(attempts), "attempts": len(attempts),
        # Whole process: model load, compiles, training, dev evaluations.
        "examples_per_s_wall": steps * args.batch_size / max(sum(attempts), 1e-9),
        "examples_per_s_logged_median": logged_rate, "concurrent_jobs": args.jobs}


def _stats(xs: list[float]) -> tuple[float | None, float | None]:
    return (statistics.mean(xs) if xs else None, statistics.stdev(xs) if len(xs) > 1 else None)


def budget_summary(group: list[dict[str, Any]]) -> dict[str, Any]:
    """ROC (``DEFAULT_ROC`` if the budget has it, else ``roc``), ``cls`` and every other setting."""
    f1s = {s: [e["val"]["f1"] for e in group if e["setting"] == s] for s in [*SETTINGS, *RETIRED]}
    roc = DEFAULT_ROC if f1s[DEFAULT_ROC] else "roc"
    (roc_m, roc_s), (cls_m, cls_s) = _stats(f1s[roc]), _stats(f1s["cls"])
    vs_cls = {}
    for s, xs in f1s.items():
        if s == "cls" or not xs or cls_m is None:
            continue
        m, sd = _stats(xs)
        row = {"mean": m, "std": sd, "seeds": len(xs), "minus_cls": m - cls_m}
        if sd is not None and cls_s is not None:
            # "beats by more than the seeds' spread": the gap exceeds the larger std
            row["beats_cls_beyond_spread"] = m - cls_m > max(sd, cls_s)
        vs_cls[s] = {**row, **({"retired_after": RETIRED[s]} if s in RETIRED else {})}
    b = {"roc_setting": roc, "roc_val_f1_mean": roc_m, "roc_val_f1_std": roc_s,
         "roc_seeds": len(f1s[roc]), "cls_val_f1_mean": cls_m, "cls_val_f1_std": cls_s,
         "cls_seeds": len(f1s["cls"])}
    b.update({f"roc_{k}": v for k, v in vs_cls.get(roc, {}).items()
              if k in ("minus_cls", "beats_cls_beyond_spread")})
    if xs := f1s["cls_symmetric"]:  # the softmax head trained with the default's loss
        m, sd = _stats(xs)
        b.update(cls_same_loss_val_f1_mean=m, cls_same_loss_val_f1_std=sd, cls_same_loss_seeds=len(xs))
    return {**b, "per_setting_val_f1": {s: v for s, v in f1s.items() if v}, "vs_cls": vs_cls}


def _headline(budgets: dict[str, dict[str, Any]]) -> str | None:
    """Budgets with ``DEFAULT_ROC`` first, then the most ROC and cls seeds, the higher ROC mean."""
    return max(budgets, default=None, key=lambda k: (
        budgets[k]["roc_setting"] == DEFAULT_ROC, min(budgets[k]["roc_seeds"], budgets[k]["cls_seeds"]),
        budgets[k]["roc_seeds"] + budgets[k]["cls_seeds"], budgets[k]["roc_val_f1_mean"] or 0.0))


def zero_shot_summary(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """ROC's zero-shot F1 on the unseen and the seen relations' val samples, and
    ``seen_f1_all_relations``: the same setting trained on all relations, same budget and seeds.
    The setting is ``DEFAULT_ROC`` where it has zero-shot runs, else ``roc``."""
    setting = next((s for s in (DEFAULT_ROC, "roc") if any(e["setting"] == s and protocol_of(
        e.get("sets", {})) == "zero_shot" for e in entries)), "roc")
    roc = [e for e in entries if e["setting"] == setting and "val_confusion" in e]
    if not (runs := [e for e in roc if protocol_of(e.get("sets", {})) == "zero_shot"]):
        return None
    unseen = [runs[0]["label_names"].index(r) for r in UNSEEN_RELATIONS]
    seen = [i for i, n in enumerate(runs[0]["label_names"]) if n != "None" and i not in unseen]
    full = {(e["seed"], entry_budget(e)): e for e in roc
            if protocol_of(e.get("sets", {})) == "full"}
    rows = []
    for e in runs:  # the same seed and budget on all relations: the reference of seen F1
        row = {"seed": e["seed"], "budget": entry_budget(e),
               "unseen_f1": 100 * subset_prf(e["val_confusion"], unseen)["f1"],
               "seen_f1": 100 * subset_prf(e["val_confusion"], seen)["f1"],
               "all_f1": e["val"]["f1"]}
        ref = full.get((e["seed"], budget_id(e["epochs"], {
            k: v for k, v in e["sets"].items() if k not in PROTOCOLS["zero_shot"]})))
        if ref is not None:
            row["seen_f1_all_relations"] = 100 * subset_prf(ref["val_confusion"], seen)["f1"]
        rows.append(row)
    out = {"setting": setting, "unseen_relations": list(UNSEEN_RELATIONS),
           "unseen_val_samples": subset_prf(runs[0]["val_confusion"], unseen)["support"],
           **{k: statistics.mean(r[k] for r in rows) for k in ("unseen_f1", "seen_f1")},
           "seeds": len(rows), "runs": rows,
           "classification": "cannot predict a relation it was not trained on: unseen F1 is 0"}
    if all("seen_f1_all_relations" in r for r in rows):
        out["seen_f1_all_relations"] = statistics.mean(r["seen_f1_all_relations"] for r in rows)
    return out


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per budget: ROC and classification val F1 over seeds; the headline from the best full-data
    budget; ``low_resource`` and ``zero_shot`` objects for those protocols."""
    budgets = {b: budget_summary([e for e in entries if entry_budget(e) == b])
               for b in sorted({entry_budget(e) for e in entries})}
    protocols = {entry_budget(e): protocol_of(e.get("sets", {})) for e in entries}

    def pick(protocol):
        return _headline({k: v for k, v in budgets.items() if protocols[k] == protocol})

    def figures(budget):  # the summary's copy of a budget's headline figures
        return {k: budgets[budget][k] for k in SUMMARY_KEYS if k in budgets[budget]}

    head = pick("full")
    out: dict[str, Any] = {} if head is None else {
        "headline_budget": head, **figures(head), "vs_cls": budgets[head]["vs_cls"]}
    best = max((e for e in entries if protocols[entry_budget(e)] == "full"),
               key=lambda e: e["val"]["f1"], default=None)
    out["best_val_f1"] = best and best["val"]["f1"]
    out["best_run"] = best and f"{best['setting']} seed {best['seed']} ({entry_budget(best)})"
    if (low := pick("low_resource")) is not None:
        out["low_resource"] = {"fraction": LOW_RESOURCE_FRACTION, "budget": low, **figures(low)}
    if (zero := zero_shot_summary(entries)) is not None:
        out["zero_shot"] = zero
    return {**out, "budgets": budgets}


def markdown_table(result: dict[str, Any]) -> str:
    """The README's Results table: one row per budget and setting (mean, std over seeds)."""
    rows = ["| budget | setting | seeds | val micro-F1 (mean) | std | P | R | acc | train time |",
            "|---|---|---|---|---|---|---|---|---|"]
    runs = result["runs"]
    settings = [*SETTINGS, *RETIRED]
    for budget, setting in ((b, s) for b in summarize(runs)["budgets"] for s in settings):
        if group := [e for e in runs if entry_budget(e) == budget and e["setting"] == setting]:
            m = {k: statistics.mean(e["val"][k] for e in group)
                 for k in ("f1", "precision", "recall", "accuracy")}
            std = f"{statistics.stdev(e['val']['f1'] for e in group):.2f}" if group[1:] else "-"
            minutes = statistics.mean(e["train_time_s"] for e in group) / 60
            rows.append(f"| {budget} | {setting} | {len(group)} | {m['f1']:.2f} | {std} | "
                        + " | ".join(f"{m[k]:.2f}" for k in ("precision", "recall", "accuracy"))
                        + f" | {minutes:.1f} min |")
    return "\n".join(rows)


def parse_runs(spec: str) -> list[tuple[str, int]]:
    runs = list(ALL_RUNS) if spec == "all" else [
        (item.partition(":")[0], int(item.partition(":")[2] or 0)) for item in spec.split(",")]
    if bad := [setting for setting, _ in runs if setting not in SETTINGS]:
        raise SystemExit(f"--runs: unknown setting {bad[0]!r} (known: {sorted(SETTINGS)})")
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    env_data = os.environ.get("ROC_DATA_DIR") or os.environ.get("ROC_MNRE_DIR", "")
    for flag, default, help_ in (
            ("--data_dir", env_data, "the raw MNRE folder (mnre_train.txt, ours_rel2id.json)"),
            ("--runs", "roc:0,cls:0", "'all' or setting:seed,..."),
            ("--workroot", str(ROOT / "workdirs" / "mnre_quality"), "one folder per run here"),
            ("--tfds_dir", "", "shared TFDS build folder ('' -> default)")):
        p.add_argument(flag, default=default, help=help_)
    p.add_argument("--epochs", type=int, default=1, help="the budget of every run (same for all)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="full")
    p.add_argument("--batch_size", type=int, default=32, help="must match the config's")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override common to every run of this call (part of the budget)")
    p.add_argument("--force", action="store_true", help="rerun entries already in the results")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each")
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file to update")
    p.add_argument("--merge", type=Path, help="add another results file's new entries, and exit")
    p.add_argument("--table", action="store_true", help="print the README table, and exit")
    args = p.parse_args()
    if args.table:
        return print(markdown_table(json.loads(args.results.read_text())))
    if args.merge:
        return merge_results(args.merge, args.results)
    if args.jobs < 1:
        raise SystemExit(f"--jobs={args.jobs}: expected 1 or more")
    if not (Path(args.data_dir) / "mnre_train.txt").exists():
        raise SystemExit(f"--data_dir={args.data_dir!r}: no mnre_train.txt (or set ROC_DATA_DIR)")
    files = write_ablation_descriptions(Path(args.workroot))
    entries = json.loads(args.results.read_text())["runs"] if args.results.exists() else []
    sets = {**PROTOCOLS[args.protocol], **parse_sets(args.set)}
    budget = budget_id(args.epochs, sets)
    done = {entry_key(e) for e in entries} if not args.force else set()
    todo = [(s, seed) for s, seed in parse_runs(args.runs) if (s, seed, budget) not in done]
    for setting, seed in sorted(set(parse_runs(args.runs)) - set(todo)):
        print(f"[{setting} seed {seed}] already in {args.results.name}: skipped")
    if todo and args.jobs > 1:
        prebuild_tfds(args, sets)  # else the runs would all build the shared TFDS folder
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
            entry.update(machine=machine(),
                         finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            entries = [e for e in entries if entry_key(e) != (setting, seed, budget)] + [entry]
            v = entry["val"]
            print(f"[{setting} seed {seed}] val F1 {v['f1']:.2f} (P {v['precision']:.2f} R "
                  f"{v['recall']:.2f}) in {entry['train_time_s'] / 60:.1f} min", flush=True)
            write_results(entries, args.results)
    if failed:
        raise SystemExit(f"{failed} of {len(todo)} runs failed")


def prebuild_tfds(args: argparse.Namespace, sets: dict[str, Any]) -> None:
    """Builds the TFDS folder of this call's ``data.*`` overrides once, before parallel runs read
    it (no JAX computation: no accelerator memory is taken from the runs)."""
    sys.path.insert(0, str(ROOT))
    os.environ["ROC_DATA_DIR"] = args.data_dir
    from configs.mnre import get_config
    from roc_jax.data import sources

    config = get_config("offline")
    config.data.tfds_dir = args.tfds_dir
    for field, value in ((k[5:], v) for k, v in sets.items() if k.startswith("data.")):
        config.data[field] = value if isinstance(config.data[field], str) else ast.literal_eval(value)
    sources.load_sources(config, ("train", "val"))


def merge_results(other: Path, path: Path = RESULTS) -> None:
    """Adds the entries of ``other`` whose setting, seed and budget ``path`` lacks."""
    entries = json.loads(path.read_text())["runs"] if path.exists() else []
    have = {entry_key(e) for e in entries}
    added = [e for e in json.loads(other.read_text())["runs"] if entry_key(e) not in have]
    print(f"{other}: {len(added)} entries added to {path}", flush=True)
    write_results(entries + added, path)


def write_results(entries: list[dict[str, Any]], path: Path = RESULTS) -> None:
    """Atomically rewrites the results file: every entry and the summary over them."""
    result = {"benchmark": "mnre_quality", "summary": summarize(entries), "runs": entries}
    write_json(path, result)
    print(json.dumps(result["summary"], indent=1), flush=True)


if __name__ == "__main__":
    main()
