"""The field's relation-extraction metrics (HVPNeT, MKGformer and MORE code bases).

- micro precision / recall / F1 over all samples, counting neither gold nor predicted ``None``:
  a prediction is a true positive when it equals a gold label that is not ``None``; precision
  divides by the predictions that are not ``None``, recall by the gold labels that are not ``None``;
- accuracy over all labels (``None`` included);
- a per-relation precision / recall / F1 / support report and a confusion matrix.

Everything here is host-side numpy on integer label ids; the train and eval loops gather the
predictions of the real (``mask``) rows and call :func:`evaluate` once per split.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from roc_jax.data.records import NONE_LABEL


def _ratio(num: float, den: float) -> float:
    # An empty denominator means "no evidence", reported as 0 like the field's scripts do.
    return float(num) / float(den) if den > 0 else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _check(labels: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and predictions {preds.shape} differ in length")
    return labels, preds


def micro_prf(labels: np.ndarray, preds: np.ndarray, none_id: int | None) -> dict[str, float]:
    """Micro P/R/F1 without ``None`` and accuracy over all labels.

    Args:
      labels: gold relation ids ``[N]``.
      preds: predicted relation ids ``[N]``.
      none_id: the id of ``None`` (excluded from P/R/F1); ``None`` when the label set has none.

    Returns:
      ``{'precision', 'recall', 'f1', 'accuracy', 'num_examples'}``.
    """
    labels, preds = _check(labels, preds)
    gold_pos = labels != none_id if none_id is not None else np.ones_like(labels, bool)
    pred_pos = preds != none_id if none_id is not None else np.ones_like(preds, bool)
    correct = np.sum((labels == preds) & gold_pos)
    p = _ratio(correct, pred_pos.sum())
    r = _ratio(correct, gold_pos.sum())
    return {
        "precision": p,
        "recall": r,
        "f1": _f1(p, r),
        "accuracy": _ratio(np.sum(labels == preds), labels.size),
        "num_examples": int(labels.size),
    }


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[R, R]``: row = gold relation, column = predicted relation."""
    labels, preds = _check(labels, preds)
    if labels.size and (labels.max() >= num_classes or preds.max() >= num_classes
                        or labels.min() < 0 or preds.min() < 0):
        raise ValueError(f"label ids must lie in [0, {num_classes}), got labels "
                         f"{labels.min()}..{labels.max()}, preds {preds.min()}..{preds.max()}")
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def subset_prf(cm: np.ndarray, ids: Iterable[int]) -> dict[str, float]:
    """Micro P/R/F1 restricted to the relations ``ids`` (say, the zero-shot relations), from a
    confusion matrix ``[R, R]``: true positives on those relations over the predictions of those
    relations (precision) and over their gold samples (recall). Leave ``None`` out of ``ids``.
    """
    cm = np.asarray(cm, np.int64)
    ids = sorted(set(int(i) for i in ids))
    tp = int(sum(cm[i, i] for i in ids))
    p = _ratio(tp, cm[:, ids].sum())
    r = _ratio(tp, cm[ids, :].sum())
    return {"precision": p, "recall": r, "f1": _f1(p, r), "support": int(cm[ids, :].sum())}


def per_relation_report(cm: np.ndarray, names: Sequence[str]) -> list[dict]:
    """Per relation: precision, recall, F1 and support (gold count), from a confusion matrix."""
    report = []
    for i, name in enumerate(names):
        tp = cm[i, i]
        p = _ratio(tp, cm[:, i].sum())
        r = _ratio(tp, cm[i, :].sum())
        report.append({"relation": name, "precision": p, "recall": r, "f1": _f1(p, r),
                       "support": int(cm[i, :].sum())})
    return report


def evaluate(labels: np.ndarray, preds: np.ndarray, names: Sequence[str],
             none_name: str = NONE_LABEL) -> dict:
    """All metrics of one split.

    Returns ``{'precision', 'recall', 'f1', 'accuracy', 'num_examples', 'per_relation': [...],
    'confusion': [[...]]}`` (JSON-able).
    """
    names = list(names)
    none_id = names.index(none_name) if none_name in names else None
    out: dict = micro_prf(labels, preds, none_id)
    cm = confusion_matrix(labels, preds, len(names))
    out["per_relation"] = per_relation_report(cm, names)
    out["confusion"] = cm.tolist()
    return out


class Accumulator:
    """Collects the gold and predicted ids of the real rows of padded eval batches."""

    def __init__(self) -> None:
        self._labels: list[np.ndarray] = []
        self._preds: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []

    def add(self, labels: np.ndarray, preds: np.ndarray, mask: np.ndarray,
            scores: np.ndarray | None = None) -> None:
        """labels, preds, mask ``[B]``; rows with ``mask`` False (padding) are dropped."""
        mask = np.asarray(mask, bool)
        self._labels.append(np.asarray(labels)[mask])
        self._preds.append(np.asarray(preds)[mask])
        if scores is not None:
            self._scores.append(np.asarray(scores)[mask])

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.zeros([0], np.int64)

    @property
    def preds(self) -> np.ndarray:
        return np.concatenate(self._preds) if self._preds else np.zeros([0], np.int64)

    @property
    def scores(self) -> np.ndarray | None:
        return np.concatenate(self._scores) if self._scores else None

    def result(self, names: Sequence[str], none_name: str = NONE_LABEL) -> dict:
        return evaluate(self.labels, self.preds, names, none_name)


def format_report(metrics: dict, digits: int = 4) -> str:
    """A plain-text table of the per-relation report followed by the micro scores."""
    rows = metrics["per_relation"]
    width = max([len("relation")] + [len(r["relation"]) for r in rows])
    lines = [f"{'relation':<{width}}  precision  recall     f1         support"]
    for r in rows:
        lines.append(f"{r['relation']:<{width}}  {r['precision']:<9.{digits}f}  "
                     f"{r['recall']:<9.{digits}f}  {r['f1']:<9.{digits}f}  {r['support']}")
    lines.append(f"micro (without None): precision {metrics['precision']:.{digits}f}  "
                 f"recall {metrics['recall']:.{digits}f}  f1 {metrics['f1']:.{digits}f}")
    lines.append(f"accuracy: {metrics['accuracy']:.{digits}f}  "
                 f"({metrics['num_examples']} examples)")
    return "\n".join(lines)


def plot_confusion(cm: np.ndarray, names: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Writes a PNG heat map of ``cm`` ``[R, R]`` (rows gold, columns predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: eval runs on servers and in CI
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(names)
    size = max(4.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(np.log1p(cm), cmap="Blues")
    ax.set_xticks(range(n), labels=list(names), rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels=list(names), fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(metrics: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2))
    return path


def merge_prefixed(prefix: str, metrics: dict, keys: Iterable[str] = (
        "precision", "recall", "f1", "accuracy")) -> dict[str, float]:
    """``{'dev/f1': ...}`` scalars for the metric writers."""
    return {f"{prefix}/{k}": float(metrics[k]) for k in keys}
