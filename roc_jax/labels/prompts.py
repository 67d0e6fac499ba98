"""Relation prompts: each description as a marked sentence that the pair encoder itself reads.

With ``model.relation_prompts`` a relation's vectors are not a projection of frozen sentence
embeddings but the pair vectors of its descriptions, encoded like a post (in the manner of
CTL-DRP's descriptive relation prompts, Zheng & Chen 2023): the words ``head`` and ``tail`` of a
description become the marked entities, typed by the relation's signature, e.g. for
``/per/per/couple``

    The @ * person * head @ person and the # ^ person ^ tail # person are a romantic couple ...

and the vector is read at the two start markers, through the same towers, fusion layers and
projection as a sample's pair vector. A relation unseen in training is then scored by what the
trained encoder makes of its descriptions, and every description is a point in the pairs' space.

A description that does not name the head (or the tail) gets ``head and tail :`` prepended, so
that every prompt has both markers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from roc_jax.data.entity_types import FALLBACK_TYPE

# MNRE's label paths /head_type/tail_type/relation -> the type words the markers use for samples
# (roc_jax.data.entity_types.SPACY_TO_TYPE). 'misc' covers events, groups, awards, ...: no single
# word, so the fallback.
PATH_TYPES = {"per": "person", "org": "organization", "loc": "location", "misc": FALLBACK_TYPE}
_PREFIX = ("head", "and", "tail", ":")


def relation_types(name: str) -> tuple[str, str]:
    """``'/per/loc/place_of_birth' -> ('person', 'location')``; other names (``None``, MORE's
    labels) get the fallback type for both entities."""
    parts = name.strip("/").split("/")
    if len(parts) == 3 and parts[0] in PATH_TYPES and parts[1] in PATH_TYPES:
        return PATH_TYPES[parts[0]], PATH_TYPES[parts[1]]
    return FALLBACK_TYPE, FALLBACK_TYPE


def _find(words: Sequence[str], role: str) -> int | None:
    for i, word in enumerate(words):
        if re.sub(r"[^a-z]", "", word.lower().removesuffix("'s")) == role:
            return i
    return None


def prompt_tokens(text: str) -> tuple[list[str], tuple[int, int], tuple[int, int]]:
    """A description's words and the token spans of its head and tail words."""
    words = text.split()
    head, tail = _find(words, "head"), _find(words, "tail")
    if head is None or tail is None or head == tail:
        words = [*_PREFIX, *words]
        head, tail = 0, 2
    return words, (head, head + 1), (tail, tail + 1)


def encode_prompts(texts: Sequence[Sequence[str]], label_names: Sequence[str], k: int,
                   encoder: Any, *, typed: bool = True) -> dict[str, np.ndarray]:
    """The prompts of ``texts`` (``[R][<=K]`` descriptions) for the model's ``relations`` input.

    ``encoder`` is the data pipeline's ``MarkerTokenizer`` (same marker style and vocabulary as
    the posts). Slots past a relation's descriptions hold an empty prompt (``[CLS] [SEP]``,
    masked out by the cache's ``mask``). Returns int32 ``prompt_ids [R*K, Lp]``, ``prompt_mask
    [R*K, Lp]``, ``prompt_head [R*K]``, ``prompt_tail [R*K]``; ``Lp`` is the longest prompt
    rounded up to a multiple of 8.
    """
    if len(texts) != len(label_names):
        raise ValueError(f"{len(texts)} description lists for {len(label_names)} relations")
    rows: list[tuple[np.ndarray, int, int]] = []
    for name, descs in zip(label_names, texts, strict=True):
        head_type, tail_type = relation_types(name) if typed else ("", "")
        for j in range(k):
            if j < len(descs):
                words, hs, ts = prompt_tokens(descs[j])
                e = encoder.encode(words, hs, ts, head_type, tail_type)
                rows.append((e.input_ids, e.head_index, e.tail_index))
            else:
                rows.append((np.asarray([encoder.cls_id, encoder.sep_id], np.int32), 0, 0))
    length = -(-max(len(ids) for ids, _, _ in rows) // 8) * 8
    ids = np.full((len(rows), length), encoder.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, (row, _, _) in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"prompt_ids": ids, "prompt_mask": mask,
            "prompt_head": np.asarray([h for _, h, _ in rows], np.int32),
            "prompt_tail": np.asarray([t for _, _, t in rows], np.int32)}


def one_prompt_per_relation(relations: dict[str, Any], step: Any) -> dict[str, Any]:
    """The relations input with one prompt per relation, the ``(step + r) % count_r``-th valid
    one: ``[R*K, ...] -> [R, ...]``, mask ``[R, K] -> [R, 1]``. Deterministic in the step, so a
    resumed run reads the same prompts; over K steps every description is used."""
    import jax.numpy as jnp

    mask = relations["mask"]
    r, k = mask.shape
    count = jnp.sum(mask, axis=1, dtype=jnp.int32)
    nth = (step + jnp.arange(r, dtype=jnp.int32)) % jnp.maximum(count, 1)  # [R]
    # Index of the nth True in each mask row (the valid slots need not be a prefix).
    slot = jnp.argmax(jnp.cumsum(mask, axis=1, dtype=jnp.int32) == (nth + 1)[:, None], axis=1)
    rows = jnp.arange(r, dtype=jnp.int32) * k + slot
    out = {key: relations[key][rows] for key in ("prompt_ids", "prompt_mask", "prompt_head",
                                                   "prompt_tail")}
    out["mask"] = (count > 0)[:, None]
    return out
