"""Typed records shared by the dataset readers, the TFDS builders and the input pipeline."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

NONE_LABEL = "None"


@dataclasses.dataclass(frozen=True)
class Entity:
    """One side of a relation.

    Text entities (MNRE heads and tails, MORE heads) carry a token ``span`` ``[start, end)``;
    MORE's tail is an object in the image and carries a ``box`` ``(x0, y0, x1, y1)`` of corners
    normalized to ``[0, 1]`` of the image instead (MORE's own convention, so no image file is
    needed to read it). ``type`` is the coarse NER type word (``person``, ``location``,
    ...), filled by ``roc_jax.data.entity_types`` at build time; ``""`` when untyped.
    """

    name: str
    span: tuple[int, int] | None = None
    box: tuple[float, float, float, float] | None = None
    type: str = ""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One relation instance as read from a raw dataset file.

    ``source`` is ``"<file>:<line>"`` so that every later error can point back at the input.
    ``image_path`` is ``None`` when the image file does not exist.
    """

    tokens: tuple[str, ...]
    head: Entity
    tail: Entity
    relation: str
    img_id: str
    image_path: str | None
    source: str


def load_rel2id(path: str | Path) -> dict[str, int]:
    """Reads a ``rel2id.json`` label file: ``{relation name: id}`` with ids ``0..R-1``.

    The label set always comes from the data's file, never from code.
    """
    path = Path(path)
    try:
        rel2id = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"label file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(rel2id, dict) or not rel2id:
        raise ValueError(f"{path}: expected a non-empty JSON object {{relation: id}}")
    ids = sorted(rel2id.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{path}: relation ids must be 0..{len(ids) - 1}, got {ids}")
    return dict(rel2id)


def id2rel(rel2id: dict[str, int]) -> list[str]:
    """Relation names ordered by id."""
    return [name for name, _ in sorted(rel2id.items(), key=lambda kv: kv[1])]
