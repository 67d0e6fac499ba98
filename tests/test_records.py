import json

import pytest

from roc_jax.data.records import id2rel, load_rel2id


def test_load_rel2id_orders_names_by_id(tmp_path):
    path = tmp_path / "rel2id.json"
    path.write_text(json.dumps({"None": 0, "/per/per/couple": 2, "/per/loc/place_of_residence": 1}))
    rel2id = load_rel2id(path)
    assert id2rel(rel2id) == ["None", "/per/loc/place_of_residence", "/per/per/couple"]


def test_load_rel2id_rejects_gaps_and_bad_json(tmp_path):
    gaps = tmp_path / "gaps.json"
    gaps.write_text(json.dumps({"None": 0, "x": 2}))
    with pytest.raises(ValueError, match="gaps.json"):
        load_rel2id(gaps)
    bad = tmp_path / "bad.json"
    bad.write_text("{'None': 0}")
    with pytest.raises(ValueError, match="bad.json:1"):
        load_rel2id(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_rel2id(tmp_path / "missing.json")


def test_real_label_file(mnre_dir):
    names = id2rel(load_rel2id(mnre_dir / "ours_rel2id.json"))
    assert len(names) == 23 and "None" in names
