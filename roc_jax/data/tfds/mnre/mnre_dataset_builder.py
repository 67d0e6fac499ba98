"""TFDS builder for MNRE (MNRE-2 by default; MNRE-1 with its own label file).

Build (no TensorFlow needed)::

    python -m roc_jax.data.download mnre --dir ~/tensorflow_datasets/downloads/manual/mnre
    python -c "import roc_jax.data.tfds.mnre, tensorflow_datasets as tfds; \
        tfds.builder('mnre/mnre2').download_and_prepare(download_config= \
        tfds.download.DownloadConfig(manual_dir='~/tensorflow_datasets/downloads/manual/mnre'))"

Read: ``tfds.data_source('mnre/mnre2', split='train')[i]`` (the example of docs/architecture.md).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from roc_jax.data import mnre
from roc_jax.data.reading import ReadResult
from roc_jax.data.tfds import builder_lib


class Builder(builder_lib.RocBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """MNRE: relations between two text entities of a tweet, with the tweet's image."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: MNRE text files, images resized at build time."}
    BUILDER_CONFIGS = [
        builder_lib.RocDataConfig(
            name="mnre2", description="MNRE-2 (23 labels), 224x224 images, spaCy entity types",
            image_size=224),
        builder_lib.RocDataConfig(
            name="mnre2_notypes", description="MNRE-2 without entity types (ablation)",
            image_size=224, entity_types="none"),
        builder_lib.RocDataConfig(
            name="mnre2_64", description="MNRE-2 with 64x64 images (quick experiments, tests)",
            image_size=64),
        builder_lib.RocDataConfig(
            name="mnre1", description="MNRE-1 (31 labels): the files of the MNRE repository's "
            "Version-1/ (mnre_org_{train,val,test}.txt) and its label file as "
            "`mnre1_rel2id.json` in the manual folder", image_size=224,
            label_file="mnre1_rel2id.json", file_prefix="mnre_org_"),
    ]
    DEFAULT_CONFIG_NAME = "mnre2"
    SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}
    DEFAULT_LABEL_FILE = mnre.LABEL_FILE
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put the MNRE files into the manual-download folder (`manual_dir`):
      mnre_train.txt, mnre_val.txt, mnre_test.txt, ours_rel2id.json
        from https://github.com/thecharm/MNRE, folder mnre_txt/ (upstream names the val file
        'mnre_val .txt', with a space; either name is read). `python -m roc_jax.data.download
        mnre --dir <manual_dir>` fetches them.
      img_org/train/, img_org/val/, img_org/test/
        the images, named by img_id: the MNRE repository links the image archive on Google
        Drive (https://drive.google.com/file/d/1FYiJFtRayWY32nRH0rdycYzIdDcMmDFR/view); the
        same command fetches and unpacks it, and `--images-archive PATH` unpacks an archive
        downloaded in a browser. Missing and unreadable images are allowed: such samples get a
        black image and has_image=False, and are counted in the metadata.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=builder_lib.features(self.builder_config.image_size),
            homepage="https://github.com/thecharm/MNRE",
            metadata=tfds.core.MetadataDict(),
            # File order: example i of a split is the i-th kept line, so predictions line up
            # with the raw file (the input pipeline shuffles with its own seed).
            disable_shuffling=True,
            citation="""@inproceedings{zheng2021mnre,
  title={MNRE: A Challenge Multimodal Dataset for Neural Relation Extraction with Visual
         Evidence in Social Media Posts},
  author={Zheng, Changmeng and Wu, Zhiwei and Feng, Junhao and Fu, Ze and Cai, Yi},
  booktitle={ICME}, year={2021}}""",
        )

    @classmethod
    def _input_paths(cls, root: Path, config: builder_lib.RocDataConfig
                     ) -> tuple[list[Path], list[Path]]:
        prefix = config.file_prefix
        return ([mnre.split_file(root, split, prefix) for split in mnre.SPLITS],
                [root / "img_org" / split for split in mnre.SPLITS])

    def _read(self, root: Path, split: str, rel2id: dict[str, int], strict: bool) -> ReadResult:
        path = mnre.split_file(root, split, self.builder_config.file_prefix)
        return mnre.read_mnre(path, rel2id, root / "img_org" / split, strict,
                              allow_missing_images=True)
