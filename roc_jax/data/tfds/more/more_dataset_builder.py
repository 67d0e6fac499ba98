"""TFDS builder for MORE (He et al., ACM MM 2023): a text entity and an object in the image.

The tail is an image object: ``tail.span`` is ``[-1, -1]``, ``tail.box`` the object's corners
``(x0, y0, x1, y1)`` normalized to the image, ``tail.is_object`` True and ``tail.type`` "object".
File layout and box convention: see ``roc_jax.data.more``.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from roc_jax.data import more
from roc_jax.data.reading import ReadResult
from roc_jax.data.tfds import builder_lib


class Builder(builder_lib.RocBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """MORE: relations between a text entity and a visual object of a news image."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: MORE text files, images resized at build time."}
    BUILDER_CONFIGS = [
        builder_lib.RocDataConfig(
            name="more", description="MORE, 224x224 images, spaCy head types", image_size=224),
        builder_lib.RocDataConfig(
            name="more_notypes", description="MORE without entity types (ablation)",
            image_size=224, entity_types="none"),
        builder_lib.RocDataConfig(
            name="more_64", description="MORE with 64x64 images (quick experiments, tests)",
            image_size=64),
    ]
    DEFAULT_CONFIG_NAME = "more"
    SPLIT_NAMES = {"train": "train", "validation": "valid", "test": "test"}
    DEFAULT_LABEL_FILE = more.LABEL_FILE
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    MORE is distributed through Baidu Netdisk (link in https://github.com/NJUNLP/MORE's README),
    which needs a manual download. Put into the manual-download folder (`manual_dir`), as the
    public loader lays it out:
      txt/train.txt, txt/valid.txt, txt/test.txt     one Python dict literal per line
      rel2id.json                                    {relation: id}
      ent_train_dict.pth, ent_valid_dict.pth, ...    object boxes (needed only when the lines'
                                                     tails carry no 'box'; read with torch)
      img_org/train/, img_org/valid/, img_org/test/  the images, UUID file names
    Missing images are allowed (black image, has_image=False, counted in the metadata).
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=builder_lib.features(self.builder_config.image_size),
            homepage="https://github.com/NJUNLP/MORE",
            metadata=tfds.core.MetadataDict(),
            # File order: example i of a split is the i-th kept line.
            disable_shuffling=True,
            citation="""@inproceedings{he2023more,
  title={MORE: A Multimodal Object-Entity Relation Extraction Dataset with a Benchmark
         Evaluation},
  author={He, Liang and Wang, Hongke and Cao, Yongchang and Wu, Zhen and Zhang, Jianbing and
          Dai, Xinyu},
  booktitle={ACM MM}, year={2023}}""",
        )

    @classmethod
    def _input_paths(cls, root: Path, config: builder_lib.RocDataConfig
                     ) -> tuple[list[Path], list[Path]]:
        files = [root / "txt" / f"{split}.txt" for split in more.SPLITS]
        files += [root / f"ent_{split}_dict.pth" for split in more.SPLITS]
        return files, [root / "img_org" / split for split in more.SPLITS]

    def _read(self, root: Path, split: str, rel2id: dict[str, int], strict: bool) -> ReadResult:
        objects_path = root / f"ent_{split}_dict.pth"
        objects = more.load_object_dict(objects_path) if objects_path.exists() else None
        return more.read_more(root / "txt" / f"{split}.txt", rel2id, root / "img_org" / split,
                              strict, objects=objects, allow_missing_images=True)
