"""Restore a trained ROC model from its workdir, evaluate a split, predict relations.

    >>> import roc_jax
    >>> roc = roc_jax.load("workdirs/mnre_offline")             # doctest: +SKIP
    >>> roc.predict("[[Rafael Nadal]] gets engaged to [[Mery Perello]]", top_k=3)  # doctest: +SKIP
    [{'relation': '/per/per/couple', 'probability': 0.91, 'score': 12.3,
      'description': 'The head entity is engaged or married to the tail entity.'}, ...]

Everything comes from the checkpoint: the config and label set (``meta``), the parameters
(``params``) and the description-embedding cache (``labels``: never re-encoded here); no
optimizer is built and its state is not read. The encoders'
pretrained weights are loaded only to rebuild the model structure and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from roc_jax import checkpoint as ckpt
from roc_jax import metrics as metrics_lib
from roc_jax import parallel, train_lib

log = logging.getLogger("roc_jax")

_MARKED = re.compile(r"\[\[(.+?)\]\]")


@dataclasses.dataclass
class Loaded:
    """A restored model: ``predict`` and ``evaluate_split`` work on it without a workdir."""

    config: ml_collections.ConfigDict
    label_names: list[str]
    step: int
    exp: train_lib.Experiment
    meta: dict[str, Any]

    @property
    def tokenizer(self) -> Any:
        return self.exp.built.tokenizer

    @property
    def image_spec(self) -> Any:
        return self.exp.built.image_spec

    @property
    def cache(self) -> Any:
        return self.exp.cache

    @property
    def params(self) -> Any:
        return self.exp.state["params"]

    @property
    def model(self) -> Any:
        """The NNX ``ROC`` module with the restored parameters (eval mode)."""
        return self.exp.trainer.model(self.params)

    def evaluate_split(self, split: str, *, data_dir: str | None = None,
                       batch_size: int | None = None) -> dict[str, Any]:
        """Metrics of ``split`` (``metrics.evaluate``'s dict) read from the raw data folder."""
        return evaluate_split(self, split, data_dir=data_dir, batch_size=batch_size)

    def predict(self, text: str | Sequence[str], image: str | Path | np.ndarray | None = None,
                *, head: tuple[int, int] | None = None, tail: tuple[int, int] | None = None,
                top_k: int = 5, extra_descriptions: Mapping[str, Sequence[str]] | None = None
                ) -> list[dict[str, Any]]:
        """Top-k relations for one sentence; see ``roc_jax.inference.predict``."""
        return predict(self, text, image, head=head, tail=tail, top_k=top_k,
                       extra_descriptions=extra_descriptions)


def read_config(workdir: str | Path, which: str | int = "best") -> tuple[dict, int]:
    """The ``meta`` item of a checkpoint of ``workdir`` and its step (no arrays are read)."""
    manager = ckpt.make_manager(workdir, read_only=True)
    try:
        step = ckpt.select_step(manager, which)
        meta = ckpt.read_meta(manager, step)
    finally:
        manager.close()
    ckpt.check_meta(meta, config=None, label_names=None, where=f"{workdir}/checkpoints/{step}")
    return meta, step


def load(workdir: str | Path, *, checkpoint: str | int = "best", data_dir: str | None = None,
         mesh: jax.sharding.Mesh | None = None) -> Loaded:
    """Restores model, tokenizer, image preprocessing and label cache of ``workdir`` in one call.

    Args:
      workdir: a training workdir (``train.py --workdir``).
      checkpoint: ``'best'`` (dev micro-F1, default), ``'latest'`` or a step number. A step
        whose files cannot be read raises ``checkpoint.UnreadableCheckpoint`` (one line: the
        step, the folder, the reason and the saved steps); pass another step.
      data_dir: overrides the raw data folder recorded in the config (for ``evaluate_split``).
      mesh: defaults to every device.

    Example::

        import roc_jax
        roc = roc_jax.load("workdirs/mnre_offline")
        for r in roc.predict("[[Rafael Nadal]] gets engaged to [[Mery Perello]]", top_k=3):
            print(r["relation"], r["probability"], r["description"])
    """
    meta, step = read_config(workdir, checkpoint)
    config = ml_collections.ConfigDict(meta["config"])
    config.data.buckets = tuple(config.data.buckets)
    if data_dir is not None:
        config.data.raw_dir = str(data_dir)
    mesh = mesh or parallel.make_mesh()
    # Eval batches must split over the devices; the training value may not (other machine).
    n = mesh.devices.size
    config.train.batch_size = n * max(1, config.train.batch_size // n)
    config.train.eval_batch_size = n * max(1, -(-config.train.eval_batch_size // n))
    # No optimizer is built and only the parameters are read: the optimizer's state (twice
    # the parameters' size) is of no use here.
    exp = train_lib.setup(config, workdir, mesh=mesh, restore=step,
                          label_names=meta["label_names"], with_optimizer=False)
    return Loaded(config, list(meta["label_names"]), step, exp, meta)


def split_source(loaded: Loaded, split: str, *, data_dir: str | None = None) -> Any:
    """The source of ``split`` from the raw data folder; raises ``CheckpointError`` when that
    folder's label set is not the checkpoint's."""
    from roc_jax.data import sources

    config = loaded.config
    if data_dir is not None:
        config.data.raw_dir = str(data_dir)
    if sources.label_names_of(config) != loaded.label_names:
        raise ckpt.CheckpointError(
            f"{config.data.raw_dir}: its label file differs from the checkpoint's label set "
            f"({len(loaded.label_names)} relations)")
    return sources.load_sources(config, [split])[split]


def evaluate_split(loaded: Loaded, split: str, *, data_dir: str | None = None,
                   batch_size: int | None = None) -> dict[str, Any]:
    """Metrics of ``split`` (``metrics.evaluate``'s dict) read from the raw data folder; raises
    ``CheckpointError`` when that folder's label set is not the checkpoint's."""
    from roc_jax.data import pipeline

    source = split_source(loaded, split, data_dir=data_dir)
    bs = batch_size or loaded.config.train.eval_batch_size
    batches = pipeline.make_eval_batches(source, loaded.tokenizer, loaded.exp.pipeline_cfg, bs)
    return train_lib.evaluate(loaded.exp.trainer, loaded.params, batches, loaded.exp.relations,
                              loaded.label_names)


# ---------------------------------------------------------------------------------------------
# prediction


def parse_marked(text: str) -> tuple[list[str], tuple[int, int], tuple[int, int]]:
    """``'[[Rafael Nadal]] gets engaged to [[Mery Perello]]'`` -> tokens, head span, tail span.

    The first ``[[...]]`` is the head, the second the tail; spans are ``[start, end)`` over the
    whitespace tokens of the text without the brackets.
    """
    marks = list(_MARKED.finditer(text))
    if len(marks) != 2:
        raise ValueError(f"mark exactly two entities with [[...]] (head first), found "
                         f"{len(marks)} in {text!r}")
    tokens: list[str] = []
    spans = []
    pos = 0
    for m in marks:
        tokens += text[pos:m.start()].split()
        name = m.group(1).split()
        if not name:
            raise ValueError(f"empty entity [[ ]] in {text!r}")
        spans.append((len(tokens), len(tokens) + len(name)))
        tokens += name
        pos = m.end()
    tokens += text[pos:].split()
    return tokens, spans[0], spans[1]


def _example(loaded: Loaded, tokens: Sequence[str], head: tuple[int, int], tail: tuple[int, int],
             image: str | Path | np.ndarray | None) -> dict[str, Any]:
    from roc_jax.data import entity_types
    from roc_jax.data.images import load_image, resize_uint8

    for name, (a, b) in (("head", head), ("tail", tail)):
        if not 0 <= a < b <= len(tokens):
            raise ValueError(f"{name} span {(a, b)} is outside the {len(tokens)} tokens")
    types = ("", "")
    if loaded.config.data.entity_types != "none":
        typer = entity_types.make_typer(loaded.config.data.entity_types)
        types = typer([tuple(tokens)], [(head, tail)])[0]
    size = loaded.config.data.image_size
    pixels = np.zeros((size, size, 3), np.uint8)
    has_image = False
    if image is not None:
        if not loaded.config.data.use_images:
            log.warning("this model was trained without images: the image is ignored")
        elif isinstance(image, np.ndarray):
            pixels, has_image = resize_uint8(np.asarray(image, np.uint8), size), True
        else:
            if not Path(image).is_file():
                raise FileNotFoundError(f"image not found: {image}")
            pixels, has_image = load_image(image, size), True
    return {
        "tokens": list(tokens),
        "head": {"name": " ".join(tokens[head[0]:head[1]]), "span": np.asarray(head, np.int32),
                 "type": types[0]},
        "tail": {"name": " ".join(tokens[tail[0]:tail[1]]), "span": np.asarray(tail, np.int32),
                 "box": np.zeros(4, np.float32), "type": types[1], "is_object": False},
        "image": pixels,
        "has_image": has_image,
        "relation": np.int64(0),
        "img_id": "predict",
    }


@functools.lru_cache(maxsize=4)
def scores_fn(gdef_eval: Any) -> Any:
    """The jitted eval-mode model for predict and per-sample evaluation: ``(params, rest, batch,
    relations) -> {logits [B, R], pair [B, P]}`` plus, for the retrieval head, ``desc_sim``
    ``[B, R, K]`` (the pair against every description) and ``relations`` ``[R, K, P]``."""
    def run(params, rest, batch, relations):
        model = nnx.merge(gdef_eval, params, rest, copy=True)
        logits, inter = model(batch, relations)
        out = {"logits": logits, "pair": inter["pair"].astype(jnp.float32)}
        if "relations" in inter:  # retrieval: cosine of the pair to every description
            out["desc_sim"] = jnp.einsum("bp,rkp->brk", inter["pair"], inter["relations"])
            out["relations"] = inter["relations"]
        return out

    return jax.jit(run)


def predict(loaded: Loaded | str | Path, text: str | Sequence[str],
            image: str | Path | np.ndarray | None = None,
            *, head: tuple[int, int] | None = None, tail: tuple[int, int] | None = None,
            top_k: int = 5, extra_descriptions: Mapping[str, Sequence[str]] | None = None
            ) -> list[dict[str, Any]]:
    """Top-k relations of one entity pair, with scores and each relation's nearest description.

    Args:
      loaded: ``load(workdir)``, or a workdir (restored on every call: prefer ``load`` once).
      text: a sentence with the two entities marked, ``'[[Rafael Nadal]] gets engaged to
        [[Mery Perello]]'`` (head first), or a token list together with ``head`` and ``tail``
        spans ``(start, end)``.
      image: an image file or a uint8 ``[H, W, 3]`` array; None: no image (masked out).
      top_k: how many relations to return.
      extra_descriptions: ``{relation: [descriptions]}`` of relations never seen in training,
        scored alongside the trained ones (retrieval head only).

    Returns:
      ``[{'relation', 'score' (logit: cosine / temperature), 'probability' (softmax over all
      relations), 'description' (nearest, retrieval head), 'description_similarity'}]``, best
      first.
    """
    from roc_jax.data import pipeline

    if isinstance(loaded, str | Path):
        loaded = load(loaded)
    if isinstance(text, str):
        if head is not None or tail is not None:
            raise ValueError("give either a [[marked]] sentence or tokens with head/tail spans")
        tokens, head, tail = parse_marked(text)
    else:
        if head is None or tail is None:
            raise ValueError("with a token list, give the head and tail spans (start, end)")
        tokens = list(text)
    exp = loaded.exp
    cache = exp.cache
    relations = exp.relations
    if extra_descriptions:
        if loaded.config.model.head != "retrieval":
            raise ValueError("extra descriptions need the retrieval head (this model is a "
                             "classifier over a fixed label set)")
        if loaded.config.model.train_description_tower:
            raise ValueError("extra descriptions are not supported with a trained description "
                             "tower yet")
        from roc_jax.labels import cache as cache_lib

        enc = exp.built.description_encoder
        cache = cache_lib.extend_cache(
            cache, extra_descriptions,
            cache_lib.text_encode_fn(enc, exp.built.description_tokenizer),
            params=cache_lib.encoder_params(enc))
        relations = parallel.replicate(train_lib.relations_input(loaded.config, cache),
                                       exp.trainer.mesh)
    example = _example(loaded, tokens, head, tail, image)
    n = exp.trainer.mesh.devices.size
    batch = next(iter(pipeline.make_eval_batches([example], loaded.tokenizer, exp.pipeline_cfg,
                                                 n)))
    fn = scores_fn(exp.trainer.graphdef_eval)
    with jax.set_mesh(exp.trainer.mesh):
        out = fn(exp.state["params"], exp.trainer.rest,
                 parallel.shard_batch(batch, exp.trainer.mesh), relations)
    out = jax.device_get(out)
    logits = np.asarray(out["logits"][0], np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    names = list(cache.names) if loaded.config.model.head == "retrieval" else loaded.label_names
    order = np.argsort(-logits, kind="stable")[:top_k]
    results = []
    for r in order:
        item = {"relation": names[r], "score": float(logits[r]), "probability": float(probs[r])}
        if "desc_sim" in out:
            sims = np.where(cache.mask[r], out["desc_sim"][0, r], -np.inf)
            k = int(np.argmax(sims))
            item["description"] = cache.texts[r][k]
            item["description_similarity"] = float(sims[k])
        results.append(item)
    return results


def write_eval_outputs(metrics: Mapping[str, Any], label_names: Sequence[str], out_dir: str | Path,
                       split: str) -> dict[str, Path]:
    """``metrics_<split>.json``, ``report_<split>.txt`` and ``confusion_<split>.png``."""
    out_dir = Path(out_dir)
    paths = {
        "json": metrics_lib.write_json(dict(metrics), out_dir / f"metrics_{split}.json"),
        "report": out_dir / f"report_{split}.txt",
        "confusion": metrics_lib.plot_confusion(np.asarray(metrics["confusion"]), label_names,
                                                out_dir / f"confusion_{split}.png",
                                                title=f"{split}: rows gold, columns predicted"),
    }
    paths["report"].write_text(metrics_lib.format_report(dict(metrics)) + "\n")
    return paths
