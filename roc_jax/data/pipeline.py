"""The grain input pipeline: TFDS examples -> bucketed, checkpointable batches.

The examples and batches are those of docs/architecture.md.

Input: any random-access source (``__len__``, ``__getitem__``) of "TFDS example" dicts, e.g.
``tfds.data_source(...)``, a plain list, or ``SampleSource`` over reader ``Sample`` records.
Output: ``dict[str, np.ndarray]`` batches with exactly the keys and dtypes of "Batch" there.

How it works, and why:

- Text is encoded once, up front, for every record (``TextTable``): per-word word pieces come from
  one batched tokenizer call, markers are inserted by construction (``markers.py``), and the result
  is a small int32 table. Batches then gather rows of that table, so tokenization never limits
  training, and every record's length is known before the first batch.
- Known lengths make *global* length buckets possible: each epoch is a seeded permutation
  (``np.random.default_rng((seed, epoch))``), grouped by bucket, cut into global batches, whose order
  is shuffled again. A batch is padded to the smallest bucket that holds its longest row, so an
  epoch compiles at most ``len(buckets)`` shapes (plus at most ``len(buckets) - 1`` batches that
  straddle two buckets, padded to the larger). With ``drop_remainder`` the ``N % B`` samples left
  out of an epoch are a random choice, not the longest ones.
- Multi-host: the plan is the same on every host; host ``p`` of ``P`` (grain ``ShardOptions``,
  by default ``ShardByJaxProcess``) assembles rows ``[p*B/P, (p+1)*B/P)`` of each *global* batch.
  So all hosts agree on the sequence length of each step (a global ``jax.Array`` needs that, which
  per-host bucketing would break), each host reads only its own records, and the global batch
  sequence does not depend on the number of hosts. ``batch_size`` is the GLOBAL batch: it must be
  divisible by the process count here, and by ``jax.device_count()`` for the data-parallel step
  (the training code checks that); each host yields its ``batch_size // process_count`` rows.
- grain does the work: ``MapDataset.source(plan).map(assemble)`` with ``ReadOptions`` threads, and
  ``mp_prefetch`` worker processes when ``num_workers > 0`` (image decode, resize, normalization
  happen there). Element ``i`` of the dataset is global step ``i``, so an iterator's state is just
  the next step: ``get_state() -> {'format', 'fingerprint', 'next_step'}`` (JSON), and
  ``set_state`` restarts grain at that step, exactly, whatever ``num_workers`` is.
- Eval batches keep the source order, are padded to the full batch with ``mask`` False rows, so
  that no sample is dropped and every sample appears exactly once; with several hosts each takes
  its rows of every global batch as in training (a host's rows may all be padding).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from roc_jax.data.images import load_image, normalize, resize_uint8
from roc_jax.data.markers import MARKER_STYLES, MarkerTokenizer
from roc_jax.data.records import Sample

STATE_FORMAT = 1
BATCH_KEYS = ("input_ids", "attention_mask", "head_index", "tail_index", "pixel_values",
              "has_image", "tail_box", "tail_is_object", "label", "mask")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input pipeline settings.

    ``buckets`` are sequence lengths (``[CLS]``/``[SEP]`` included); values above ``max_len`` are
    dropped and ``max_len`` is always the last bucket. ``image_spec`` (``ImageSpec`` or anything
    with ``image_size``, ``mean``, ``std``) is required when ``use_images``. ``num_workers`` > 0
    starts that many grain worker processes (``mp_prefetch``); ``num_threads`` are grain's reader
    threads. ``drop_remainder`` applies to training only (eval never drops).
    """

    max_len: int = 80
    marker_style: str = "typed"
    buckets: tuple[int, ...] = (32, 48, 64, 80)
    use_images: bool = False
    image_spec: Any = None
    num_workers: int = 0
    num_threads: int = 4
    prefetch_buffer_size: int = 16
    drop_remainder: bool = True

    def __post_init__(self) -> None:
        if self.marker_style not in MARKER_STYLES:
            raise ValueError(f"marker_style {self.marker_style!r} is not one of {MARKER_STYLES}")
        if self.use_images and self.image_spec is None:
            raise ValueError("use_images=True needs an image_spec (image_size, mean, std)")
        if any(int(b) < 1 for b in self.buckets):
            raise ValueError(f"buckets must be positive lengths, got {self.buckets}")
        if self.num_workers < 0 or self.num_threads < 0:
            raise ValueError("num_workers and num_threads must be >= 0")

    @property
    def lengths(self) -> tuple[int, ...]:
        """The sorted bucket lengths actually used, ending at ``max_len``."""
        return tuple(sorted({int(b) for b in self.buckets if int(b) < self.max_len} | {self.max_len}))


# ----------------------------------------------------------------------------------------------
# Examples: the TFDS example dict (docs/architecture.md), and an adapter from reader Samples.


def _str(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def sample_to_example(
    sample: Sample, image_size: int, rel2id: Mapping[str, int], *, load: bool = True
) -> dict[str, Any]:
    """A reader ``Sample`` -> the TFDS example dict of docs/architecture.md.

    The image is decoded and squashed to ``[image_size, image_size, 3]`` uint8 (zeros and
    ``has_image`` False when ``image_path`` is None, or when ``load`` is False: the text-only view).
    MORE's image-object tail (a ``box`` and no span) gets ``span`` ``[-1, -1]``; its box is
    already normalized to ``[0, 1]`` by the reader (records.Entity), so no image file is needed.
    """
    if sample.relation not in rel2id:
        raise ValueError(f"{sample.source}: relation {sample.relation!r} is not in the label set")
    head, tail = sample.head, sample.tail
    if head.span is None:
        raise ValueError(f"{sample.source}: field 'h': the head needs a token span")
    image = np.zeros((image_size, image_size, 3), np.uint8)
    has_image = False
    box = np.zeros(4, np.float32)
    is_object = tail.span is None
    if is_object:
        if tail.box is None:
            raise ValueError(f"{sample.source}: field 't': a tail needs a span or a box")
        box = np.asarray(tail.box, np.float32)
    if load and sample.image_path is not None:
        image = load_image(sample.image_path, image_size)
        has_image = True
    return {
        "tokens": list(sample.tokens),
        "head": {"name": head.name, "span": np.asarray(head.span, np.int32), "type": head.type},
        "tail": {"name": tail.name,
                 "span": np.asarray(tail.span if tail.span else (-1, -1), np.int32),
                 "box": box, "type": tail.type, "is_object": bool(is_object)},
        "image": image,
        "has_image": has_image if load else sample.image_path is not None,
        "relation": np.int64(rel2id[sample.relation]),
        "img_id": sample.img_id,
    }


class SampleSource:
    """Random-access source of TFDS example dicts over reader ``Sample`` records.

    Images are decoded lazily in ``__getitem__`` (so in grain's workers); ``text_example(i)``
    skips the image, which the pipeline uses to build its text table quickly.
    """

    def __init__(self, samples: Sequence[Sample], rel2id: Mapping[str, int], image_size: int):
        self.samples = list(samples)
        self.rel2id = dict(rel2id)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return sample_to_example(self.samples[index], self.image_size, self.rel2id)

    def text_example(self, index: int) -> dict[str, Any]:
        return sample_to_example(self.samples[index], self.image_size, self.rel2id, load=False)


# ----------------------------------------------------------------------------------------------
# The text table: every record encoded once.


@dataclasses.dataclass
class TextTable:
    """Every record of a source, encoded. ``N`` records, ``M = max_len``.

    ``input_ids`` int32 ``[N, M]`` (pad id after ``lengths[i]``), ``lengths`` int32 ``[N]``,
    ``head_index``/``tail_index``/``label`` int32 ``[N]``, ``has_image``/``tail_is_object`` bool
    ``[N]``, ``tail_box`` float32 ``[N, 4]``; ``num_truncated`` counts records cut to ``M``.
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    head_index: np.ndarray
    tail_index: np.ndarray
    label: np.ndarray
    has_image: np.ndarray
    tail_box: np.ndarray
    tail_is_object: np.ndarray
    num_truncated: int

    def digest(self) -> str:
        """A short hash of the table's content, to tie an iterator state to its data."""
        h = hashlib.sha256()
        for a in (self.input_ids, self.head_index, self.tail_index, self.label):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def _field(example: Mapping[str, Any], key: str, where: str) -> Any:
    try:
        return example[key]
    except (KeyError, TypeError):
        raise ValueError(f"{where}: missing field {key!r}") from None


def build_text_table(source: Any, encoder: MarkerTokenizer) -> TextTable:
    """Encodes every record of ``source`` with ``encoder`` (one pass, one batched tokenizer call).

    Uses ``source.text_example(i)`` when the source has it (no image decode). Errors name the
    record index, its ``img_id`` and the field.
    """
    n = len(source)
    text_view = getattr(source, "text_example", None)
    parsed = []
    for i in range(n):
        ex = text_view(i) if text_view is not None else source[i]
        where = f"record {i}"
        try:
            where = f"record {i} (img_id={_str(_field(ex, 'img_id', where))})"
            tokens = [_str(t) for t in _field(ex, "tokens", where)]
            head = _field(ex, "head", where)
            tail = _field(ex, "tail", where)
            head_span = [int(x) for x in _field(head, "span", f"{where}: head")]
            tail_span = [int(x) for x in _field(tail, "span", f"{where}: tail")]
            is_object = bool(tail.get("is_object", False))
            parsed.append((
                tokens, head_span, None if is_object else tail_span,
                _str(head.get("type", "")), _str(tail.get("type", "")),
                int(_field(ex, "relation", where)), bool(ex.get("has_image", False)),
                np.asarray(tail.get("box", np.zeros(4)), np.float32).reshape(4), is_object,
            ))
        except (TypeError, ValueError) as e:
            if str(e).startswith(where):
                raise
            raise ValueError(f"{where}: {e}") from None
    encoder.prime([p[0] for p in parsed], [t for p in parsed for t in (p[3], p[4])])

    m = encoder.max_len
    table = TextTable(
        input_ids=np.full((n, m), encoder.pad_id, np.int32), lengths=np.zeros(n, np.int32),
        head_index=np.zeros(n, np.int32), tail_index=np.zeros(n, np.int32),
        label=np.zeros(n, np.int32), has_image=np.zeros(n, bool),
        tail_box=np.zeros((n, 4), np.float32), tail_is_object=np.zeros(n, bool), num_truncated=0)
    for i, (tokens, hs, ts, ht, tt, label, has_image, box, is_object) in enumerate(parsed):
        try:
            enc = encoder.encode(tokens, hs, ts, ht, tt)
        except ValueError as e:
            raise ValueError(f"record {i}: {e}") from None
        k = len(enc.input_ids)
        table.input_ids[i, :k] = enc.input_ids
        table.lengths[i] = k
        table.head_index[i] = enc.head_index
        table.tail_index[i] = enc.tail_index
        table.label[i] = label
        table.has_image[i] = has_image
        table.tail_box[i] = box
        table.tail_is_object[i] = is_object
        table.num_truncated += enc.truncated
    return table


# ----------------------------------------------------------------------------------------------
# Plans: global step -> this host's record indices (-1 = padding row) and sequence length.


class _Plan:
    """Random-access plan (a grain source): element ``i`` is global step ``i``'s local batch."""

    def __init__(self, bucket_len: np.ndarray, batch_size: int, shard: grain.sharding.ShardOptions,
                 *, seed: int | None, drop_remainder: bool, num_epochs: int | None):
        self.bucket_len = bucket_len
        self.batch_size = batch_size
        self.local = batch_size // shard.shard_count
        self.offset = shard.shard_index * self.local
        self.seed = seed
        n = len(bucket_len)
        self.per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
        if self.per_epoch == 0:
            raise ValueError(f"{n} records make no full batch of {batch_size} (drop_remainder)")
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        self._lock = threading.Lock()
        self._cached: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_lock")
        state["_cached"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize if self.num_epochs is None else self.num_epochs * self.per_epoch

    def epoch(self, epoch: int) -> np.ndarray:
        """int64 ``[steps_per_epoch, B]``: the global batches' record indices (-1 pads), in order."""
        return self._epoch(epoch)[0]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(global batches ``[S, B]``, their sequence lengths ``[S]``) of one epoch, cached."""
        with self._lock:
            if self._cached is not None and self._cached[0] == epoch:
                return self._cached[1]
        n, b = len(self.bucket_len), self.batch_size
        if self.seed is None:  # eval: source order
            order = np.arange(n)
        else:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(n)
            if self.drop_remainder:  # the dropped samples are a random choice
                order = order[: n - n % b]
            order = order[np.argsort(self.bucket_len[order], kind="stable")]
        batches = np.full(self.per_epoch * b, -1, np.int64)
        batches[: len(order)] = order
        batches = batches.reshape(self.per_epoch, b)
        if self.seed is not None:
            batches = batches[rng.permutation(self.per_epoch)]
        lengths = np.where(batches >= 0, self.bucket_len[batches], 0).max(axis=1)
        with self._lock:
            self._cached = (epoch, (batches, lengths))
        return batches, lengths

    def __getitem__(self, step: int) -> dict[str, Any]:
        batches, lengths = self._epoch(step // self.per_epoch)
        j = step % self.per_epoch
        return {"indices": batches[j, self.offset: self.offset + self.local],
                "length": int(lengths[j])}


class _Assemble:
    """grain map: a plan element -> a Batch dict (docs/architecture.md). Runs in grain threads/workers.

    The table's columns get one extra all-zero row (index ``N``) that padding rows (-1) point at,
    so a batch is a handful of gathers, without per-key masking.
    """

    def __init__(self, table: TextTable, source: Any, cfg: PipelineConfig, pad_id: int):
        def padded(column: np.ndarray, fill: Any = 0) -> np.ndarray:
            extra = np.full((1, *column.shape[1:]), fill, column.dtype)
            return np.concatenate([column, extra])

        self.n = len(table.lengths)
        # Without images, has_image is False everywhere: the image tokens are masked out.
        self.columns = {
            "head_index": padded(table.head_index), "tail_index": padded(table.tail_index),
            "has_image": padded(table.has_image & cfg.use_images),
            "tail_box": padded(table.tail_box), "tail_is_object": padded(table.tail_is_object),
            "label": padded(table.label),
        }
        self.input_ids = padded(table.input_ids, pad_id)
        self.lengths = padded(table.lengths)
        self.positions = np.arange(cfg.max_len, dtype=np.int32)
        self.source = source if cfg.use_images else None
        self.spec = cfg.image_spec

    def __call__(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        idx, length = element["indices"], element["length"]
        valid = idx >= 0
        rows = np.where(valid, idx, self.n)
        batch = {key: column[rows] for key, column in self.columns.items()}
        batch["input_ids"] = self.input_ids[rows, :length]
        batch["attention_mask"] = (self.positions[None, :length]
                                   < self.lengths[rows][:, None]).astype(np.int32)
        batch["mask"] = valid
        if self.source is not None:
            batch["pixel_values"] = self._pixels(idx, batch["has_image"])
        return batch

    def _pixels(self, idx: np.ndarray, has_image: np.ndarray) -> np.ndarray:
        s = int(self.spec.image_size)
        pixels = np.zeros((len(idx), s, s, 3), np.float32)
        for row, (i, present) in enumerate(zip(idx, has_image, strict=True)):
            if present:  # missing images stay zeros; the model masks them out
                image = np.asarray(self.source[int(i)]["image"], np.uint8)
                pixels[row] = normalize(resize_uint8(image, s), self.spec.mean, self.spec.std)
        return pixels


# ----------------------------------------------------------------------------------------------
# Public API.


def _ensure_absl_flags_parsed() -> None:
    """grain reads absl flags; outside ``absl.app.run`` they are unparsed and reading them raises
    ``UnparsedFlagAccessError``, so mark them parsed (with their defaults) in that case only."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shard(shard_options: grain.sharding.ShardOptions | None, batch_size: int):
    shard = shard_options or grain.sharding.ShardByJaxProcess()
    if batch_size % shard.shard_count:
        raise ValueError(f"global batch_size={batch_size} is not divisible by the "
                         f"{shard.shard_count} hosts (shard_count)")
    return shard


def _bucket_lengths(table: TextTable, cfg: PipelineConfig) -> np.ndarray:
    lengths = np.asarray(cfg.lengths)
    return lengths[np.searchsorted(lengths, table.lengths)].astype(np.int32)


class _Pipeline:
    """Shared construction: text table, plan, grain dataset."""

    def __init__(self, source: Any, tokenizer: Any, cfg: PipelineConfig, batch_size: int, *,
                 seed: int | None, drop_remainder: bool, num_epochs: int | None,
                 shard_options: grain.sharding.ShardOptions | None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        _ensure_absl_flags_parsed()
        self.cfg = cfg
        self.shard = _shard(shard_options, batch_size)
        self.encoder = MarkerTokenizer(tokenizer, style=cfg.marker_style, max_len=cfg.max_len)
        self.table = build_text_table(source, self.encoder)
        self.plan = _Plan(_bucket_lengths(self.table, cfg), batch_size, self.shard, seed=seed,
                          drop_remainder=drop_remainder, num_epochs=num_epochs)
        self.dataset = grain.MapDataset.source(self.plan).map(
            _Assemble(self.table, source, cfg, self.encoder.pad_id))
        self.fingerprint = hashlib.sha256(json.dumps({
            "table": self.table.digest(), "seed": seed, "batch_size": batch_size,
            "buckets": cfg.lengths, "drop_remainder": drop_remainder, "num_epochs": num_epochs,
            "use_images": cfg.use_images,
        }).encode()).hexdigest()[:16]

    def grain_iterator(self, start: int) -> Any:
        ds = self.dataset[start:] if start else self.dataset
        it_ds = ds.to_iter_dataset(grain.ReadOptions(
            num_threads=self.cfg.num_threads, prefetch_buffer_size=self.cfg.prefetch_buffer_size))
        if self.cfg.num_workers > 0:
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.cfg.num_workers, per_worker_buffer_size=2))
        return iter(it_ds)


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Endless (or ``num_epochs``-long) iterator of this host's training batches.

    ``get_state()``/``set_state()`` are JSON-serialisable and exact: restoring a state replays the
    same batches as the uninterrupted run. ``close()`` stops grain's worker processes.
    """

    def __init__(self, pipeline: _Pipeline):
        self._pipeline = pipeline
        self._step = 0
        self._iter = pipeline.grain_iterator(0)

    @property
    def steps_per_epoch(self) -> int:
        return self._pipeline.plan.per_epoch

    @property
    def table(self) -> TextTable:
        return self._pipeline.table

    def local_indices(self, step: int) -> np.ndarray:
        """int64 ``[batch_size // shard_count]``: the source records (-1: padding) of this host's
        rows of global step ``step``, whose batch ``__next__`` yields at that step."""
        return np.asarray(self._pipeline.plan[step]["indices"])

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iter)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """``{'format': 1, 'fingerprint': str, 'next_step': int}``: the ``data`` checkpoint item."""
        return {"format": STATE_FORMAT, "fingerprint": self._pipeline.fingerprint,
                "next_step": self._step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restarts at ``state['next_step']``; a state from another pipeline raises ValueError."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"iterator state format {state.get('format')!r} is not {STATE_FORMAT}")
        if state.get("fingerprint") != self._pipeline.fingerprint:
            raise ValueError(
                f"iterator state fingerprint {state.get('fingerprint')!r} does not match this "
                f"pipeline's {self._pipeline.fingerprint!r} (other data, seed, batch size or "
                "buckets)")
        step = int(state["next_step"])
        if not 0 <= step <= len(self._pipeline.plan):
            raise ValueError(f"iterator state next_step={step} is out of range")
        self.close()
        self._step = step
        self._iter = self._pipeline.grain_iterator(step)

    def close(self) -> None:
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()


class EvalBatches:
    """All samples of a source in order, in batches padded to ``batch_size`` (``mask`` False).

    Iterable several times; ``len()`` is the number of batches.
    """

    def __init__(self, pipeline: _Pipeline):
        self._pipeline = pipeline

    @property
    def table(self) -> TextTable:
        return self._pipeline.table

    def __len__(self) -> int:
        return self._pipeline.plan.per_epoch

    def local_indices(self, batch: int) -> np.ndarray:
        """int64 ``[batch_size // shard_count]``: the source records (-1: padding, ``mask``
        False) of this host's rows of batch ``batch``."""
        return np.asarray(self._pipeline.plan[batch]["indices"])

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        it = self._pipeline.grain_iterator(0)
        try:
            yield from it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def make_train_iterator(
    source: Any, tokenizer: Any, cfg: PipelineConfig, *, seed: int, batch_size: int,
    num_epochs: int | None = None, shard_options: grain.sharding.ShardOptions | None = None,
) -> TrainIterator:
    """Shuffled, bucketed training batches of this host: ``batch_size // shard_count`` rows each.

    ``batch_size`` is the GLOBAL batch size. ``shard_options`` defaults to grain's
    ``ShardByJaxProcess`` (``jax.process_index()`` of ``jax.process_count()``).
    """
    return TrainIterator(_Pipeline(
        source, tokenizer, cfg, batch_size, seed=seed, drop_remainder=cfg.drop_remainder,
        num_epochs=num_epochs, shard_options=shard_options))


def make_eval_batches(
    source: Any, tokenizer: Any, cfg: PipelineConfig, batch_size: int, *,
    shard_options: grain.sharding.ShardOptions | None = None,
) -> EvalBatches:
    """One pass over ``source`` in order; the last batch is padded with ``mask`` False rows."""
    return EvalBatches(_Pipeline(
        source, tokenizer, cfg, batch_size, seed=None, drop_remainder=False, num_epochs=1,
        shard_options=shard_options))


def load_tokenizer(path: str | Path) -> Any:
    """A Hugging Face tokenizer from a local folder (never the hub)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
