"""The data a run reads: its label set and random-access sources of TFDS example dicts per split.

``config.data.source='tfds'`` builds the TFDS dataset once into ``config.data.tfds_dir``
(independent of the workdir, named by the raw files' fingerprint) and reads it with
``tfds.data_source``; ``'raw'`` reads the raw files through the readers (tests, quick runs). Both
give the examples of docs/architecture.md ("TFDS example"), with the entities typed the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from roc_jax import parallel

log = logging.getLogger("roc_jax")

# The readers' split names -> the TFDS builders' split names.
_TFDS_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test",
                "valid": "validation"}


def _label_file(config: Any) -> str:
    """The label file's name in the raw folder: ``ours_rel2id.json`` (MNRE) or ``rel2id.json``."""
    return "ours_rel2id.json" if config.data.dataset == "mnre" else "rel2id.json"


def _raw_dir(config: Any) -> Path:
    """``config.data.raw_dir`` as a path; raises ``FileNotFoundError`` when it is empty or holds no
    label file (so a wrong folder fails before anything is built)."""
    raw = config.data.raw_dir
    if not raw:
        raise FileNotFoundError("config.data.raw_dir is empty: set --config.data.raw_dir=/path/to/"
                                f"{config.data.dataset} (the folder of the raw data files)")
    path = Path(raw).expanduser()
    if not (path / _label_file(config)).exists():
        raise FileNotFoundError(f"config.data.raw_dir={raw}: {_label_file(config)} not found "
                                "there; is it the raw data folder?")
    return path


def label_names_of(config: Any) -> list[str]:
    """The relation names, ordered by id, from the raw folder's label file."""
    from roc_jax.data.records import id2rel, load_rel2id

    return id2rel(load_rel2id(_raw_dir(config) / _label_file(config)))


def load_sources(config: Any, splits: Sequence[str]) -> dict[str, Any]:
    """``{split: source}``: random-access sources (``len``, ``[i]``) of TFDS example dicts.

    Raises ``FileNotFoundError`` for a missing raw folder, split file or built split, and
    ``ValueError`` for a split without usable samples or an unknown ``config.data.source``.
    """
    raw = _raw_dir(config)
    if config.data.source == "tfds":
        return _tfds_sources(config, raw, splits)
    if config.data.source != "raw":
        raise ValueError(f"config.data.source={config.data.source!r}: expected 'tfds' or 'raw'")
    from roc_jax.data import entity_types, pipeline
    from roc_jax.data.records import load_rel2id

    rel2id = load_rel2id(raw / _label_file(config))
    typer = entity_types.make_typer(config.data.entity_types)
    out = {}
    for split in splits:
        if config.data.dataset == "mnre":
            from roc_jax.data import mnre

            result = mnre.read_mnre_split(raw, split, allow_missing_images=True)
        else:
            from roc_jax.data import more

            result = more.read_more_split(raw, split)
        if not result.samples:
            raise ValueError(f"{raw}: split {split!r} has no usable samples ({result.summary()})")
        log.info("read %s: %s", split, result.summary())
        samples = entity_types.type_samples(result.samples, typer)
        out[split] = pipeline.SampleSource(samples, rel2id, config.data.image_size)
    return out


def data_fingerprint(config: Any) -> dict[str, Any]:
    """``builder_lib.input_fingerprint`` of the raw folder: what the data of a run was made of
    (stored in the checkpoints' ``meta``; the TFDS build is keyed by it)."""
    builder_cls, bcfg = _tfds_builder(config)
    return builder_cls.raw_fingerprint(_raw_dir(config), bcfg)


def _tfds_builder(config: Any) -> tuple[Any, Any]:
    """The TFDS builder class of ``config.data.dataset`` and the build config of this run."""
    from roc_jax.data.tfds import builder_lib

    if config.data.dataset == "mnre":
        from roc_jax.data.tfds.mnre.mnre_dataset_builder import Builder
    else:
        from roc_jax.data.tfds.more.more_dataset_builder import Builder
    bcfg = builder_lib.RocDataConfig(name="unnamed", image_size=config.data.image_size,
                                     entity_types=config.data.entity_types)
    return Builder, bcfg


def _tfds_sources(config: Any, raw: Path, splits: Sequence[str]) -> dict[str, Any]:
    from roc_jax.data.tfds import builder_lib

    builder_cls, bcfg = _tfds_builder(config)
    # Named by the raw files' fingerprint: other input (another subset, images added later)
    # builds anew next to the old build instead of reusing it.
    fingerprint = builder_cls.raw_fingerprint(raw, bcfg)["sha256"][:12]
    name = f"{config.data.dataset}_s{config.data.image_size}_{config.data.entity_types}_" \
        f"{fingerprint}"
    bcfg = dataclasses.replace(bcfg, name=name, description=f"roc_jax build of {raw}")
    tfds_dir = Path(config.data.tfds_dir or "~/tensorflow_datasets").expanduser()
    # The hosts of a multi-process run may share tfds_dir: process 0 builds, the others reuse.
    builder = parallel.main_process_first(
        f"tfds build {name}", lambda: builder_lib.build(builder_cls, raw, tfds_dir, bcfg))
    out = {}
    for split in splits:
        tsplit = _TFDS_SPLITS.get(split, split)
        if tsplit not in builder.info.splits:
            raise FileNotFoundError(f"{raw}: split {split!r} was not built (no file for it)")
        out[split] = builder.as_data_source(split=tsplit)
    return out
