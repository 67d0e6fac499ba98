"""The description-embedding cache: [R, K] description texts -> [R, K, D] text-tower embeddings.

The cache is the retrieval index of ROC: encoded once, stored as the ``labels`` item of the orbax
checkpoint Composite (beside the model ``state``), and restored by eval/predict without touching the
text tower. Its ``fingerprint`` covers the description texts and the text encoder's parameters, so
``ensure_cache`` re-encodes (and says so in the log) whenever either changed.

``relation_scores`` turns pair vectors and the cached (projected) description embeddings into
relation scores; how the K descriptions of a relation combine is a config choice (``mode``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from roc_jax.labels.descriptions import DescriptionsError, DescriptionsFile, as_mapping, check_names
from roc_jax.models.scoring import relation_scores

log = logging.getLogger(__name__)

EncodeFn = Callable[[list[str]], np.ndarray]  # texts [N] -> embeddings [N, D]
CACHE_FORMAT = 1


@dataclasses.dataclass
class DescriptionCache:
    """Encoded descriptions of a label set.

    names: relation names [R], in label-id order.
    texts: the descriptions [R][K_r] (ragged).
    embeddings: float32 [R, K, D], K = max K_r; padded slots are zeros.
    mask: bool [R, K], True where ``embeddings`` holds a real description.
    fingerprint: sha256 (hex) of the texts and the encoder parameters (see ``fingerprint``).
    """

    names: list[str]
    texts: list[list[str]]
    embeddings: np.ndarray
    mask: np.ndarray
    fingerprint: str

    def __post_init__(self) -> None:
        r = len(self.names)
        if self.embeddings.ndim != 3 or self.embeddings.shape[0] != r:
            raise ValueError(f"embeddings must be [R={r}, K, D], got {self.embeddings.shape}")
        if self.mask.shape != self.embeddings.shape[:2] or self.mask.dtype != np.bool_:
            raise ValueError(f"mask must be bool {self.embeddings.shape[:2]}, got "
                             f"{self.mask.dtype} {self.mask.shape}")
        if len(self.texts) != r or any(
            len(t) != int(m.sum()) for t, m in zip(self.texts, self.mask, strict=True)
        ):
            raise ValueError("texts [R][K_r] do not match the mask")

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[-1])

    def descriptions(self) -> dict[str, list[str]]:
        """``{relation: [descriptions]}`` in cache order."""
        return {n: list(t) for n, t in zip(self.names, self.texts, strict=True)}


# --------------------------------------------------------------------------- fingerprint


def _hash_leaf(h: Any, path: str, leaf: Any) -> None:
    h.update(path.encode())
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    else:
        h.update(f"|{type(leaf).__name__}|{leaf!r}|".encode())


def fingerprint(
    texts: Mapping[str, Sequence[str]] | Sequence[Sequence[str]],
    params: Any,
    extra: str = "",
) -> str:
    """sha256 (hex) of the description texts and of the encoder parameters.

    texts: ``{relation: [descriptions]}`` (names and order count) or ``[R][K]`` lists.
    params: any pytree of arrays, typically ``nnx.state(text_encoder)``; every leaf's path, dtype,
        shape and bytes enter the hash.
    extra: encoding settings that change the embeddings (e.g. ``"max_len=64,pool=mean"``).
    """
    h = hashlib.sha256()
    if isinstance(texts, Mapping):
        payload = [[name, list(v)] for name, v in texts.items()]
    else:
        payload = [list(v) for v in texts]
    h.update(json.dumps(payload, ensure_ascii=False).encode())
    h.update(b"\x00" + extra.encode() + b"\x00")
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        _hash_leaf(h, jax.tree_util.keystr(path), leaf)
    return h.hexdigest()


# --------------------------------------------------------------------------- encoding


def _ordered(
    descriptions: Mapping[str, Sequence[str]] | DescriptionsFile, rel_names: Sequence[str]
) -> dict[str, list[str]]:
    """Descriptions in ``rel_names`` order, checked: every relation has >= 1 non-empty text."""
    names = check_names(rel_names)
    mapping = as_mapping(descriptions)
    missing = [n for n in names if n not in mapping]
    if missing:
        raise DescriptionsError(f"no descriptions for relation(s) {missing}")
    unknown = [n for n in mapping if n not in set(names)]
    if unknown:
        raise DescriptionsError(f"descriptions for relation(s) {unknown} not in the label set")
    out = {}
    for n in names:
        texts = list(mapping[n])
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise DescriptionsError(f"relation {n!r}: needs at least one non-empty description")
        out[n] = texts
    return out


def _encode_ragged(texts: list[list[str]], encode_fn: EncodeFn) -> tuple[np.ndarray, np.ndarray]:
    """[R][K_r] texts -> (embeddings float32 [R, K, D], mask bool [R, K])."""
    flat = [t for row in texts for t in row]
    emb = np.asarray(encode_fn(flat))
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise ValueError(f"encode_fn must return [N={len(flat)}, D], got shape {emb.shape}")
    emb = emb.astype(np.float32)
    if not np.isfinite(emb).all():
        raise ValueError("encode_fn returned non-finite embeddings")
    r, k = len(texts), max(len(row) for row in texts)
    out = np.zeros((r, k, emb.shape[1]), np.float32)
    mask = np.zeros((r, k), np.bool_)
    i = 0
    for j, row in enumerate(texts):
        out[j, : len(row)] = emb[i : i + len(row)]
        mask[j, : len(row)] = True
        i += len(row)
    return out, mask


def encode_descriptions(
    descriptions: Mapping[str, Sequence[str]] | DescriptionsFile,
    rel_names: Sequence[str],
    encode_fn: EncodeFn,
    fingerprint: str,
) -> DescriptionCache:
    """Encodes every description once (one ``encode_fn`` call) -> ``DescriptionCache``.

    encode_fn: ``list[str] [N] -> np.ndarray [N, D]``.
    """
    ordered = _ordered(descriptions, rel_names)
    texts = list(ordered.values())
    emb, mask = _encode_ragged(texts, encode_fn)
    return DescriptionCache(list(ordered), texts, emb, mask, fingerprint)


def text_encode_fn(
    bert: Any, tokenizer: Any, max_len: int = 64, batch_size: int = 64
) -> EncodeFn:
    """Mean-pooled BERT sentence vectors (sentence-transformers pooling of MiniLM), float32 [N, D].

    bert: a ``BertEncoder`` (``(input_ids [B, L], attention_mask [B, L]) -> [B, L, D]``).
    tokenizer: a Hugging Face tokenizer. Every batch is padded to ``[batch_size, max_len]`` so the
    jitted encoder compiles once.
    """
    from flax import nnx

    @nnx.jit
    def _pooled(model: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
        hidden = model(ids, mask).astype(jnp.float32)  # [B, L, D]
        m = mask[..., None].astype(jnp.float32)
        return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)  # [B, D]

    def encode(texts: list[str]) -> np.ndarray:
        # A copy in eval mode: no dropout, whatever mode the caller's module is in; the copy shares
        # the current parameter arrays, so later updates to ``bert`` are seen by the next call.
        model = nnx.merge(*nnx.split(bert))
        model.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_len,
                            return_tensors="np")
            ids = np.zeros((batch_size, max_len), np.int32)
            mask = np.zeros((batch_size, max_len), np.int32)
            ids[: len(chunk)] = enc["input_ids"]
            mask[: len(chunk)] = enc["attention_mask"]
            mask[len(chunk):, 0] = 1  # padding rows attend to one token: no all-masked softmax
            out.append(np.asarray(_pooled(model, jnp.asarray(ids), jnp.asarray(mask)))[: len(chunk)])
        if not out:
            raise ValueError("text_encode_fn: no texts to encode")
        return np.concatenate(out).astype(np.float32)

    return encode


def encoder_params(encoder: Any) -> Any:
    """The parameters of an NNX text encoder to fingerprint: ``nnx.state(encoder, nnx.Param)``.

    Only ``nnx.Param`` leaves: dropout RNG counters change during training without changing the
    embeddings, and must not make the cache stale.
    """
    from flax import nnx

    return nnx.state(encoder, nnx.Param)


def ensure_cache(
    cache_or_none: DescriptionCache | None,
    descriptions: Mapping[str, Sequence[str]] | DescriptionsFile,
    rel_names: Sequence[str],
    encode_fn: EncodeFn,
    params: Any,
    *,
    extra: str = "",
) -> DescriptionCache:
    """Returns ``cache_or_none`` when its fingerprint is current, else re-encodes (with a log line).

    params: the text encoder's parameters (``encoder_params(bert)``), hashed into the fingerprint.
    """
    ordered = _ordered(descriptions, rel_names)
    fp = fingerprint(ordered, params, extra)
    if cache_or_none is not None:
        if cache_or_none.fingerprint == fp:
            log.info("description cache is current (fingerprint %s): not re-encoding", fp[:12])
            return cache_or_none
        if cache_or_none.descriptions() != ordered:
            reason = "the descriptions or the label set changed"
        else:
            reason = "the text encoder's parameters or encoding settings changed"
        log.warning(
            "description cache is stale (%s; fingerprint %s -> %s): re-encoding %d descriptions",
            reason, cache_or_none.fingerprint[:12], fp[:12], sum(len(v) for v in ordered.values()),
        )
    else:
        log.info("no description cache: encoding %d descriptions",
                 sum(len(v) for v in ordered.values()))
    return encode_descriptions(ordered, list(ordered), encode_fn, fp)


def extend_cache(
    cache: DescriptionCache,
    extra_descriptions: Mapping[str, Sequence[str]] | DescriptionsFile,
    encode_fn: EncodeFn,
    *,
    params: Any = None,
    extra: str = "",
) -> DescriptionCache:
    """Adds relations the model never saw (scored at predict time, no retraining).

    Refuses names already in the cache. ``encode_fn`` must be the same text tower that built the
    cache; pass ``params`` (and the ``extra`` settings used at build time) to have that checked
    against the cache's fingerprint; the extended cache then gets the ordinary
    ``fingerprint(all texts, params, extra)``, so it can be extended again and ``ensure_cache``
    sees it as current. Without ``params`` the new fingerprint chains the old one with the added
    texts. The new relations come after the old ones (old ids are unchanged).
    """
    new_texts = as_mapping(extra_descriptions)
    if not new_texts:
        raise DescriptionsError("extend_cache: no extra relations given")
    dup = [n for n in new_texts if n in set(cache.names)]
    if dup:
        raise DescriptionsError(f"extend_cache: relation(s) {dup} are already in the label set")
    if params is not None and fingerprint(cache.descriptions(), params, extra) != cache.fingerprint:
        raise ValueError(
            "extend_cache: the encoder parameters do not match the ones the cache was built with "
            "(embeddings from two encoders cannot be compared)"
        )
    ordered = _ordered(new_texts, list(new_texts))
    new_emb, new_mask = _encode_ragged(list(ordered.values()), encode_fn)
    if new_emb.shape[-1] != cache.dim:
        raise ValueError(f"extend_cache: encode_fn gives D={new_emb.shape[-1]}, cache has "
                         f"D={cache.dim}")
    k = max(cache.embeddings.shape[1], new_emb.shape[1])

    def pad(e: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pe = np.zeros((e.shape[0], k, e.shape[2]), np.float32)
        pm = np.zeros((m.shape[0], k), np.bool_)
        pe[:, : e.shape[1]], pm[:, : m.shape[1]] = e, m
        return pe, pm

    old_e, old_m = pad(cache.embeddings, cache.mask)
    add_e, add_m = pad(new_emb, new_mask)
    all_texts = {**cache.descriptions(), **ordered}
    if params is not None:
        fp = fingerprint(all_texts, params, extra)
    else:
        h = hashlib.sha256(cache.fingerprint.encode())
        h.update(json.dumps(list(ordered.items()), ensure_ascii=False).encode())
        fp = h.hexdigest()
    return DescriptionCache(
        names=list(all_texts),
        texts=list(all_texts.values()),
        embeddings=np.concatenate([old_e, add_e]),
        mask=np.concatenate([old_m, add_m]),
        fingerprint=fp,
    )


# --------------------------------------------------------------------------- retrieval


_relation_scores_jit = jax.jit(relation_scores)


def top_k_relations(
    cache: DescriptionCache,
    pair: jax.Array,
    k: int = 5,
    temperature: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval: the ``k`` best relations per pair vector [B, D] -> (ids [B, k], scores [B, k]).

    Uses the cached (unprojected) embeddings, i.e. pair vectors living in the text tower's space.
    """
    scores = _relation_scores_jit(jnp.asarray(pair), jnp.asarray(cache.embeddings),
                                  jnp.asarray(cache.mask), temperature)
    vals, ids = jax.lax.top_k(scores, min(k, len(cache.names)))
    return np.asarray(ids), np.asarray(vals)


# --------------------------------------------------------------------------- orbax


def to_pytree(cache: DescriptionCache) -> dict[str, Any]:
    """The ``labels`` checkpoint item: arrays as arrays, ragged texts as one JSON string."""
    return {
        "embeddings": np.asarray(cache.embeddings, np.float32),
        "mask": np.asarray(cache.mask, np.bool_),
        "index": json.dumps({"names": cache.names, "texts": cache.texts}, ensure_ascii=False),
        "fingerprint": cache.fingerprint,
        "format": CACHE_FORMAT,
    }


def save_args(cache: DescriptionCache) -> ocp.args.PyTreeSave:
    """Orbax args of the ``labels`` item: ``ocp.args.Composite(labels=save_args(cache), ...)``."""
    return ocp.args.PyTreeSave(to_pytree(cache))


def restore_args() -> ocp.args.PyTreeRestore:
    """Orbax args to restore the ``labels`` item (as host numpy arrays)."""
    return ocp.args.PyTreeRestore()


def from_restored(obj: Mapping[str, Any]) -> DescriptionCache:
    """The restored ``labels`` item -> ``DescriptionCache`` (no re-encoding)."""
    try:
        fmt = int(np.asarray(obj["format"]))
        index = json.loads(str(obj["index"]))
        emb = np.asarray(jax.device_get(obj["embeddings"]), np.float32)
        mask = np.asarray(jax.device_get(obj["mask"])).astype(np.bool_)
        fp = str(obj["fingerprint"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"the checkpoint's 'labels' item is not a description cache ({e!r})") from e
    if fmt != CACHE_FORMAT:
        raise ValueError(f"description cache format {fmt} is not supported (expected {CACHE_FORMAT})")
    return DescriptionCache(list(index["names"]), [list(t) for t in index["texts"]], emb, mask, fp)
