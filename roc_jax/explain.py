"""Evaluation that keeps every sample's scores: metrics, per-sample explanations, pair vectors.

``evaluate_samples`` runs a restored model (``inference.load``) over reader ``Sample`` records
and returns an ``Evaluated``: the metrics of ``metrics.evaluate`` (the same figures as
``eval.py``), and per sample the relation scores, the pair vector and, for the retrieval head,
the cosine to every description. ``explain_rows`` turns it into one JSON object per sample
(``eval.py --explain`` writes them as ``explain_<split>.jsonl``)::

    {"id": "mnre_val.txt:12", "gold": "/per/per/couple", "predicted": "/per/per/couple",
     "correct": true, "score": 9.1, "runner_up": "/per/per/peer", "margin": 2.3,
     "nearest_description": "The head person and ...", "description_similarity": 0.61}

``score`` is the predicted relation's logit (retrieval: cosine / temperature), ``margin`` its
lead over the runner-up's logit, ``nearest_description`` the predicted relation's description
closest to the pair vector (classification: null, it has no descriptions).

``relations_for(loaded, descriptions)`` re-encodes another descriptions set with the model's frozen
description tower (``labels.cache.ensure_cache``: the cache is keyed by the texts and the encoder
parameters, so a different set is always encoded anew).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from roc_jax import inference, parallel, train_lib
from roc_jax import metrics as metrics_lib
from roc_jax.data.records import Sample
from roc_jax.models import scoring


@dataclasses.dataclass
class Evaluated:
    """``N`` samples, ``R`` relations, ``K`` descriptions per relation, ``P`` pair dims.

    logits float32 ``[N, R]``; labels int ``[N]``; pairs float32 ``[N, P]``; desc_sim float32
    ``[N, R, K]`` (retrieval; None for classification); prototypes float32 ``[R, P]`` (the
    normalized mean of each relation's description vectors; None for classification);
    texts: the descriptions ``[R][<=K]`` scored (None for classification).
    """

    metrics: dict[str, Any]
    label_names: list[str]
    sources: list[str]
    logits: np.ndarray
    labels: np.ndarray
    pairs: np.ndarray
    desc_sim: np.ndarray | None
    desc_mask: np.ndarray | None
    prototypes: np.ndarray | None
    texts: list[list[str]] | None


def relations_for(loaded: Any, descriptions: Mapping[str, Sequence[str]]) -> tuple[Any, Any]:
    """``(cache, relations input)`` of another descriptions set ``{relation: [texts]}`` for the
    retrieval model ``loaded``, encoded by its frozen description tower."""
    from roc_jax.labels import cache as cache_lib

    config = loaded.config
    if config.model.head != "retrieval":
        raise ValueError("other descriptions need the retrieval head (this model is a "
                         "classifier over a fixed label set)")
    if config.model.train_description_tower:
        raise ValueError("other descriptions need a frozen description tower (this model "
                         "trained its own: the descriptions it was trained on are part of it)")
    exp = loaded.exp
    enc = exp.built.description_encoder
    enc.eval()
    cache = cache_lib.ensure_cache(
        exp.cache, descriptions, loaded.label_names,
        cache_lib.text_encode_fn(enc, exp.built.description_tokenizer),
        cache_lib.encoder_params(enc))
    relations = parallel.replicate(train_lib.relations_input(config, cache), exp.trainer.mesh)
    return cache, relations


def evaluate_samples(loaded: Any, samples: Sequence[Sample], *,
                     descriptions: Mapping[str, Sequence[str]] | None = None,
                     batch_size: int | None = None) -> Evaluated:
    """Scores every sample with the restored model ``loaded``; ``descriptions`` (retrieval head)
    replaces the checkpoint's description set for this evaluation.

    One process only: the rows of every batch are this host's.
    """
    from roc_jax.data import pipeline

    if jax.process_count() > 1:
        raise RuntimeError("per-sample evaluation runs on one process (got "
                           f"{jax.process_count()}); use eval.py without --explain/--perturbation")
    exp, config = loaded.exp, loaded.config
    cache, relations = exp.cache, exp.relations
    if descriptions is not None:
        cache, relations = relations_for(loaded, descriptions)
    retrieval = config.model.head == "retrieval"
    if retrieval and list(cache.names) != list(loaded.label_names):
        raise ValueError(f"the description cache's relations {list(cache.names)} are not the "
                         f"model's label set {loaded.label_names}")
    rel2id = {n: i for i, n in enumerate(loaded.label_names)}
    source = pipeline.SampleSource(samples, rel2id, config.data.image_size)
    batches = pipeline.make_eval_batches(source, loaded.tokenizer, exp.pipeline_cfg,
                                         batch_size or config.train.eval_batch_size)
    fn = inference.scores_fn(exp.trainer.graphdef_eval)
    n = len(samples)
    logits = pairs = desc_sim = None
    rel_vectors = None
    acc = metrics_lib.Accumulator()
    with jax.set_mesh(exp.trainer.mesh):
        for b, batch in enumerate(batches):
            index = batches.local_indices(b)
            out = jax.device_get(fn(loaded.params, exp.trainer.rest,
                                    parallel.shard_batch(batch, exp.trainer.mesh), relations))
            keep = index >= 0
            if logits is None:
                logits = np.zeros((n, out["logits"].shape[-1]), np.float32)
                pairs = np.zeros((n, out["pair"].shape[-1]), np.float32)
                if "desc_sim" in out:
                    desc_sim = np.zeros((n, *out["desc_sim"].shape[1:]), np.float32)
                    rel_vectors = np.asarray(out["relations"], np.float32)
            logits[index[keep]] = out["logits"][keep]
            pairs[index[keep]] = out["pair"][keep]
            if desc_sim is not None:
                desc_sim[index[keep]] = out["desc_sim"][keep]
            acc.add(np.asarray(batch["label"]), np.argmax(out["logits"], -1),
                    np.asarray(batch["mask"]))
    labels = np.asarray([rel2id[s.relation] for s in samples])
    prototypes = mask = texts = None
    if retrieval:
        mask = np.asarray(cache.mask, bool)
        prototypes = np.asarray(scoring.relation_vectors(rel_vectors, mask))
        texts = [list(t) for t in cache.texts]
    return Evaluated(acc.result(loaded.label_names), list(loaded.label_names),
                     [s.source for s in samples], logits, labels, pairs, desc_sim, mask,
                     prototypes, texts)


def explain_rows(ev: Evaluated) -> list[dict[str, Any]]:
    """One JSON-able dict per sample (see the module docstring for the fields)."""
    order = np.argsort(-ev.logits, axis=-1, kind="stable")
    rows = []
    for i, source in enumerate(ev.sources):
        top, second = int(order[i, 0]), int(order[i, 1])
        row = {"id": source, "gold": ev.label_names[ev.labels[i]],
               "predicted": ev.label_names[top], "correct": bool(ev.labels[i] == top),
               "score": float(ev.logits[i, top]), "runner_up": ev.label_names[second],
               "margin": float(ev.logits[i, top] - ev.logits[i, second]),
               "nearest_description": None, "description_similarity": None}
        if ev.desc_sim is not None:
            sims = np.where(ev.desc_mask[top], ev.desc_sim[i, top], -np.inf)
            k = int(np.argmax(sims))
            row["nearest_description"] = ev.texts[top][k]
            row["description_similarity"] = float(sims[k])
        rows.append(row)
    return rows


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path
