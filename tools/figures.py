"""The interpretability and robustness figures of docs/results.md, from trained workdirs.

    python tools/figures.py --roc workdirs/roc_s0 --cls workdirs/cls_s0 \\
        --data_dir ../shared/data/mnre [--robustness benchmarks/results/robustness.json]
    python tools/figures.py --robustness benchmarks/results/robustness.json   # that one only

Writes to ``--out`` (default ``docs/figures/``):

- ``pair_map.png``: the val pair vectors of the ROC model in 2-D (PCA, the first two principal
  components of the pair vectors), coloured by gold relation, with each relation's prototype
  (the normalized mean of its projected description vectors, the vector the pair is scored
  against) projected into the same plane;
- ``per_relation_f1.png``: val F1 per relation for both heads, with each relation's support;
- ``confusion_roc.png`` / ``confusion_cls.png``: the val confusion matrices (rows gold);
- ``examples.png``: a handful of val posts with the ROC model's top relations and, for each,
  its nearest description, as ``predict.py`` prints them;
- ``robustness.png`` (with ``--robustness``): the F1 drop of each head under each perturbation.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DPI = 100


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _colours(n: int) -> list:
    # tab20 without its two greys (grey is None's colour), then Dark2.
    palette = [plt.get_cmap("tab20")(i) for i in range(20) if i not in (14, 15)]
    return (palette + [plt.get_cmap("Dark2")(i) for i in range(8)])[:n]


def pca_2d(x: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """``x`` ``[N, D]`` and ``others`` ``[M, D]`` projected on the first two principal components
    of ``x`` -> ``[N, 2]``, ``[M, 2]``...; also returns the explained variance ratio ``[2]``."""
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    ratio = (s[:2] ** 2) / (s ** 2).sum()
    return (*((a - mean) @ vt[:2].T for a in (x, *others)), ratio)


def pair_map(pairs: np.ndarray, labels: np.ndarray, prototypes: np.ndarray,
             names: Sequence[str], path: Path) -> Path:
    """Scatter of ``pairs`` ``[N, P]`` coloured by ``labels`` ``[N]``, prototypes ``[R, P]``
    as labelled stars, in the PCA plane of the pairs."""
    xy, proto, ratio = pca_2d(pairs, prototypes)
    # Prototypes are unit vectors, pairs too: they share a scale, but the prototypes sit closer
    # to the origin of the plane; they are drawn where PCA puts them, not rescaled.
    fig, ax = plt.subplots(figsize=(11, 8))
    colours = _colours(len(names))
    none = [i for i, n in enumerate(names) if n == "None"]
    for r, name in enumerate(names):
        sel = labels == r
        if not sel.any():
            continue
        kw = dict(s=6, alpha=0.25, color="lightgray") if r in none else \
            dict(s=12, alpha=0.8, color=colours[r])
        ax.scatter(xy[sel, 0], xy[sel, 1], label=f"{name} ({sel.sum()})", **kw)
    for r, name in enumerate(names):
        ax.scatter(*proto[r], marker="*", s=260, color=colours[r] if r not in none else "gray",
                   edgecolor="black", linewidth=0.8, zorder=5)
        ax.annotate(name, proto[r], fontsize=7, xytext=(4, 4), textcoords="offset points",
                    zorder=6)
    ax.set_xlabel(f"principal component 1 ({100 * ratio[0]:.0f} % of the variance)")
    ax.set_ylabel(f"principal component 2 ({100 * ratio[1]:.0f} % of the variance)")
    ax.set_title("ROC: val pair vectors (dots, by gold relation) and relation prototypes (stars)"
                 "\nPCA of the pair vectors; prototypes projected into the same plane")
    ax.legend(fontsize=7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5),
              title="gold relation (val samples)", title_fontsize=8)
    return _save(fig, path)


def per_relation_f1(reports: dict[str, list[dict]], path: Path) -> Path:
    """Horizontal bars: F1 per relation (``metrics.per_relation_report`` rows) for each head."""
    heads = list(reports)
    rows = {h: {r["relation"]: r for r in reports[h]} for h in heads}
    names = [r["relation"] for r in reports[heads[0]]]
    names = sorted(names, key=lambda n: -rows[heads[0]][n]["support"])
    fig, ax = plt.subplots(figsize=(9, 10))
    y = np.arange(len(names))
    height = 0.8 / len(heads)
    for i, h in enumerate(heads):
        ax.barh(y + i * height, [100 * rows[h][n]["f1"] for n in names], height=height,
                label=h)
    ax.set_yticks(y + height * (len(heads) - 1) / 2,
                  labels=[f"{n} ({rows[heads[0]][n]['support']})" for n in names], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("val F1 (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("F1 per relation on MNRE-2 val (val support in brackets), both heads")
    return _save(fig, path)


def confusion(cm: np.ndarray, names: Sequence[str], title: str, path: Path) -> Path:
    """The confusion matrix ``[R, R]`` (rows gold, columns predicted), log-scaled colours, every
    non-zero count printed; labels and title outside the axes, never cut."""
    cm = np.asarray(cm)
    n = len(names)
    fig, ax = plt.subplots(figsize=(12, 11))
    ax.imshow(np.log1p(cm), cmap="Blues")
    ax.set_xticks(range(n), labels=list(names), rotation=60, ha="right", fontsize=9,
                  rotation_mode="anchor")
    ax.set_yticks(range(n), labels=list(names), fontsize=9)
    ax.set_xlabel("predicted relation", fontsize=10)
    ax.set_ylabel("gold relation", fontsize=10)
    ax.set_title(title, fontsize=11, pad=12)
    vmax = np.log1p(cm).max()
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                dark = np.log1p(cm[i, j]) > 0.6 * vmax
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    return _save(fig, path)


def examples(items: list[dict], path: Path) -> Path:
    """Text panel: for each post its gold relation and the top relations with probability and
    nearest description (``predict.py``'s output)."""
    lines: list[tuple[str, dict]] = []
    for it in items:
        lines.append((textwrap.shorten(it["text"], 120, placeholder=" ..."),
                      dict(weight="bold")))
        lines.append((f"gold: {it['gold']}", dict(color="dimgray")))
        for i, r in enumerate(it["top"], 1):
            mark = "  <- gold" if r["relation"] == it["gold"] else ""
            lines.append((f"  {i}. {r['relation']:<28} p={r['probability']:.2f}{mark}", {}))
            lines.append(("       " + textwrap.shorten(r["description"], 105, placeholder=" ..."),
                          dict(color="tab:blue", style="italic")))
        lines.append(("", {}))
    fig = plt.figure(figsize=(11, 0.2 * len(lines) + 0.6))
    fig.text(0.01, 1 - 0.1 / (0.2 * len(lines) + 0.6),
             "ROC on MNRE-2 val posts: top relations and each one's nearest description",
             fontsize=11, weight="bold", va="top")
    for k, (text, kw) in enumerate(lines):
        fig.text(0.01, 1 - (0.45 + 0.2 * k) / (0.2 * len(lines) + 0.6), text,
                 family="monospace", fontsize=8.5, va="top", **kw)
    return _save(fig, path)


def robustness(report: dict, path: Path) -> Path:
    """Grouped bars: mean F1 drop (points, spread over seeds as error bars) per perturbation."""
    variants = [v for v in report["variants"] if v != "clean"]
    heads = [h for h in ("roc", "cls") if any(h in report["variants"][v] for v in variants)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(variants))
    width = 0.8 / len(heads)
    for i, h in enumerate(heads):
        rows = [report["variants"][v].get(h, {}) for v in variants]
        stds = [r.get("drop_std") for r in rows]
        ax.bar(x + i * width, [r.get("drop_mean") or 0 for r in rows], width,
               yerr=[s or 0 for s in stds] if any(s is not None for s in stds) else None,
               capsize=3, label={"roc": "ROC (retrieval)", "cls": "classification"}[h])
        for xi, r in zip(x, rows, strict=True):
            if not r:
                ax.text(xi + i * width, 0.3, "ROC only", ha="center", fontsize=7, rotation=90)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(x + width * (len(heads) - 1) / 2, labels=variants, rotation=20, ha="right")
    seeds = {h: len(report["summary"][f"{h}_seeds"]) for h in heads}
    ax.set_ylabel("val F1 drop from clean (points)")
    ax.set_title("MNRE-2 val micro-F1 drop under each perturbation (higher: less robust)\nseeds: "
                 + ", ".join(f"{n} {h}" for h, n in seeds.items())
                 + "; error bars: std over seeds where there are several")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--roc", help="a trained ROC (retrieval head) workdir")
    p.add_argument("--cls", help="a classification workdir, same budget (with --roc)")
    p.add_argument("--data_dir", default=None, help="raw MNRE folder (default: the recorded one)")
    p.add_argument("--robustness", type=Path, default=None, help="benchmarks' robustness.json")
    p.add_argument("--examples", default="0,5,17,40,61", help="val sample indices to show")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = p.parse_args()
    import roc_jax
    from roc_jax import robustness as rob

    if (args.roc is None) != (args.cls is None) or (args.roc is None and not args.robustness):
        p.error("give --roc and --cls (the model figures), --robustness, or all three")
    reports, written = {}, []
    for head, workdir in (("ROC", args.roc), ("classification", args.cls))[:2 * bool(args.roc)]:
        loaded = roc_jax.load(workdir, data_dir=args.data_dir)
        samples = rob.read_split(loaded.config, "val")
        ev, _ = rob.evaluate_variant(loaded, "val", samples=samples)
        reports[head] = ev.metrics["per_relation"]
        key = "roc" if head == "ROC" else "cls"
        written.append(confusion(ev.metrics["confusion"], ev.label_names,
                                 f"{head}: MNRE-2 val confusion (rows gold, columns predicted), "
                                 f"micro-F1 {100 * ev.metrics['f1']:.2f}",
                                 args.out / f"confusion_{key}.png"))
        if head == "ROC":
            written.append(pair_map(ev.pairs, ev.labels, ev.prototypes, ev.label_names,
                                    args.out / "pair_map.png"))
            items = []
            for i in (int(x) for x in args.examples.split(",")):
                s = samples[i]
                marked = list(s.tokens)
                for e, (o, c) in sorted(((s.head, ("[[", "]]")), (s.tail, ("[[", "]]"))),
                                        key=lambda ec: -ec[0].span[0]):
                    marked[e.span[0]:e.span[1]] = [o + " ".join(marked[e.span[0]:e.span[1]])
                                                   + c]
                top = loaded.predict(list(s.tokens), s.image_path, head=s.head.span,
                                     tail=s.tail.span, top_k=3)
                items.append({"text": f"{s.source}: " + " ".join(marked), "gold": s.relation,
                              "top": top})
            written.append(examples(items, args.out / "examples.png"))
    if reports:
        written.append(per_relation_f1(reports, args.out / "per_relation_f1.png"))
    if args.robustness is not None:
        written.append(robustness(json.loads(args.robustness.read_text()),
                                  args.out / "robustness.png"))
    for path in written:
        print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
