"""Readers of the raw MNRE and MORE files: good lines, every kind of bad line in both modes."""

import ast
import collections
import json
import re

import pytest
from fixtures import MNRE_FIXTURE_REL2ID, write_mnre_fixture, write_more_fixture

from roc_jax.data import mnre, more
from roc_jax.data.reading import SKIP_REASONS, DataError, names_match
from roc_jax.data.records import load_rel2id


@pytest.fixture
def mnre_root(tmp_path):
    return write_mnre_fixture(tmp_path / "mnre")


def _lines(path):
    return path.read_text().splitlines()


def _rewrite(path, index, new_line):
    lines = _lines(path)
    lines[index] = new_line
    path.write_text("\n".join(lines) + "\n")


def test_fixture_reads_completely(mnre_root):
    result = mnre.read_mnre_split(mnre_root, "train")
    assert result.num_lines == 40 and len(result.samples) == 40
    assert sum(result.skipped.values()) == 0
    # Every third sample of the fixture has no image file.
    assert result.missing_images == 13
    assert sum(s.image_path is None for s in result.samples) == 13
    first = ast.literal_eval(_lines(mnre_root / "mnre_train.txt")[0])
    sample = result.samples[0]
    assert sample.tokens == tuple(first["token"])
    assert sample.head.span == tuple(first["h"]["pos"]) and sample.head.name == first["h"]["name"]
    assert sample.tail.span == tuple(first["t"]["pos"]) and sample.tail.box is None
    assert sample.relation == first["relation"] and sample.img_id == first["img_id"]
    assert sample.image_path == str(mnre_root / "img_org" / "train" / first["img_id"])
    assert sample.source == "mnre_train.txt:1"
    assert set(result.summary()["skipped"]) == set(SKIP_REASONS)


# (case, line rewrite, skip reason, field named in the error)
def _bad_cases():
    def edit(key, value):
        def fn(record):
            record = dict(record)
            record[key] = value
            return repr(record)
        return fn

    def edit_entity(key, field, value):
        def fn(record):
            record = dict(record)
            record[key] = {**record[key], field: value}
            return repr(record)
        return fn

    def drop(key):
        def fn(record):
            return repr({k: v for k, v in record.items() if k != key})
        return fn

    return [
        ("not_a_literal", lambda r: repr(r)[:-5], "malformed_line", "<line>"),
        ("not_a_dict", lambda r: repr([r]), "malformed_line", "<line>"),
        ("json_not_python", lambda r: json.dumps(r).replace('"h"', 'h'), "malformed_line",
         "<line>"),
        ("missing_head", drop("h"), "bad_field", "h"),
        ("token_not_list", edit("token", "a b c"), "bad_field", "token"),
        ("pos_not_ints", edit_entity("h", "pos", [0.0, 1.0]), "bad_field", "h.pos"),
        ("span_past_end", edit_entity("t", "pos", [3, 99]), "span_out_of_range", "t.pos"),
        ("span_empty", edit_entity("h", "pos", [2, 2]), "span_out_of_range", "h.pos"),
        ("span_negative", edit_entity("h", "pos", [-1, 2]), "span_out_of_range", "h.pos"),
        ("name_mismatch", edit_entity("h", "name", "Somebody Else"), "span_name_mismatch",
         "h.pos"),
        ("unknown_label", edit("relation", "/per/per/enemy"), "unknown_label", "relation"),
        ("img_id_path", edit("img_id", "../secret.jpg"), "bad_field", "img_id"),
    ]


@pytest.mark.parametrize("case,rewrite,reason,field", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_line_default_skips_and_counts(mnre_root, case, rewrite, reason, field):
    path = mnre_root / "mnre_train.txt"
    record = ast.literal_eval(_lines(path)[4])
    _rewrite(path, 4, rewrite(record))
    result = mnre.read_mnre_split(mnre_root, "train")
    assert result.skipped == collections.Counter({reason: 1})
    assert len(result.samples) == 39 and result.num_lines == 40
    assert "mnre_train.txt:5" not in {s.source for s in result.samples}


@pytest.mark.parametrize("case,rewrite,reason,field", _bad_cases(),
                         ids=[c[0] for c in _bad_cases()])
def test_bad_line_strict_raises_with_file_line_field(mnre_root, case, rewrite, reason, field):
    path = mnre_root / "mnre_train.txt"
    record = ast.literal_eval(_lines(path)[4])
    _rewrite(path, 4, rewrite(record))
    with pytest.raises(DataError) as info:
        mnre.read_mnre_split(mnre_root, "train", strict=True, allow_missing_images=True)
    error = info.value
    assert (error.file, error.line, error.field, error.kind) == (str(path), 5, field, reason)
    assert str(error).startswith(f"{path}:5: field '{field}': ")


@pytest.mark.parametrize("content", [b"not a jpeg", "truncated"], ids=["garbage", "truncated"])
def test_unreadable_image_keeps_its_sample(mnre_root, content):
    path = mnre_root / "mnre_train.txt"
    record = ast.literal_eval(_lines(path)[0])
    image = mnre_root / "img_org" / "train" / record["img_id"]
    if content == "truncated":  # a JPEG cut short: its header is fine, its pixels are not
        content = image.read_bytes()[: image.stat().st_size // 2]
    image.write_bytes(content)
    result = mnre.read_mnre_split(mnre_root, "train")
    # The sample stays (text intact), its image is masked and counted apart from missing ones.
    assert sum(result.skipped.values()) == 0 and len(result.samples) == 40
    first = result.samples[0]
    assert first.source == "mnre_train.txt:1" and first.image_path is None
    assert result.unreadable_images == 1 and result.missing_images == 13
    assert result.summary()["unreadable_image"] == 1
    assert sum(s.image_path is None for s in result.samples) == 14
    with pytest.raises(DataError, match=r"mnre_train.txt:1: field 'img_id': image .* unreadable "
                                        r"\(.*\) \[unreadable_image\]"):
        mnre.read_mnre_split(mnre_root, "train", strict=True)
    assert len(mnre.read_mnre_split(mnre_root, "train", strict=True,
                                    allow_missing_images=True).samples) == 40


def test_missing_image_is_counted_not_skipped(mnre_root):
    result = mnre.read_mnre_split(mnre_root, "val")
    assert sum(result.skipped.values()) == 0 and len(result.samples) == 16
    assert result.missing_images == 5
    # Strict mode wants every image unless told otherwise; the third line is the first without.
    with pytest.raises(DataError, match=r"mnre_val.txt:3: field 'img_id': image fixture_102.jpg "
                                        r"not found \[missing_image\]"):
        mnre.read_mnre_split(mnre_root, "val", strict=True)
    assert len(mnre.read_mnre_split(mnre_root, "val", strict=True,
                                    allow_missing_images=True).samples) == 16
    no_images = mnre.read_mnre(mnre_root / "mnre_val.txt", MNRE_FIXTURE_REL2ID, None)
    assert no_images.missing_images == 16


def test_blank_lines_are_not_records(mnre_root):
    path = mnre_root / "mnre_val.txt"
    path.write_text(path.read_text().replace("\n", "\n\n", 3) + "\n  \n")
    result = mnre.read_mnre_split(mnre_root, "val")
    assert result.num_lines == 16 and len(result.samples) == 16
    # Line numbers stay those of the file.
    assert result.samples[3].source == "mnre_val.txt:7"


def test_upstream_val_file_name_with_space(mnre_root):
    (mnre_root / "mnre_val.txt").rename(mnre_root / "mnre_val .txt")
    assert len(mnre.read_mnre_split(mnre_root, "val").samples) == 16


def test_label_file_argument_mnre1_style(mnre_root, tmp_path):
    # MNRE-1 has its own label file in the same format; the label set comes from it.
    labels = tmp_path / "mnre1_rel2id.json"
    labels.write_text(json.dumps({"None": 0, "/per/per/couple": 1}))
    (mnre_root / "mnre_train.txt").rename(mnre_root / "mnre_org_train.txt")
    result = mnre.read_mnre_split(mnre_root, "train", label_file=labels, prefix="mnre_org_")
    assert result.samples[0].source == "mnre_org_train.txt:1"
    kept = collections.Counter(s.relation for s in result.samples)
    assert set(kept) == {"None", "/per/per/couple"}
    assert result.skipped == collections.Counter({"unknown_label": 40 - sum(kept.values())})


def test_missing_file_and_unknown_split(mnre_root):
    with pytest.raises(FileNotFoundError, match="mnre_nope.txt"):
        mnre.read_mnre(mnre_root / "mnre_nope.txt", MNRE_FIXTURE_REL2ID, None)
    with pytest.raises(ValueError, match="unknown MNRE split 'dev'"):
        mnre.read_mnre_split(mnre_root, "dev")


@pytest.mark.parametrize("span_text,name,ok", [
    ("Rafael Nadal", "Rafael Nadal", True),
    ("Rafael Nadal", "rafael  nadal", True),
    ("Nadal 's", "Nadal's", True),
    ("@shyamagolden", "shyamagolden", True),
    ("# GirlPower", "GirlPower", True),
    # Seen in MNRE-1's public mnre_org_val.txt: names typed without the tokenizer's spaces.
    ("K.F. , oil", "K.F.,oil", True),
    ("MALEC # SaveShadowhunters", "MALEC#SaveShadowhunters", True),
    ("Louis C.K .", "Louis C.K.", True),
    ("Rafael Nadal", "Rafael", False),
    ("RT @FarmingPhotos", "FarmingPhotos", False),
])
def test_names_match(span_text, name, ok):
    assert names_match(span_text, name) is ok


# ----------------------------------------------------------------------------------------- MORE


def test_more_fixture_and_box_convention(tmp_path):
    root = write_more_fixture(tmp_path / "more")
    result = more.read_more_split(root, "train")
    assert len(result.samples) == 6 and sum(result.skipped.values()) == 0
    assert result.missing_images == 3
    sample = result.samples[1]
    # (cx, cy, w, h) = (0.5, 0.5, 0.2, 0.4) -> corners.
    assert sample.tail.span is None
    assert sample.tail.box == pytest.approx((0.4, 0.3, 0.6, 0.7))
    assert sample.head.span == (0, 2) and sample.head.name == "Mery Perello"
    assert sample.relation == "/per/loc/place_of_residence"
    assert result.samples[0].image_path.endswith("img_org/train/" + result.samples[0].img_id)
    assert len(more.read_more_split(root, "valid").samples) == 3


def test_more_box_clipping_and_rejection():
    assert more.yolo_to_corners([0.05, 0.5, 0.2, 0.2]) == pytest.approx((0.0, 0.4, 0.15, 0.6))
    for bad in ([0.5, 0.5, 0.0, 0.2], [1.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1], "box",
                [0.5, float("nan"), 0.1, 0.1], [True, 0.5, 0.1, 0.1]):
        with pytest.raises(ValueError):
            more.yolo_to_corners(bad)


@pytest.mark.parametrize("strict", [False, True])
def test_more_bad_lines(tmp_path, strict):
    root = write_more_fixture(tmp_path / "more")
    path = root / "txt" / "train.txt"
    lines = _lines(path)
    r1 = ast.literal_eval(lines[1])
    r1["t"]["box"] = [0.5, 0.5, -0.1, 0.2]
    r2 = ast.literal_eval(lines[2])
    r2["relation"] = "/loc/loc/contain"
    lines[1], lines[2] = repr(r1), repr(r2)
    lines[3] = "{'token': ["
    path.write_text("\n".join(lines) + "\n")
    if strict:
        with pytest.raises(DataError, match=r"train.txt:2: field 't.box': .*\[bad_box\]"):
            more.read_more_split(root, "train", strict=True, allow_missing_images=True)
    else:
        result = more.read_more_split(root, "train")
        assert result.skipped == collections.Counter(
            {"bad_box": 1, "unknown_label": 1, "malformed_line": 1})
        assert [s.source for s in result.samples] == ["train.txt:1", "train.txt:5", "train.txt:6"]


def test_more_boxes_from_object_dict(tmp_path):
    torch = pytest.importorskip("torch")
    root = write_more_fixture(tmp_path / "more")
    path = root / "txt" / "valid.txt"
    records = [ast.literal_eval(line) for line in _lines(path)]
    objects = {}
    for r in records:
        objects.setdefault(r["img_id"], {})[r["t"]["name"]] = tuple(r["t"].pop("box"))
    path.write_text("\n".join(repr(r) for r in records) + "\n")
    with pytest.raises(DataError, match=r"valid.txt:1: field 't.box': missing"):
        more.read_more_split(root, "valid", strict=True, allow_missing_images=True)
    torch.save(objects, root / "ent_valid_dict.pth")
    result = more.read_more_split(root, "valid")
    assert len(result.samples) == 3
    assert result.samples[0].tail.box == pytest.approx((0.15, 0.3, 0.35, 0.7))


# ------------------------------------------------------------------------------------ real data

_RELATION = re.compile(r"'relation':\s*'([^']*)'")


@pytest.mark.parametrize("split,expected", [("train", 12247), ("val", 1624)])
def test_real_mnre_parses_completely(mnre_dir, split, expected):
    result = mnre.read_mnre_split(mnre_dir, split, strict=True, allow_missing_images=True)
    assert result.num_lines == expected and len(result.samples) == expected
    assert sum(result.skipped.values()) == 0
    raw = (mnre_dir / f"mnre_{split}.txt").read_text().splitlines()
    # Independent count: a regex over the raw text, not the parser.
    regex_counts = collections.Counter(_RELATION.findall(line)[-1] for line in raw if line.strip())
    assert collections.Counter(s.relation for s in result.samples) == regex_counts
    assert set(regex_counts) <= set(load_rel2id(mnre_dir / "ours_rel2id.json"))
    images = {p.name for p in (mnre_dir / "img_org" / split).glob("*.jpg")}
    assert result.missing_images == sum(s.img_id not in images for s in result.samples)
    assert all((s.image_path is None) == (s.img_id not in images) for s in result.samples)


def test_skips_are_logged_with_counts(mnre_root, caplog):
    path = mnre_root / "mnre_val.txt"
    lines = _lines(path)
    lines[0] = lines[0].replace("'relation': '", "'relation': 'x")
    lines[1] = "garbage"
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level("INFO", logger="roc_jax.data.reading"):
        mnre.read_mnre_split(mnre_root, "val")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"skipping {path}:1: field 'relation'") for m in messages)
    assert any(m.startswith(f"skipping {path}:2: field '<line>'") for m in messages)
    assert (f"read {path}: 16 lines, 14 samples, 5 missing images, 0 unreadable images "
            "(masked), skipped {'unknown_label': 1, 'malformed_line': 1}") in messages
