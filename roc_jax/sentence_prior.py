"""A sentence prior for retrieval: relations the model never saw, scored in the encoder's own space.

A trained ROC model scores relation ``r`` with ``cos(pair, W e_r) / T``. Its map ``W`` and the pair
space are trained on the relations of the training set only, and in the zero-shot protocol a
relation left out of training is retrieved for few of its samples. This prior adds
``w cos(s, e_r)`` to the logits: ``s`` is the post's plain sentence (no entity markers)
mean-pooled by the frozen description encoder, ``e_r`` the relation's description vector in that encoder's space
(``relation_vectors`` of the cached embeddings). Calibrated stacking (Chao et al., ECCV 2016), the
generalized zero-shot rule for a model whose scores favour the classes it was trained on, adds
``b`` to the logits of the relations left out of training (the checkpoint's
``data.unseen_relations``). ``w`` and ``b`` are in logits, so both rules apply to either head (a
retrieval logit is a cosine over the temperature ``T``). They are prediction rules on top of a
trained checkpoint: nothing is trained, and ``w = b = 0`` is the model's own prediction.
``benchmarks/sentence_prior.py`` measures them (docs/results.md); ``eval.py --prior_weight
--unseen_offset`` evaluates a checkpoint with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from roc_jax import metrics, parallel
from roc_jax.data import pipeline
from roc_jax.labels.cache import text_encode_fn
from roc_jax.models.scoring import relation_vectors

MIN_SUPPORT = 5  # the gold samples from which a relation's F1 of 0 counts (relations_at_zero)


def split_logits(loaded: Any, source: Any) -> tuple[np.ndarray, np.ndarray]:
    """Gold labels int ``[N]`` and the model's logits float32 ``[N, R]`` of ``source``, in order.

    ``loaded``: ``roc_jax.load(...)`` of a retrieval checkpoint; ``source``: a split's source.
    One process: the logits of every row are read on this host.
    """
    tr = loaded.exp.trainer
    labels, logits = [], []
    with jax.set_mesh(tr.mesh):
        for batch in pipeline.make_eval_batches(source, loaded.tokenizer, loaded.exp.pipeline_cfg,
                                                loaded.config.train.eval_batch_size):
            out = tr.eval_step(loaded.params, parallel.shard_batch(batch, tr.mesh),
                               loaded.exp.relations)
            keep = np.asarray(batch["mask"])
            labels.append(np.asarray(batch["label"])[keep])
            logits.append(np.asarray(out["logits"])[keep])
    return np.concatenate(labels), np.concatenate(logits)


def sentence_cosines(loaded: Any, source: Any) -> np.ndarray:
    """``cos(s_i, e_r)`` float32 ``[N, R]``: each record's plain sentence against each relation.

    The sentence is the record's tokens joined by spaces, encoded as the descriptions were (the
    frozen description encoder, mean pooling, ``config.data.max_len`` word pieces).
    """
    if loaded.config.model.train_description_tower:
        raise ValueError("the sentence prior needs the frozen description encoder of the cache "
                         "(model.train_description_tower=False)")
    built, cache = loaded.exp.built, loaded.cache
    # A raw source reads the text alone (no image decode); a TFDS source reads whole records.
    read = source.text_example if hasattr(source, "text_example") else source.__getitem__
    texts = [" ".join(t.decode() if isinstance(t, bytes) else str(t) for t in read(i)["tokens"])
             for i in range(len(source))]
    sent = text_encode_fn(built.description_encoder, built.description_tokenizer,
                          max_len=loaded.config.data.max_len)(texts)  # [N, D]
    sent /= np.maximum(np.linalg.norm(sent, axis=-1, keepdims=True), 1e-6)
    return sent @ np.asarray(relation_vectors(cache.embeddings, cache.mask)).T  # [N, R]


def temperature(loaded: Any) -> float | None:
    """The checkpoint's learned retrieval temperature ``T`` (None for the classification head)."""
    if loaded.config.model.head != "retrieval":
        return None
    return float(np.asarray(loaded.model.temperature()))


def with_prior(logits: np.ndarray, cosines: np.ndarray, weight: float, offset: float = 0.0,
               unseen: np.ndarray | None = None) -> np.ndarray:
    """``logits + weight * cosines + offset * unseen``: ``[N, R], [N, R], [R] -> [N, R]``.

    ``unseen``: bool ``[R]``, the relations without training samples (needed when ``offset``).
    """
    out = logits + weight * cosines
    return out if offset == 0 else out + offset * np.asarray(unseen, np.float32)


def evaluate(loaded: Any, source: Any, weight: float, offset: float = 0.0) -> dict[str, Any]:
    """``metrics.evaluate``'s dict of ``source`` under both rules, plus ``'rule'``.

    ``offset`` goes to the checkpoint's ``data.unseen_relations`` (an error when it has none);
    ``weight = offset = 0`` is the model's own evaluation. Reached by
    ``eval.py --prior_weight=W --unseen_offset=B``.
    """
    if jax.process_count() > 1:
        raise ValueError("the sentence prior reads every row on one host: run it in one process")
    unseen = list(loaded.config.data.unseen_relations)
    if offset and not unseen:
        raise ValueError("unseen_offset needs a checkpoint trained with data.unseen_relations "
                         "(this one saw every relation)")
    labels, logits = split_logits(loaded, source)
    cos = sentence_cosines(loaded, source) if weight else np.zeros_like(logits)
    pred = np.argmax(with_prior(logits, cos, weight, offset,
                                np.isin(np.asarray(loaded.label_names), unseen)), -1)
    return {**metrics.evaluate(labels, pred, loaded.label_names),
            "rule": {"prior_weight": weight, "unseen_offset": offset, "unseen_relations": unseen}}


def figures(labels: np.ndarray, pred: np.ndarray, names: Sequence[str],
            unseen: Sequence[str]) -> dict[str, float]:
    """Micro-F1 in percent (``None`` neither gold nor predicted): all relations, the relations
    ``unseen`` and the other ones."""
    ev = metrics.evaluate(labels, pred, names)
    cm = np.asarray(ev["confusion"])
    ids = [list(names).index(r) for r in unseen]
    seen = [i for i, n in enumerate(names) if n != metrics.NONE_LABEL and i not in ids]
    return {"all_f1": 100 * ev["f1"], "unseen_f1": 100 * metrics.subset_prf(cm, ids)["f1"],
            "seen_f1": 100 * metrics.subset_prf(cm, seen)["f1"]}


def sweep(loaded: Any, source: Any, weights: Sequence[float], unseen: Sequence[str],
          offsets: Sequence[float] = (0.0,)) -> dict[str, Any]:
    """Every (weight, offset)'s ``figures`` on ``source``, and the best by all-relations F1, the
    rule by which a checkpoint is selected on val (ties: the smaller offset, then weight).

    ``by_offset``: offset -> weight -> figures; ``by_weight`` and ``selected``: the prior alone
    (offset 0); with more ``offsets``, ``calibrated`` (both) and ``offset_only`` (weight 0).
    ``support``: relation -> gold samples of ``source``; ``per_relation_f1``: rule
    (``without_prior``, ``selected``, ``calibrated``) -> relation -> F1 in percent.
    """
    if 0.0 not in offsets:
        raise ValueError(f"offsets {offsets} must hold 0.0 (the prior alone)")
    labels, logits = split_logits(loaded, source)
    cos = sentence_cosines(loaded, source)
    is_unseen = np.isin(np.asarray(loaded.label_names), list(unseen))

    def predicted(w: float, b: float) -> np.ndarray:  # int [N]
        return np.argmax(with_prior(logits, cos, w, b, is_unseen), -1)

    def per_relation(w: float, b: float) -> dict[str, float]:  # relation -> F1 in percent
        ev = metrics.evaluate(labels, predicted(w, b), loaded.label_names)
        return {r["relation"]: 100 * r["f1"] for r in ev["per_relation"]}

    grid = {str(b): {str(w): figures(labels, predicted(w, b), loaded.label_names, unseen)
                     for w in weights} for b in offsets}
    w, _ = best_of([grid], weights, [0.0])
    support = np.bincount(labels, minlength=len(loaded.label_names))
    out = {"head": loaded.config.model.head, "temperature": temperature(loaded),
           "by_weight": grid["0.0"], "by_offset": grid, "selected_weight": w,
           "selected": grid["0.0"][str(w)],
           "support": dict(zip(loaded.label_names, support.tolist(), strict=True)),
           "per_relation_f1": {"without_prior": per_relation(0.0, 0.0),
                               "selected": per_relation(w, 0.0)}}
    if len(offsets) > 1:
        w, b = best_of([grid], weights, offsets)
        _, b0 = best_of([grid], [0.0], offsets)
        out |= {"calibrated": {"weight": w, "offset": b, **grid[str(b)][str(w)]},
                "offset_only": {"weight": 0.0, "offset": b0, **grid[str(b0)]["0.0"]}}
        out["per_relation_f1"]["calibrated"] = per_relation(w, b)
    return out


def best_of(grids: Sequence[dict[str, Any]], weights: Sequence[float],
            offsets: Sequence[float]) -> tuple[float, float]:
    """The (weight, offset) with the best mean all-relations F1 over ``grids`` (``by_offset``
    of one or more runs); ties: the smaller offset, then the smaller weight."""
    def score(wb: tuple[float, float]) -> tuple[float, float, float]:
        w, b = wb
        return (float(np.mean([g[str(b)][str(w)]["all_f1"] for g in grids])), -b, -w)
    return max(((w, b) for b in offsets for w in weights), key=score)


def held_out(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's figures at the (weight, offset) that the *other* runs select (leave one seed
    out): the choice is not made on the checkpoint it is reported for."""
    out = []
    for i, run in enumerate(runs):
        others = [r["by_offset"] for j, r in enumerate(runs) if j != i]
        weights = [float(w) for w in run["by_weight"]]
        w, b = best_of(others, weights, [float(b) for b in run["by_offset"]])
        out.append({"seed": run["seed"], "weight": w, "offset": b,
                    **run["by_offset"][str(b)][str(w)]})
    return out


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per ``kind`` of run (``zero_shot``, ``full``): seeds, selected weights, and the mean of
    every figure at the selected weight, without the prior (``by_weight['0.0']``) and, with more
    than one run, at the held-out choice (``held_out``); where the runs have offsets, also the
    offset alone and with the prior (each run's own choice); with per-relation figures,
    ``relations_at_zero``."""
    keys = ("all_f1", "unseen_f1", "seen_f1")
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = [r for r in runs if r["kind"] == kind]
        rows = {which: [r[which] for r in mine] for which in ("selected", "without_prior")}
        out[kind] = {"seeds": [r["seed"] for r in mine],
                     "selected_weights": [r["selected_weight"] for r in mine]}
        if all("calibrated" in r for r in mine):
            rows |= {which: [r[which] for r in mine] for which in ("offset_only", "calibrated")}
        if len(mine) > 1:
            rows["held_out"] = held_out(mine)
        out[kind] |= {f"{which}_weights_offsets": [[r["weight"], r["offset"]] for r in rows[which]]
                      for which in ("offset_only", "calibrated", "held_out") if which in rows}
        out[kind] |= {f"{k}_{which}": float(np.mean([r[k] for r in group]))
                      for which, group in rows.items() for k in keys}
        if all("per_relation_f1" in r for r in mine):
            out[kind] |= relations_at_zero(mine)
    return out


def relations_at_zero(runs: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Per rule of ``per_relation_f1``: the relations with at least ``MIN_SUPPORT`` gold samples
    (not ``None``) whose F1 is 0 in at least one of ``runs``, as ``relations_at_zero_<rule>``."""
    support = runs[0]["support"]
    names = [n for n, k in support.items() if k >= MIN_SUPPORT and n != metrics.NONE_LABEL]
    return {f"relations_at_zero_{rule}": [n for n in names if any(
        r["per_relation_f1"][rule][n] == 0 for r in runs)] for rule in runs[0]["per_relation_f1"]}
