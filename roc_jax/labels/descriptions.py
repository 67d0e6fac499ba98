"""Relation descriptions: K natural-language sentences per relation label, read from a JSON file.

File format (the shipped MNRE-2 file is ``roc_jax/labels/data/mnre_descriptions.json``)::

    {"meta": {"written_by": ..., "backend": ..., "prompt": ..., ...},
     "relations": {"<relation name>": {"descriptions": ["...", ...],
                                       "review": "what the data means by the label",
                                       "prompt": "...", "raw_reply": "..."}}}

Only ``relations.<name>.descriptions`` is read by training; the rest documents where the texts came
from so that a person can review them (``python -m roc_jax.labels show <file>``). Every error names
the file, the line and the field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

MNRE_DESCRIPTIONS = "mnre_descriptions.json"


class DescriptionsError(ValueError):
    """A descriptions file or label set that cannot be used as it is."""


@dataclasses.dataclass
class RelationEntry:
    """The descriptions of one relation plus the record of where they came from."""

    descriptions: list[str]
    review: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # prompt, raw_reply, ...

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"descriptions": list(self.descriptions)}
        if self.review:
            out["review"] = self.review
        out.update(self.extra)
        return out


@dataclasses.dataclass
class DescriptionsFile:
    """A whole descriptions file: ``meta`` and the relations in file order."""

    meta: dict[str, Any]
    relations: dict[str, RelationEntry]

    def texts(self) -> dict[str, list[str]]:
        """``{relation: [K descriptions]}``."""
        return {name: list(e.descriptions) for name, e in self.relations.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": dict(self.meta),
            "relations": {n: e.to_json() for n, e in self.relations.items()},
        }


def default_mnre_path() -> Path:
    """Path of the shipped MNRE-2 descriptions file (inside the installed package)."""
    return Path(str(resources.files("roc_jax.labels").joinpath("data", MNRE_DESCRIPTIONS)))


def _line_of(text: str, key: str, start: int = 0) -> int:
    """1-based line of the first ``"key":`` at or after ``start`` (0 when not found)."""
    needle = json.dumps(key, ensure_ascii=False) + ":"
    at = text.find(needle, start)
    if at < 0:
        needle = json.dumps(key) + ":"
        at = text.find(needle, start)
    return text.count("\n", 0, at) + 1 if at >= 0 else 0


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def check_names(rel_names: Sequence[str], source: str = "label set") -> list[str]:
    """Validates a label set: non-empty strings, no duplicates. Returns it as a list."""
    names = list(rel_names)
    if not names:
        raise DescriptionsError(f"{source}: the label set is empty")
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise DescriptionsError(f"{source}: relation #{i} has an empty or non-string name {name!r}")
        if name in seen:
            raise DescriptionsError(f"{source}: duplicate relation name {name!r}")
        seen.add(name)
    return names


def read_descriptions_file(path: str | Path) -> DescriptionsFile:
    """Reads and validates the structure of a descriptions file (not against a label set).

    Raises ``DescriptionsError`` naming file, line and field for: invalid JSON, duplicate relation
    names (duplicate JSON keys), a relation without descriptions, empty or non-string descriptions,
    duplicate descriptions within a relation.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"descriptions file not found: {path}") from None
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DescriptionsError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except _DuplicateKey as e:
        raise DescriptionsError(
            f"{path}:{_line_of(text, e.key, text.find(json.dumps(e.key)) + 1)}: "
            f"duplicate key {e.key!r} (a relation or field is given twice)"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("relations"), dict):
        raise DescriptionsError(
            f"{path}:1: expected a JSON object with a 'relations' object "
            '({"meta": {...}, "relations": {"<name>": {"descriptions": [...]}}})'
        )
    meta = data.get("meta", {})
    if not isinstance(meta, dict):
        raise DescriptionsError(f"{path}:{_line_of(text, 'meta')}: field 'meta' must be an object")
    rel_start = text.find('"relations"')
    relations: dict[str, RelationEntry] = {}
    for name, entry in data["relations"].items():
        line = _line_of(text, name, rel_start)
        where = f"{path}:{line}: relation {name!r}"
        if not name.strip():
            raise DescriptionsError(f"{path}:{line}: empty relation name")
        if not isinstance(entry, dict) or "descriptions" not in entry:
            raise DescriptionsError(f"{where}: missing field 'descriptions'")
        descs = entry["descriptions"]
        if not isinstance(descs, list) or not descs:
            raise DescriptionsError(f"{where}: field 'descriptions' must be a non-empty list of strings")
        for i, d in enumerate(descs):
            if not isinstance(d, str) or not d.strip():
                raise DescriptionsError(
                    f"{where}: field 'descriptions'[{i}] must be a non-empty string, got {d!r}"
                )
        stripped = [d.strip() for d in descs]
        if len(set(stripped)) != len(stripped):
            dup = next(d for d in stripped if stripped.count(d) > 1)
            raise DescriptionsError(f"{where}: field 'descriptions' repeats {dup!r}")
        review = entry.get("review", "")
        if not isinstance(review, str):
            raise DescriptionsError(f"{where}: field 'review' must be a string")
        extra = {k: v for k, v in entry.items() if k not in ("descriptions", "review")}
        relations[name] = RelationEntry(stripped, review, extra)
    if not relations:
        raise DescriptionsError(f"{path}:{_line_of(text, 'relations')}: 'relations' is empty")
    return DescriptionsFile(meta=meta, relations=relations)


def validate_against(
    dfile: DescriptionsFile, rel_names: Sequence[str], source: str = "descriptions"
) -> None:
    """Checks that ``dfile`` covers exactly ``rel_names``: no missing, no unknown relation."""
    names = check_names(rel_names)
    missing = [n for n in names if n not in dfile.relations]
    unknown = [n for n in dfile.relations if n not in set(names)]
    if missing:
        raise DescriptionsError(f"{source}: no descriptions for relation(s) {missing}")
    if unknown:
        raise DescriptionsError(
            f"{source}: relation(s) {unknown} are not in the label set ({len(names)} labels)"
        )


def load_descriptions(
    path: str | Path | None = None, rel_names: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """``{relation: [K descriptions]}`` ordered as ``rel_names`` (file order when ``None``).

    ``path=None`` reads the shipped MNRE-2 file. With ``rel_names`` the file must cover exactly that
    label set (missing or unknown relations raise ``DescriptionsError``).
    """
    path = default_mnre_path() if path is None else Path(path)
    dfile = read_descriptions_file(path)
    if rel_names is None:
        return dfile.texts()
    validate_against(dfile, rel_names, source=str(path))
    return {n: list(dfile.relations[n].descriptions) for n in rel_names}


def write_descriptions_file(
    path: str | Path, dfile: DescriptionsFile, *, overwrite: bool = False
) -> Path:
    """Writes ``dfile`` atomically (temp file in the same folder + rename): all or nothing.

    Refuses to replace an existing file unless ``overwrite`` (a reviewed file is not clobbered).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dfile.to_json(), f, indent=2, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Whatever went wrong, no partial file is left behind.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def format_for_review(dfile: DescriptionsFile, only: Iterable[str] | None = None) -> str:
    """Human-readable text of a descriptions file, relation by relation (for the ``show`` CLI)."""
    lines = []
    for key in ("written_by", "backend", "note", "model", "dataset", "k", "created", "review"):
        if key in dfile.meta:
            lines.append(f"{key}: {dfile.meta[key]}")
    if "prompt" in dfile.meta:
        lines.append(f"prompt: {dfile.meta['prompt']}")
    wanted = None if only is None else list(only)
    if wanted is not None:
        unknown = [n for n in wanted if n not in dfile.relations]
        if unknown:
            raise DescriptionsError(f"unknown relation(s) {unknown}; known: {list(dfile.relations)}")
    names = wanted if wanted is not None else list(dfile.relations)
    for i, name in enumerate(names, 1):
        entry = dfile.relations[name]
        lines.append("")
        lines.append(f"[{i}/{len(names)}] {name}  ({len(entry.descriptions)} descriptions)")
        for j, d in enumerate(entry.descriptions, 1):
            lines.append(f"  {j}. {d}")
        if entry.review:
            lines.append(f"  review: {entry.review}")
        if "backend" in entry.extra:
            lines.append(f"  backend: {entry.extra['backend']}")
    return "\n".join(lines) + "\n"


def as_mapping(descriptions: Mapping[str, Sequence[str]] | DescriptionsFile) -> dict[str, list[str]]:
    """Accepts a ``DescriptionsFile`` or a plain mapping; returns ``{name: [texts]}``."""
    if isinstance(descriptions, DescriptionsFile):
        return descriptions.texts()
    return {k: list(v) for k, v in descriptions.items()}
