"""TFDS builders: build from raw files and read back with tfds.data_source, without TensorFlow."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from fixtures import (
    MNRE_FIXTURE_REL2ID,
    MORE_FIXTURE_REL2ID,
    write_mnre_fixture,
    write_more_fixture,
)

from roc_jax.data import mnre
from roc_jax.data.reading import DataError
from roc_jax.data.records import id2rel
from roc_jax.data.tfds import builder_lib
from roc_jax.data.tfds.mnre import Builder as MnreBuilder
from roc_jax.data.tfds.more import Builder as MoreBuilder


def _config(name, **kwargs):
    return builder_lib.RocDataConfig(name=name, **{"image_size": 32, **kwargs})


@pytest.fixture(scope="module")
def built_mnre(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnre")
    raw = write_mnre_fixture(root / "raw")
    # One bad line, to see it counted in the metadata.
    path = raw / "mnre_train.txt"
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace("'relation': '", "'relation': 'x")
    path.write_text("\n".join(lines) + "\n")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROC_CACHE_DIR", str(cache))
        builder = builder_lib.build(MnreBuilder, raw, root / "tfds", _config("t32"))
    return raw, root / "tfds", builder


def test_build_needs_no_tensorflow(built_mnre):
    assert "tensorflow" not in sys.modules


_BLOCKED_TF_BUILD = """
import sys


class HideTensorFlow:
    # Wraps every import finder so that TensorFlow looks not installed, even where it is.
    # (Not sys.modules["tensorflow"] = None: TFDS reads `"tensorflow" in sys.modules`.)
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [HideTensorFlow(finder) for finder in sys.meta_path]
import importlib.util
assert importlib.util.find_spec("tensorflow") is None
sys.path.insert(0, {tests!r})
import tensorflow_datasets as tfds
from fixtures import write_mnre_fixture
from roc_jax.data.tfds import builder_lib
from roc_jax.data.tfds.mnre import Builder
raw = write_mnre_fixture({raw!r})
config = builder_lib.RocDataConfig(name="t16", image_size=16, entity_types="none")
builder_lib.build(Builder, raw, {data!r}, config)
source = tfds.data_source("mnre/t16", split="validation", data_dir={data!r})
print("read", len(source), source[0]["image"].shape, "tensorflow" in sys.modules)
"""


def test_build_and_read_with_tensorflow_blocked(tmp_path):
    # Even where TensorFlow is installed, the build and the read must not import it.
    code = _BLOCKED_TF_BUILD.format(tests=str(Path(__file__).parent), raw=str(tmp_path / "raw"),
                                    data=str(tmp_path / "tfds"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read 16 (16, 16, 3) False" in done.stdout


def test_mnre_reads_back_like_the_reader(built_mnre):
    raw, data_dir, builder = built_mnre
    assert builder.info.file_format.value == "array_record"
    assert builder.info.features["relation"].names == id2rel(MNRE_FIXTURE_REL2ID)
    expected = mnre.read_mnre_split(raw, "train").samples
    source = tfds.data_source("mnre/t32", split="train", data_dir=data_dir)
    assert len(source) == len(expected) == 39
    for i in (0, 1, 2, 10, 38):
        example, sample = source[i], expected[i]
        assert example["source"].decode() == sample.source
        assert [t.decode() for t in example["tokens"]] == list(sample.tokens)
        assert example["head"]["name"].decode() == sample.head.name
        assert example["head"]["span"].tolist() == list(sample.head.span)
        assert example["tail"]["span"].tolist() == list(sample.tail.span)
        assert example["tail"]["box"].tolist() == [0, 0, 0, 0]
        assert not example["tail"]["is_object"]
        assert example["head"]["type"].decode() in ("person", "organization", "location",
                                                    "group", "entity", "work", "product")
        assert example["relation"] == MNRE_FIXTURE_REL2ID[sample.relation]
        assert example["img_id"].decode() == sample.img_id
        image = example["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert bool(example["has_image"]) == (sample.image_path is not None)
        if sample.image_path is None:
            assert not image.any()  # black, exactly
        else:
            assert image.mean() > 20
    # The fixture's people are typed as people by spaCy.
    people = [source[i]["head"]["type"] for i in range(len(source))
              if expected[i].relation == "/per/per/couple"]
    assert people.count(b"person") >= len(people) // 2


def test_metadata_counts_skips_and_missing_images(built_mnre):
    _, data_dir, _ = built_mnre
    # A read-only builder from the files alone restores the labels and the report.
    builder = tfds.builder_from_directory(str(data_dir / "mnre" / "t32" / "1.0.0"))
    assert builder.info.features["relation"].names == id2rel(MNRE_FIXTURE_REL2ID)
    report = builder.info.metadata
    assert report["entity_types"].startswith("spacy:en_core_web_sm")
    train = report["splits"]["train"]
    assert (train["lines"], train["samples"]) == (40, 39)
    assert train["skipped"]["unknown_label"] == 1 and sum(train["skipped"].values()) == 1
    assert train["missing_images"] == 13
    assert report["splits"]["validation"]["missing_images"] == 5
    assert builder.info.splits["validation"].num_examples == 16
    assert builder.info.splits["test"].num_examples == 10
    assert report["absent_splits"] == []


def test_strict_build_raises_with_line(built_mnre, tmp_path):
    raw, _, _ = built_mnre
    with pytest.raises(DataError, match=r"mnre_train.txt:2: field 'relation'"):
        builder_lib.build(MnreBuilder, raw, tmp_path, _config("strict", strict=True,
                                                               entity_types="none"))


def test_missing_files_name_the_manual_step(tmp_path):
    # No manual folder at all: TFDS prints the builder's instructions.
    with pytest.raises(AssertionError, match=r"(?s)Manual directory .*python -m "
                                             r"roc_jax.data.download"):
        builder_lib.build(MnreBuilder, tmp_path / "absent", tmp_path / "tfds",
                          _config("x", entity_types="none"))
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "mnre_train.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"ours_rel2id.json not found: put the raw files"):
        builder_lib.build(MnreBuilder, partial, tmp_path / "tfds",
                          _config("x", entity_types="none"))


def test_more_build_has_object_tails(tmp_path):
    raw = write_more_fixture(tmp_path / "raw")
    builder_lib.build(MoreBuilder, raw, tmp_path / "tfds", _config("t32", entity_types="none"))
    source = tfds.data_source("more/t32", split="train", data_dir=tmp_path / "tfds")
    assert len(source) == 6
    lines = (raw / "txt" / "train.txt").read_text().splitlines()
    for i, line in enumerate(lines):
        record, example = ast.literal_eval(line), source[i]
        tail = example["tail"]
        assert tail["is_object"] and tail["span"].tolist() == [-1, -1]
        cx, cy, w, h = record["t"]["box"]
        np.testing.assert_allclose(tail["box"], [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                                   atol=1e-6)
        assert tail["name"].decode() == record["t"]["name"]
        assert example["head"]["type"] == b"" and tail["type"] == b""
        assert example["relation"] == MORE_FIXTURE_REL2ID[record["relation"]]
        assert bool(example["has_image"]) == (i % 2 == 0)
    valid = tfds.data_source("more/t32", split="validation", data_dir=tmp_path / "tfds")
    assert len(valid) == 3


def test_real_mnre_builds_offline(mnre_dir, tmp_path):
    """Both real splits build (64px images, spaCy types from the on-disk cache) and read back."""
    builder = builder_lib.build(MnreBuilder, mnre_dir, tmp_path, "mnre2_64")
    report = builder.info.metadata["splits"]
    assert set(report) == {"train", "validation"}  # the test file is held out here
    assert builder.info.metadata["absent_splits"] == ["test"]
    for split, expected in (("train", 12247), ("validation", 1624)):
        assert report[split]["samples"] == expected
        assert sum(report[split]["skipped"].values()) == 0
        source = tfds.data_source("mnre/mnre2_64", split=split, data_dir=tmp_path)
        assert len(source) == expected
        images = {p.name for p in (mnre_dir / "img_org" / mnre.SPLITS[
            ("train", "validation").index(split)]).glob("*.jpg")}
        first_with_image = next(i for i in range(expected)
                                if source[i]["img_id"].decode() in images)
        assert source[first_with_image]["has_image"]
        assert source[first_with_image]["image"].shape == (64, 64, 3)
    raw_labels = json.loads((mnre_dir / "ours_rel2id.json").read_text())
    assert builder.info.features["relation"].names == id2rel(raw_labels)
    assert "tensorflow" not in sys.modules


# ------------------------------------------------------------------------- builds keyed by input


def _tfds_config(raw, tfds_dir):
    from roc_testutil import load_config

    config = load_config("tiny", "text")
    config.data.raw_dir = str(raw)
    config.data.source = "tfds"
    config.data.tfds_dir = str(tfds_dir)
    return config


def _subset(full, directory, n_train):
    """A copy of the raw folder ``full`` whose train file holds its first ``n_train`` lines."""
    import shutil

    shutil.copytree(full, directory)
    path = directory / "mnre_train.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:n_train]) + "\n")
    return directory


def test_build_follows_its_input_and_reuses_identical_input(tmp_path, monkeypatch):
    from roc_jax.data import sources

    full = write_mnre_fixture(tmp_path / "full")
    tenth = _subset(full, tmp_path / "tenth", 4)
    tfds_dir = tmp_path / "tfds"
    # 10 % first, then the full folder, into the same tfds_dir: each gets its own build.
    assert len(sources.load_sources(_tfds_config(tenth, tfds_dir), ["train"])["train"]) == 4
    source = sources.load_sources(_tfds_config(full, tfds_dir), ["train"])["train"]
    assert len(source) == 40
    builds = sorted(p.name for p in (tfds_dir / "mnre").glob("mnre_*"))
    fingerprints = [sources.data_fingerprint(_tfds_config(raw, tfds_dir))
                    for raw in (tenth, full)]
    assert builds == sorted(f"mnre_s32_none_{f['sha256'][:12]}" for f in fingerprints)
    fingerprint = fingerprints[1]
    assert set(fingerprint["files"]) == {"ours_rel2id.json", "mnre_train.txt", "mnre_val.txt",
                                         "mnre_test.txt"}
    assert fingerprint["images"]["img_org/train"]["files"] == 27
    # Identical input: the build is found, nothing is generated again.
    def no_rebuild(self, dl_manager):
        raise AssertionError("rebuilt although the input is the same")

    monkeypatch.setattr(MnreBuilder, "_split_generators", no_rebuild)
    again = sources.load_sources(_tfds_config(full, tfds_dir), ["train"])["train"]
    assert len(again) == 40
    builder = tfds.builder_from_directory(
        str(tfds_dir / "mnre" / f"mnre_s32_none_{fingerprint['sha256'][:12]}" / "1.0.0"))
    assert builder.info.metadata["input_fingerprint"] == fingerprint


def test_images_added_later_reach_a_new_build(tmp_path):
    import shutil

    from roc_jax.data import sources

    raw = write_mnre_fixture(tmp_path / "raw")
    shutil.move(raw / "img_org", tmp_path / "images_later")
    tfds_dir = tmp_path / "tfds"
    source = sources.load_sources(_tfds_config(raw, tfds_dir), ["train"])["train"]
    assert not any(source[i]["has_image"] for i in range(len(source)))
    shutil.move(tmp_path / "images_later", raw / "img_org")
    source = sources.load_sources(_tfds_config(raw, tfds_dir), ["train"])["train"]
    assert sum(bool(source[i]["has_image"]) for i in range(len(source))) == 27


def test_named_build_of_other_input_is_one_line_error(tmp_path):
    raw = write_mnre_fixture(tmp_path / "raw")
    config = _config("fixed", entity_types="none")
    builder_lib.build(MnreBuilder, raw, tmp_path / "tfds", config)
    path = raw / "mnre_train.txt"
    path.write_text(path.read_text() + path.read_text().splitlines()[0] + "\n")
    with pytest.raises(builder_lib.InputMismatchError) as info:
        builder_lib.build(MnreBuilder, raw, tmp_path / "tfds", config)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'tfds' / 'mnre' / 'fixed' / '1.0.0'} was built from "
                              f"other raw files than {raw} (mnre_train.txt changed (sha256 ")
    assert message.endswith("delete " + str(tmp_path / "tfds" / "mnre" / "fixed" / "1.0.0") +
                            " to rebuild it, or build into another data_dir")


def test_real_mnre_tenth_then_full(mnre_dir, tmp_path):
    """The real MNRE-2 train file: 10 % of it (1,224 lines) built first, then all 12,247 lines
    into the same tfds_dir (text only: the folders hold no images)."""
    from roc_jax.data import sources

    tenth, full = tmp_path / "tenth", tmp_path / "full"
    for folder in (tenth, full):
        folder.mkdir()
        for name in ("ours_rel2id.json", "mnre_val.txt"):
            (folder / name).symlink_to(mnre_dir / name)
    (full / "mnre_train.txt").symlink_to(mnre_dir / "mnre_train.txt")
    lines = (mnre_dir / "mnre_train.txt").read_text().splitlines()
    (tenth / "mnre_train.txt").write_text("\n".join(lines[: len(lines) // 10]) + "\n")
    tfds_dir = tmp_path / "tfds"
    for folder, expected in ((tenth, 1224), (full, 12247)):
        config = _tfds_config(folder, tfds_dir)
        config.data.image_size = 16
        assert len(sources.load_sources(config, ["train"])["train"]) == expected


def test_unreadable_image_keeps_its_sample(tmp_path):
    raw = write_mnre_fixture(tmp_path / "raw")
    first = ast.literal_eval((raw / "mnre_train.txt").read_text().splitlines()[0])
    (raw / "img_org" / "train" / first["img_id"]).write_bytes(b"not a jpeg")
    builder = builder_lib.build(MnreBuilder, raw, tmp_path / "tfds",
                                _config("t32", entity_types="none"))
    train = builder.info.metadata["splits"]["train"]
    assert (train["samples"], train["unreadable_image"], train["missing_images"]) == (40, 1, 13)
    example = tfds.data_source("mnre/t32", split="train", data_dir=tmp_path / "tfds")[0]
    assert example["source"] == b"mnre_train.txt:1"
    assert not example["has_image"] and not example["image"].any()
