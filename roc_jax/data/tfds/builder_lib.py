"""What the MNRE and MORE TFDS builders share: config, features, image encoding, the build report.

The builders write ``array_record`` files and are built and read without TensorFlow: images are
resized and JPEG-encoded here with PIL (``tfds.features.Image`` would need ``tf.image`` to encode a
numpy array, but stores bytes as given), and ``tfds.data_source`` decodes with PIL.

Images are resized to ``image_size x image_size`` by stretching, not cropping: a MORE object box
normalized to the original image then stays valid on the stored image. A missing image is stored
as an all-zero image with ``has_image=False``.

A build is keyed by its input: ``input_fingerprint`` (the sha256 of each text and label file and
a listing of ``img_org/`` with file sizes) is stored in the dataset info's metadata, ``build``
refuses a folder built from other files, and ``roc_jax.data.sources`` names its builds by it, so
changed input (more lines, images added) builds anew and identical input reuses the build.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from roc_jax.data import entity_types
from roc_jax.data.download import sha256_of
from roc_jax.data.reading import ReadResult
from roc_jax.data.records import Sample, id2rel, load_rel2id

log = logging.getLogger(__name__)

JPEG_QUALITY = 95


@dataclasses.dataclass(eq=False)
class RocDataConfig(tfds.core.BuilderConfig):
    """Build options shared by the MNRE and MORE builders.

    Attributes:
      image_size: side ``S`` of the stored ``[S, S, 3]`` images.
      label_file: the label file, relative to the manual-download folder (or absolute).
      entity_types: ``"spacy"`` (NER types) or ``"none"`` (the ablation, empty types).
      strict: raise on the first bad line instead of skipping and counting it.
      file_prefix: MNRE only: ``mnre_`` (MNRE-2) or ``mnre_org_`` (MNRE-1's file names).
    """

    image_size: int = 224
    label_file: str = ""
    entity_types: str = "spacy"
    strict: bool = False
    file_prefix: str = "mnre_"


def features(image_size: int) -> tfds.features.FeaturesDict:
    """The TFDS example (docs/architecture.md), plus ``source`` (``file:line``)."""
    text = tfds.features.Text()
    return tfds.features.FeaturesDict({
        "tokens": tfds.features.Sequence(text),
        "head": tfds.features.FeaturesDict({
            "name": text,
            "span": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "type": text,
        }),
        "tail": tfds.features.FeaturesDict({
            "name": text,
            "span": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "type": text,
            "is_object": tfds.features.Scalar(dtype=np.bool_),
        }),
        "image": tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="jpeg"),
        "has_image": tfds.features.Scalar(dtype=np.bool_),
        # Names are set from the data's label file when the build starts (never from code).
        "relation": tfds.features.ClassLabel(),
        "img_id": text,
        "source": text,
    })


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


@functools.lru_cache(maxsize=8)
def _blank(size: int) -> bytes:
    # A black JPEG decodes to exact zeros (tested); most MNRE samples here have no image.
    return _jpeg(Image.new("RGB", (size, size)))


def encode_image(path: str | None, size: int) -> bytes:
    """JPEG bytes of the image at ``path`` stretched to ``[size, size, 3]``; black when ``None``."""
    if path is None:
        return _blank(size)
    with Image.open(path) as raw:
        image = raw.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return _jpeg(image)


def to_example(sample: Sample, image_size: int) -> dict:
    """A ``Sample`` (types filled in) as a TFDS example dict."""
    tail = sample.tail
    is_object = tail.span is None
    return {
        "tokens": list(sample.tokens),
        "head": {"name": sample.head.name, "span": np.asarray(sample.head.span, np.int32),
                 "type": sample.head.type},
        "tail": {
            "name": tail.name,
            "span": np.asarray((-1, -1) if is_object else tail.span, np.int32),
            "box": np.asarray(tail.box if tail.box is not None else (0, 0, 0, 0), np.float32),
            "type": tail.type,
            "is_object": is_object,
        },
        "image": encode_image(sample.image_path, image_size),
        "has_image": sample.image_path is not None,
        "relation": sample.relation,
        "img_id": sample.img_id,
        "source": sample.source,
    }


def input_fingerprint(root: Path, files: Sequence[Path], image_dirs: Sequence[Path]
                      ) -> dict[str, Any]:
    """What a build is made from: ``{'sha256', 'files', 'images'}`` (JSON-able).

    ``files``: ``{name relative to root: sha256}`` of the text, label and object files that
    exist; ``images``: ``{folder: {'files', 'bytes', 'listing_sha256'}}`` of each image folder
    (file names and sizes; the images are not read: a listing changes when one is added, removed
    or replaced by a file of another size). ``sha256`` digests all of it: the build's identity.
    """
    root = Path(root)
    out: dict[str, Any] = {"files": {}, "images": {}}
    for path in files:
        if path.is_file():
            out["files"][_relative(path, root)] = sha256_of(path)
    for folder in image_dirs:
        entries = sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file()) \
            if folder.is_dir() else []
        listing = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
        out["images"][_relative(folder, root)] = {
            "files": len(entries), "bytes": sum(size for _, size in entries),
            "listing_sha256": listing}
    out["sha256"] = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()
    return out


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:  # a label file given by an absolute path elsewhere
        return str(path)


def fingerprint_differences(built: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable differences of two ``input_fingerprint`` dicts (built vs now)."""
    diffs = []
    for kind in ("files", "images"):
        old, new = built.get(kind, {}), now.get(kind, {})
        for name in sorted(set(old) | set(new)):
            if name not in new:
                diffs.append(f"{name} is gone")
            elif name not in old:
                diffs.append(f"{name} is new")
            elif old[name] != new[name]:
                if kind == "files":
                    diffs.append(f"{name} changed (sha256 {old[name][:12]}... -> "
                                 f"{new[name][:12]}...)")
                else:
                    diffs.append(f"{name} changed ({old[name]['files']} -> "
                                 f"{new[name]['files']} files, {old[name]['bytes']} -> "
                                 f"{new[name]['bytes']} bytes)")
    return diffs or ["fingerprint differs"]


class InputMismatchError(RuntimeError):
    """A TFDS folder built from other raw files than the ones given now."""


class RocBuilderMixin:
    """Split generation shared by the builders; subclasses define ``_read(root, split, ...)`` and
    ``_input_paths(root)``."""

    builder_config: RocDataConfig
    info: tfds.core.DatasetInfo
    SPLIT_NAMES: dict[str, str]  # TFDS split name -> the data set's file split name.
    DEFAULT_LABEL_FILE: str

    def __init__(self, *, file_format: str = "array_record", **kwargs):
        # array_record: random access through tfds.data_source, and no TensorFlow to write it
        # (the TFDS default, tfrecord, needs tf.io).
        super().__init__(file_format=file_format, **kwargs)

    def _read(self, root: Path, split: str, rel2id: dict[str, int], strict: bool) -> ReadResult:
        raise NotImplementedError

    @classmethod
    def _input_paths(cls, root: Path, config: RocDataConfig) -> tuple[list[Path], list[Path]]:
        """``(files, image folders)`` a build of ``root`` reads (those that exist or not)."""
        raise NotImplementedError

    @classmethod
    def raw_fingerprint(cls, root: str | Path, config: RocDataConfig) -> dict[str, Any]:
        """``input_fingerprint`` of the raw files in ``root`` that a build with ``config`` reads."""
        root = Path(root)
        files, image_dirs = cls._input_paths(root, config)
        return input_fingerprint(root, [cls._label_path(root, config), *files], image_dirs)

    def input_fingerprint(self, root: str | Path) -> dict[str, Any]:
        return self.raw_fingerprint(root, self.builder_config)

    @classmethod
    def _label_path(cls, root: Path, config: RocDataConfig) -> Path:
        label = config.label_file or cls.DEFAULT_LABEL_FILE
        return Path(label) if Path(label).is_absolute() else root / label

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        root = Path(dl_manager.manual_dir)
        label_path = self._label_path(root, self.builder_config)
        if not label_path.exists():
            raise FileNotFoundError(
                f"{label_path} not found: put the raw files into the manual-download folder "
                f"{root} (see MANUAL_DOWNLOAD_INSTRUCTIONS, or `python -m "
                f"roc_jax.data.download {self.name} --dir {root}`)")
        rel2id = load_rel2id(label_path)
        self.info.features["relation"].names = id2rel(rel2id)
        config = self.builder_config
        typer = entity_types.make_typer(config.entity_types)
        report = {"entity_types": typer.name, "label_file": label_path.name, "splits": {},
                  "absent_splits": [], "input_fingerprint": self.input_fingerprint(root)}
        generators = {}
        for tfds_split, file_split in self.SPLIT_NAMES.items():
            try:
                result = self._read(root, file_split, rel2id, config.strict)
            except FileNotFoundError as e:
                log.warning("split %s not built: %s", tfds_split, e)
                report["absent_splits"].append(tfds_split)
                continue
            report["splits"][tfds_split] = result.summary()
            samples = entity_types.type_samples(result.samples, typer)
            generators[tfds_split] = self._generate_examples(samples)
        if not generators:
            raise FileNotFoundError(f"no split files found in {root}")
        # Stored in metadata.json next to the data: what was skipped, by reason, and what is
        # missing, per split (nothing is dropped silently).
        self.info.metadata.update(report)
        return generators

    def _generate_examples(self, samples: Sequence[Sample]) -> Iterator[tuple[str, dict]]:
        size = self.builder_config.image_size
        for index, sample in enumerate(samples):
            yield f"{index:06d}", to_example(sample, size)


def build(builder_cls, manual_dir: str | Path, data_dir: str | Path,
          config: str | RocDataConfig | None = None) -> tfds.core.DatasetBuilder:
    """Builds ``builder_cls`` from the raw files in ``manual_dir``, or reuses its build.

    A build is reused only when it was made from the same raw files (``input_fingerprint``);
    a build from other files raises ``InputMismatchError`` naming the differences and the mend.
    """
    builder = builder_cls(data_dir=str(data_dir), config=config)
    if builder.is_prepared():
        built = builder.info.metadata.get("input_fingerprint")
        now = builder.input_fingerprint(manual_dir)
        if built is None or built["sha256"] != now["sha256"]:
            what = "; ".join(fingerprint_differences(built, now)) if built else \
                "it records no input fingerprint"
            raise InputMismatchError(
                f"{builder.data_dir} was built from other raw files than {manual_dir} ({what}): "
                f"delete {builder.data_dir} to rebuild it, or build into another data_dir")
        log.info("reusing %s (built from the same raw files, sha256 %s)", builder.data_dir,
                 now["sha256"][:12])
        return builder
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return builder
