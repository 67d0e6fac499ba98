"""The shipped MNRE-2 descriptions file and the descriptions file reader/writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from roc_jax.data.records import id2rel, load_rel2id
from roc_jax.labels import descriptions as D
from roc_jax.labels.__main__ import main as cli_main

# A copy of the 23 names of MNRE-2's ours_rel2id.json, in id order.
MNRE_LABELS = [
    "None", "/per/per/parent", "/per/per/siblings", "/per/per/couple", "/per/per/neighbor",
    "/per/per/peer", "/per/per/charges", "/per/per/alumi", "/per/per/alternate_names",
    "/per/org/member_of", "/per/loc/place_of_residence", "/per/loc/place_of_birth",
    "/org/org/alternate_names", "/org/org/subsidiary", "/org/loc/locate_at", "/loc/loc/contain",
    "/per/misc/present_in", "/per/misc/awarded", "/per/misc/race", "/per/misc/religion",
    "/per/misc/nationality", "/misc/misc/part_of", "/misc/loc/held_on",
]


def test_shipped_file_is_complete_for_the_23_labels():
    descs = D.load_descriptions(None, MNRE_LABELS)
    assert list(descs) == MNRE_LABELS
    for name, texts in descs.items():
        assert len(texts) == 5, name
        assert len(set(texts)) == 5, name
        for t in texts:
            assert t.strip() == t and len(t) >= 30, (name, t)
            # Every description says who the head and the tail are.
            assert "head" in t.lower() and "tail" in t.lower(), (name, t)


def test_shipped_file_records_author_prompt_and_reviews():
    dfile = D.read_descriptions_file(D.default_mnre_path())
    for key in ("written_by", "prompt", "review", "k", "dataset"):
        assert dfile.meta.get(key), key
    assert dfile.meta["k"] == 5
    for name, entry in dfile.relations.items():
        assert len(entry.review) > 80, name  # a real note on what the data means by the label
    # The data's spelling of alumni, and the None label describes the absence of a relation.
    assert "alumni" in " ".join(dfile.relations["/per/per/alumi"].descriptions)
    assert all("no " in d.lower() or "unrelated" in d.lower() or "none" in d.lower()
               or "without" in d.lower() for d in dfile.relations["None"].descriptions)


def test_shipped_file_matches_the_real_label_file(mnre_dir: Path):
    names = id2rel(load_rel2id(mnre_dir / "ours_rel2id.json"))
    assert names == MNRE_LABELS
    descs = D.load_descriptions(D.default_mnre_path(), names)
    assert list(descs) == names


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "d.json"
    p.write_text(text)
    return p


def _good(names=("a", "b")) -> dict:
    return {"meta": {}, "relations": {n: {"descriptions": [f"{n} one", f"{n} two"]}
                                      for n in names}}


def test_load_orders_by_label_set(tmp_path):
    p = _write(tmp_path, json.dumps(_good(("a", "b"))))
    assert list(D.load_descriptions(p, ["b", "a"])) == ["b", "a"]
    assert D.load_descriptions(p) == {"a": ["a one", "a two"], "b": ["b one", "b two"]}


def test_missing_and_unknown_relations(tmp_path):
    p = _write(tmp_path, json.dumps(_good(("a", "b"))))
    with pytest.raises(D.DescriptionsError, match=r"no descriptions for relation\(s\) \['c'\]"):
        D.load_descriptions(p, ["a", "b", "c"])
    with pytest.raises(D.DescriptionsError, match=r"\['b'\] are not in the label set"):
        D.load_descriptions(p, ["a"])
    with pytest.raises(D.DescriptionsError, match="duplicate relation name 'a'"):
        D.load_descriptions(p, ["a", "a", "b"])


def test_duplicate_relation_in_file_names_line(tmp_path):
    text = ('{"relations": {\n'
            '  "a": {"descriptions": ["x"]},\n'
            '  "a": {"descriptions": ["y"]}\n'
            "}}\n")
    p = _write(tmp_path, text)
    with pytest.raises(D.DescriptionsError, match=r"d\.json:3: duplicate key 'a'"):
        D.read_descriptions_file(p)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({}, "missing field 'descriptions'"),
        ({"descriptions": []}, "field 'descriptions' must be a non-empty list"),
        ({"descriptions": "x"}, "field 'descriptions' must be a non-empty list"),
        ({"descriptions": ["ok", "  "]}, r"field 'descriptions'\[1\] must be a non-empty string"),
        ({"descriptions": ["ok", 3]}, r"field 'descriptions'\[1\] must be a non-empty string"),
        ({"descriptions": ["x", "x "]}, "field 'descriptions' repeats 'x'"),
        ({"descriptions": ["x"], "review": 3}, "field 'review' must be a string"),
    ],
)
def test_bad_relation_entry_names_file_line_field(tmp_path, entry, message):
    data = {"meta": {}, "relations": {"good": {"descriptions": ["g"]}, "bad": entry}}
    p = _write(tmp_path, json.dumps(data, indent=1))
    line = next(i for i, x in enumerate(p.read_text().splitlines(), 1) if '"bad":' in x)
    with pytest.raises(D.DescriptionsError, match=rf"d\.json:{line}: relation 'bad': {message}"):
        D.read_descriptions_file(p)


def test_invalid_json_and_wrong_shape(tmp_path):
    p = _write(tmp_path, '{"relations": {\n  "a": [,]\n}}')
    with pytest.raises(D.DescriptionsError, match=r"d\.json:2: not valid JSON"):
        D.read_descriptions_file(p)
    p = _write(tmp_path, '["a", "b"]')
    with pytest.raises(D.DescriptionsError, match="'relations' object"):
        D.read_descriptions_file(p)
    with pytest.raises(FileNotFoundError, match="descriptions file not found"):
        D.read_descriptions_file(tmp_path / "nope.json")


def test_atomic_write_refuses_overwrite_and_leaves_nothing_on_failure(tmp_path):
    dfile = D.DescriptionsFile(meta={"m": 1}, relations={"a": D.RelationEntry(["x"], "ok")})
    out = tmp_path / "out.json"
    D.write_descriptions_file(out, dfile)
    assert D.read_descriptions_file(out).relations["a"].review == "ok"
    with pytest.raises(FileExistsError, match="exists"):
        D.write_descriptions_file(out, dfile)
    before = out.read_text()
    # An unserializable field fails half-way through json.dump: the old file stays intact and no
    # temp file is left behind.
    broken = D.DescriptionsFile(meta={"m": object()}, relations=dfile.relations)
    with pytest.raises(TypeError):
        D.write_descriptions_file(out, broken, overwrite=True)
    assert out.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_cli_show_prints_relation_by_relation(capsys):
    assert cli_main(["show"]) == 0
    out = capsys.readouterr().out
    assert "[1/23] None  (5 descriptions)" in out
    assert "[23/23] /misc/loc/held_on  (5 descriptions)" in out
    assert out.count("  review: ") == 23
    assert cli_main(["show", "--relation", "/per/per/alumi"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] /per/per/alumi" in out and "/per/per/peer" not in out


def test_cli_check_and_errors(tmp_path, capsys):
    labels = tmp_path / "rel2id.json"
    labels.write_text(json.dumps({n: i for i, n in enumerate(MNRE_LABELS)}))
    assert cli_main(["check", str(D.default_mnre_path()), "--labels", str(labels)]) == 0
    assert "complete for the 23 labels" in capsys.readouterr().out
    labels.write_text(json.dumps({n: i for i, n in enumerate(MNRE_LABELS + ["/per/org/founded"])}))
    assert cli_main(["check", str(D.default_mnre_path()), "--labels", str(labels)]) == 1
    assert "no descriptions for relation(s) ['/per/org/founded']" in capsys.readouterr().err
    assert cli_main(["show", "--relation", "nope"]) == 1
    assert "unknown relation(s) ['nope']" in capsys.readouterr().err
