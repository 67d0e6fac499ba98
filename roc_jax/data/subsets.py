"""Training-set protocols: a seeded fraction of the training split, and relations held out.

``subset_source(source, ...)`` wraps any random-access source of TFDS example dicts (``__len__``,
``__getitem__``, optionally ``text_example``) and exposes the kept records in their original
order, so the pipeline, its seeded shuffle and checkpointed iterator work unchanged.

- ``fraction < 1`` keeps ``round(fraction * N)`` records drawn with ``numpy``'s seeded
  generator (``seed``): the same subset for every head and model seed that shares ``seed``.
- ``unseen_ids`` drops every record of those relations (the zero-shot protocol), after the
  fraction is drawn.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


class SubsetSource:
    """The records ``indices [n]`` of ``source``, renumbered ``0..n-1``."""

    def __init__(self, source: Any, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, np.int64)
        if hasattr(source, "text_example"):
            self.text_example = lambda i: source.text_example(int(self.indices[i]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.source[int(self.indices[index])]


def relation_ids(source: Any) -> np.ndarray:
    """``[N]`` int64: the relation id of every record (reads the text view when there is one)."""
    view = getattr(source, "text_example", None) or source.__getitem__
    return np.asarray([int(view(i)["relation"]) for i in range(len(source))], np.int64)


def subset_source(source: Any, *, fraction: float = 1.0, seed: int = 0,
                  unseen_ids: Iterable[int] = ()) -> tuple[Any, dict[str, int]]:
    """The protocol's training records of ``source`` and a report of what was kept.

    Returns ``(source or SubsetSource, {'records', 'kept', 'dropped_fraction',
    'dropped_unseen'})``; ``source`` itself when nothing is dropped.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.train_fraction={fraction}: expected a value in (0, 1]")
    n = len(source)
    keep = np.arange(n)
    if fraction < 1.0:
        size = max(1, int(round(fraction * n)))
        keep = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    after_fraction = len(keep)
    unseen = sorted(set(int(i) for i in unseen_ids))
    if unseen:
        rel = relation_ids(source)[keep]
        keep = keep[~np.isin(rel, unseen)]
    report = {"records": n, "kept": len(keep), "dropped_fraction": n - after_fraction,
              "dropped_unseen": after_fraction - len(keep)}
    if len(keep) == n:
        return source, report
    return SubsetSource(source, keep), report


def unseen_relation_ids(names: Iterable[str], label_names: list[str]) -> list[int]:
    """The ids of the relations named in ``data.unseen_relations``; an unknown name is an error."""
    ids = []
    for name in names:
        if name not in label_names:
            raise ValueError(f"data.unseen_relations: {name!r} is not a relation of the label set "
                             f"({len(label_names)} relations, e.g. {label_names[:3]})")
        if name == "None":
            raise ValueError("data.unseen_relations: 'None' cannot be held out")
        ids.append(label_names.index(name))
    return ids
