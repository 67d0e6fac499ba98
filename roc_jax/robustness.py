"""Perturbed copies of a split: what a relation prediction should, or should not, depend on.

Every perturbation is a pure function over reader ``Sample`` records (``roc_jax.data.records``):
it returns new samples and never changes its input; the seeded ones draw from their own
``random.Random(seed)``, so a perturbation and a seed name one fixed copy of the split.

``PERTURBATIONS`` (the names ``eval.py --perturbation`` takes):

- ``entity_names``: the head's and the tail's names replaced by other names of the same entity
  type drawn from the TRAINING split (``name_pool``); spans are recomputed over the new tokens,
  the types kept. The relation should not depend on who the entities are.
- ``typos_low`` / ``typos_high``: one character edit (swap, drop, insert or replace a letter) in
  10 % / 30 % of the context words (tokens outside both entity spans with at least 3 letters;
  ``@handles``, ``#tags`` and links are left alone).
- ``shuffled_types``: the entity types of the split's heads and tails permuted among themselves
  (the multiset of types is kept, the marker ``@ * person * ... @`` now often lies).
- ``untyped``: every type emptied: the typed markers carry no type (``@ * * Rafael Nadal @``).
- ``no_images``: every image removed (the model masks the image out, as for a missing file).
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from roc_jax.data.records import Entity, Sample

TYPO_RATES = {"typos_low": 0.1, "typos_high": 0.3}
PERTURBATIONS = ("entity_names", *TYPO_RATES, "shuffled_types", "untyped", "no_images")
# Words a typo may touch: this many letters at least (short words are often names or slang).
_MIN_TYPO_LETTERS = 3


# ------------------------------------------------------------------------------ entity names


def name_pool(samples: Sequence[Sample]) -> dict[str, list[tuple[str, ...]]]:
    """``{entity type: [distinct name token tuples]}`` of the text entities of ``samples``, in
    first-seen order (a seeded draw from it is reproducible)."""
    pool: dict[str, dict[tuple[str, ...], None]] = {}
    for s in samples:
        for e in (s.head, s.tail):
            if e.span is not None:
                pool.setdefault(e.type, {})[tuple(s.tokens[e.span[0]:e.span[1]])] = None
    return {t: list(names) for t, names in pool.items()}


def _draw(pool: Mapping[str, Sequence[tuple[str, ...]]], entity: Entity,
          current: tuple[str, ...], rng: random.Random) -> tuple[str, ...]:
    names = pool.get(entity.type, ())
    if not names or all(n == current for n in names):
        raise ValueError(f"the name pool has no other name of type {entity.type!r} than "
                         f"{' '.join(current)!r}")
    while True:
        name = names[rng.randrange(len(names))]
        if name != current:
            return tuple(name)


def substitute_names(samples: Sequence[Sample], pool: Mapping[str, Sequence[tuple[str, ...]]],
                     seed: int) -> list[Sample]:
    """Each text entity's name replaced by another name of its type from ``pool``.

    The head and the tail get independent draws; their spans (and ``name``) follow the new
    tokens. A pair whose spans overlap or nest (one name inside the other) is left unchanged:
    two independent names cannot share tokens. Image-object tails (no span) keep their box.
    """
    rng = random.Random(seed)
    out = []
    for s in samples:
        ents = [(w, e) for w, e in (("head", s.head), ("tail", s.tail)) if e.span is not None]
        spans = sorted(e.span for _, e in ents)
        if len(spans) == 2 and spans[0][1] > spans[1][0]:
            out.append(s)
            continue
        new_names = {w: _draw(pool, e, tuple(s.tokens[e.span[0]:e.span[1]]), rng)
                     for w, e in ents}
        tokens: list[str] = []
        pos = 0
        new_spans = {}
        for w, e in sorted(ents, key=lambda we: we[1].span[0]):
            start, end = e.span
            tokens += s.tokens[pos:start]
            new_spans[w] = (len(tokens), len(tokens) + len(new_names[w]))
            tokens += new_names[w]
            pos = end
        tokens += s.tokens[pos:]
        fields = {w: dataclasses.replace(e, name=" ".join(new_names[w]), span=new_spans[w])
                  for w, e in ents}
        out.append(dataclasses.replace(s, tokens=tuple(tokens), **fields))
    return out


# ------------------------------------------------------------------------------ typos


def _typo(word: str, rng: random.Random) -> str:
    """One character edit of ``word`` (``len(word) >= 2``): swap two neighbours, drop, insert or
    replace a letter. The result always differs from ``word``."""
    letters = string.ascii_lowercase
    while True:
        op = rng.randrange(4)
        i = rng.randrange(len(word) - 1) if op == 0 else rng.randrange(len(word))
        if op == 0:
            new = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        elif op == 1:
            new = word[:i] + word[i + 1:]
        elif op == 2:
            new = word[:i] + rng.choice(letters) + word[i:]
        else:
            new = word[:i] + rng.choice(letters) + word[i + 1:]
        if new != word:
            return new


def typo_eligible(sample: Sample) -> list[int]:
    """Token positions a typo may touch: outside both entity spans, a word of letters (at
    least ``_MIN_TYPO_LETTERS``), not a ``@handle``, ``#tag`` or link."""
    inside = set()
    for e in (sample.head, sample.tail):
        if e.span is not None:
            inside.update(range(*e.span))
    return [i for i, t in enumerate(sample.tokens) if i not in inside
            and sum(c.isalpha() for c in t) >= _MIN_TYPO_LETTERS
            and not t.startswith(("@", "#", "http"))]


def add_typos(samples: Sequence[Sample], rate: float, seed: int) -> list[Sample]:
    """Each eligible context word (``typo_eligible``) gets one character edit with probability
    ``rate``; entity tokens and spans are untouched."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"typo rate {rate} is not in [0, 1]")
    rng = random.Random(seed)
    out = []
    for s in samples:
        tokens = list(s.tokens)
        for i in typo_eligible(s):
            if rng.random() < rate:
                tokens[i] = _typo(tokens[i], rng)
        out.append(dataclasses.replace(s, tokens=tuple(tokens)))
    return out


# ------------------------------------------------------------------------------ types, images


def shuffle_types(samples: Sequence[Sample], seed: int) -> list[Sample]:
    """The types of all heads and tails (``2 * len(samples)`` slots) permuted among themselves."""
    types = [t for s in samples for t in (s.head.type, s.tail.type)]
    random.Random(seed).shuffle(types)
    return [dataclasses.replace(s, head=dataclasses.replace(s.head, type=types[2 * i]),
                                tail=dataclasses.replace(s.tail, type=types[2 * i + 1]))
            for i, s in enumerate(samples)]


def untype(samples: Sequence[Sample]) -> list[Sample]:
    """Every head and tail type emptied (``""``: the marker holds no type word)."""
    return [dataclasses.replace(s, head=dataclasses.replace(s.head, type=""),
                                tail=dataclasses.replace(s.tail, type="")) for s in samples]


def remove_images(samples: Sequence[Sample]) -> list[Sample]:
    """Every ``image_path`` None: the model sees the text only."""
    return [dataclasses.replace(s, image_path=None) for s in samples]


# ------------------------------------------------------------------------------ by name


def perturb(name: str, samples: Sequence[Sample], *, seed: int = 0,
            train_samples: Sequence[Sample] | None = None) -> list[Sample]:
    """The perturbation ``name`` (one of ``PERTURBATIONS``) of ``samples``.

    ``entity_names`` needs ``train_samples`` (typed like ``samples``) for its name pool.
    """
    if name == "entity_names":
        if train_samples is None:
            raise ValueError("the entity_names perturbation needs the training samples")
        return substitute_names(samples, name_pool(train_samples), seed)
    if name in TYPO_RATES:
        return add_typos(samples, TYPO_RATES[name], seed)
    if name == "shuffled_types":
        return shuffle_types(samples, seed)
    if name == "untyped":
        return untype(samples)
    if name == "no_images":
        return remove_images(samples)
    raise ValueError(f"unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS)}")


def count_changed(before: Sequence[Sample], after: Sequence[Sample]) -> int:
    """How many samples a perturbation changed (a type drawn back onto its own slot, a sample
    without image or with overlapping names is not changed)."""
    return sum(a != b for a, b in zip(before, after, strict=True))


def read_split(config: Any, split: str) -> list[Sample]:
    """The typed ``Sample`` records of ``split`` read from the raw folder of ``config`` (the
    ``data.source='raw'`` path of ``roc_jax.data.sources``: the files training read, typed as
    training typed them, whatever ``data.source`` the run used)."""
    from roc_jax.data import sources

    raw = config.copy_and_resolve_references()
    raw.data.source = "raw"
    return sources.load_sources(raw, [split])[split].samples


# ------------------------------------------------------------------------------ evaluation

SEEDED = ("entity_names", *TYPO_RATES, "shuffled_types")


def description_set(loaded: Any, path: str | Path | None = None,
                    k: int | None = None) -> dict[str, list[str]] | None:
    """The descriptions to score with instead of the checkpoint's: the file ``path`` (checked
    against the model's label set) or the checkpoint's own texts, cut to the first ``k`` of each
    relation; None when neither is given (the checkpoint's cache as it is)."""
    from roc_jax.labels import descriptions as desc_lib

    if path is None and k is None:
        return None
    if loaded.config.model.head != "retrieval":
        raise ValueError("other descriptions need the retrieval head (this model is a "
                         "classifier over a fixed label set)")
    texts = (desc_lib.load_descriptions(path, loaded.label_names) if path is not None
             else loaded.cache.descriptions())
    if k is not None:
        if k < 1:
            raise ValueError(f"descriptions k={k}: expected 1 or more")
        texts = {name: list(t[:k]) for name, t in texts.items()}
    return texts


def variant_name(perturbation: str | None = None, seed: int = 0,
                 descriptions: str | Path | None = None, k: int | None = None) -> str:
    """``'entity_names_s0'``, ``'untyped'``, ``'descriptions-mnre_paraphrase_k1'``...: the suffix of
    a perturbed evaluation's output folder; ``''`` for the clean evaluation."""
    parts = []
    if perturbation is not None:
        parts.append(f"{perturbation}_s{seed}" if perturbation in SEEDED else perturbation)
    if descriptions is not None:
        parts.append(f"descriptions-{Path(descriptions).stem}")
    if k is not None:
        parts.append(f"k{k}")
    return "_".join(parts)


def evaluate_variant(loaded: Any, split: str, perturbation: str | None = None, *, seed: int = 0,
                     descriptions: Mapping[str, Sequence[str]] | None = None,
                     samples: Sequence[Sample] | None = None,
                     train_samples: Sequence[Sample] | None = None) -> tuple[Any, dict[str, Any]]:
    """``(explain.Evaluated, info)`` of ``split`` of the raw data under ``perturbation`` (None:
    clean) with ``descriptions`` (None: the checkpoint's). ``samples`` / ``train_samples``: the
    typed split and train samples when already read (``read_split``). ``info`` records the
    perturbation, its seed, the number of samples and how many of them it changed."""
    from roc_jax import explain

    if samples is None:
        samples = read_split(loaded.config, split)
    info: dict[str, Any] = {"split": split, "perturbation": perturbation or "clean",
                            "samples": len(samples), "changed": 0}
    if perturbation is not None:
        if perturbation == "entity_names" and train_samples is None:
            train_samples = read_split(loaded.config, "train")
        perturbed = perturb(perturbation, samples, seed=seed, train_samples=train_samples)
        info["changed"] = count_changed(samples, perturbed)
        if perturbation in SEEDED:
            info["perturbation_seed"] = seed
        samples = perturbed
    return explain.evaluate_samples(loaded, samples, descriptions=descriptions), info


# ------------------------------------------------------------------------------ the report

HEADS = {"retrieval": "roc", "classification": "cls"}


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per variant and head: F1 per seed, mean and spread, the drop from the same seed's clean
    F1; and the mean drop of each head over the perturbations both heads have.

    ``runs``: ``{'head': 'roc'|'cls', 'seed': int, 'variant': 'clean'|name, 'f1': percent}``
    (one per model and variant). Drops are in points, positive when the variant is worse; a
    seed without its clean run has no drop.
    """
    import statistics

    def spread(xs: list[float]) -> dict[str, Any]:
        return {"mean": statistics.mean(xs) if xs else None,
                "std": statistics.stdev(xs) if len(xs) > 1 else None}

    clean = {(r["head"], r["seed"]): r["f1"] for r in runs if r["variant"] == "clean"}
    variants: dict[str, dict[str, Any]] = {}
    for r in runs:
        variants.setdefault(r["variant"], {}).setdefault(r["head"], {"f1_per_seed": {},
                                                                     "drop_per_seed": {}})
        row = variants[r["variant"]][r["head"]]
        row["f1_per_seed"][str(r["seed"])] = r["f1"]
        if (r["head"], r["seed"]) in clean:
            row["drop_per_seed"][str(r["seed"])] = clean[r["head"], r["seed"]] - r["f1"]
    for heads in variants.values():
        for row in heads.values():
            f1 = spread(list(row["f1_per_seed"].values()))
            drop = spread(list(row["drop_per_seed"].values()))
            row.update(f1_mean=f1["mean"], f1_std=f1["std"], drop_mean=drop["mean"],
                       drop_std=drop["std"], seeds=len(row["f1_per_seed"]))
    shared = sorted(v for v, heads in variants.items() if v != "clean"
                    and all(heads.get(h, {}).get("drop_mean") is not None for h in ("roc", "cls")))
    summary: dict[str, Any] = {"shared_perturbations": shared}
    for h in ("roc", "cls"):
        drops = [variants[v][h]["drop_mean"] for v in shared]
        summary[f"{h}_mean_drop"] = statistics.mean(drops) if drops else None
        summary[f"{h}_seeds"] = sorted({r["seed"] for r in runs if r["head"] == h})
    return {"variants": variants, "summary": summary}


def model_variants(loaded: Any, paraphrase: str | Path
                   ) -> list[tuple[str, str | None, dict[str, list[str]] | None]]:
    """``(variant, perturbation, descriptions)`` a model is evaluated under by the robustness
    benchmark: clean, every perturbation and, for the retrieval head, the ``paraphrase``
    descriptions file and the first description of each relation (``k1``)."""
    out = [("clean", None, None)] + [(p, p, None) for p in PERTURBATIONS]
    if loaded.config.model.head == "retrieval":
        out += [("paraphrase", None, description_set(loaded, paraphrase)),
                ("k1", None, description_set(loaded, k=1))]
    return out


def run_entry(loaded: Any, workdir: str, name: str, ev: Any, info: Mapping[str, Any],
              seconds: float) -> dict[str, Any]:
    """The robustness benchmark's record of one model under one variant (F1 etc. in percent)."""
    m = ev.metrics
    return {"workdir": str(workdir), "head": HEADS[loaded.config.model.head],
            "seed": int(loaded.config.seed), "step": loaded.step, "variant": name, **info,
            **{k: 100 * m[k] for k in ("f1", "precision", "recall", "accuracy")},
            "per_relation_f1": {r["relation"]: 100 * r["f1"] for r in m["per_relation"]},
            "confusion": m["confusion"], "label_names": ev.label_names, "seconds": seconds}
