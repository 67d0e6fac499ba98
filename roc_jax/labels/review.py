"""Review aid: how distinguishable are the relations' descriptions under a text encoder?

Leave-one-out retrieval over a ``DescriptionCache``: each description is taken out of its relation
and used as a query; it should retrieve its own relation (represented by its remaining
descriptions) before every other relation. Low per-relation scores point at descriptions that a
text tower cannot tell apart, before any training is spent on them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from roc_jax.labels.cache import DescriptionCache


@dataclasses.dataclass
class Separability:
    """accuracy: top-1 over all descriptions of relations with >= 2 descriptions.

    per_relation: {name: top-1 accuracy of its descriptions}.
    confusions: [(true relation, retrieved relation, count)], most frequent first.
    """

    accuracy: float
    per_relation: dict[str, float]
    confusions: list[tuple[str, str, int]]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def leave_one_out(cache: DescriptionCache) -> Separability:
    """Leave-one-out top-1 retrieval of each description's relation (``mean`` combination)."""
    emb = _unit(cache.embeddings.astype(np.float64))  # [R, K, D]
    mask = cache.mask
    sums = (emb * mask[..., None]).sum(1)  # [R, D]
    counts = mask.sum(1)  # [R]
    hits: dict[str, list[bool]] = {}
    confused: dict[tuple[str, str], int] = {}
    for r, name in enumerate(cache.names):
        if counts[r] < 2:
            continue
        for k in np.flatnonzero(mask[r]):
            query = emb[r, k]
            protos = sums.copy()
            protos[r] -= query  # the query is not part of its own relation's prototype
            scores = _unit(protos) @ query
            best = int(np.argmax(scores))
            hits.setdefault(name, []).append(best == r)
            if best != r:
                key = (name, cache.names[best])
                confused[key] = confused.get(key, 0) + 1
    per = {n: float(np.mean(v)) for n, v in hits.items()}
    total = [x for v in hits.values() for x in v]
    conf = sorted(((a, b, c) for (a, b), c in confused.items()), key=lambda t: -t[2])
    return Separability(float(np.mean(total)) if total else float("nan"), per, conf)


def format_separability(sep: Separability) -> str:
    """Text report: overall accuracy, per relation (worst first), top confusions."""
    lines = [f"leave-one-out top-1: {sep.accuracy:.3f}"]
    for name, acc in sorted(sep.per_relation.items(), key=lambda kv: kv[1]):
        lines.append(f"  {acc:5.2f}  {name}")
    if sep.confusions:
        lines.append("most frequent confusions (description of -> retrieved):")
        lines += [f"  {c:3d}  {a} -> {b}" for a, b, c in sep.confusions[:10]]
    return "\n".join(lines) + "\n"
