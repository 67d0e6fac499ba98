"""A sentence prior for retrieval: relations the model never saw, scored in the encoder's own space.

A trained ROC model scores relation ``r`` with ``cos(pair, W e_r) / T``. Its map ``W`` and the
pair space are trained on the relations of the training set only, and in the zero-shot
protocol a relation left out of training is retrieved for few of its samples. This prior adds ``w cos(s, e_r) / T``: ``s`` is the post's plain sentence (no
entity markers) mean-pooled by the frozen description encoder, ``e_r`` the relation's
description vector in that encoder's space (``relation_vectors`` of the cached embeddings).
It is a prediction rule on top of a trained checkpoint: nothing is trained, and ``w = 0`` is
the model's own prediction. ``benchmarks/sentence_prior.py`` measures it (docs/results.md).
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


def temperature(loaded: Any) -> float:
    """The checkpoint's learned retrieval temperature ``T``."""
    return float(np.asarray(loaded.model.temperature()))


def with_prior(logits: np.ndarray, cosines: np.ndarray, weight: float, t: float) -> np.ndarray:
    """``logits + weight * cosines / t``: ``[N, R], [N, R] -> [N, R]``."""
    return logits + weight * cosines / t


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


def sweep(loaded: Any, source: Any, weights: Sequence[float],
          unseen: Sequence[str]) -> dict[str, Any]:
    """Every weight's ``figures`` on ``source`` and the weight with the best all-relations F1
    (ties: the smaller weight), the rule by which a checkpoint is selected on val."""
    labels, logits = split_logits(loaded, source)
    cos, t = sentence_cosines(loaded, source), temperature(loaded)
    rows = {str(w): figures(labels, np.argmax(with_prior(logits, cos, w, t), -1),
                            loaded.label_names, unseen) for w in weights}
    best = max(weights, key=lambda w: (rows[str(w)]["all_f1"], -w))
    return {"temperature": t, "by_weight": rows, "selected_weight": best,
            "selected": rows[str(best)]}


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per ``kind`` of run (``zero_shot``, ``full``): seeds, selected weights, and the mean of
    every figure at the selected weight and without the prior (``by_weight['0.0']``)."""
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in runs):
        mine = [r for r in runs if r["kind"] == kind]
        out[kind] = {"seeds": [r["seed"] for r in mine],
                     "selected_weights": [r["selected_weight"] for r in mine],
                     **{f"{k}_{which}": float(np.mean([r[which][k] for r in mine]))
                        for which in ("selected", "without_prior")
                        for k in ("all_f1", "unseen_f1", "seen_f1")}}
    return out
