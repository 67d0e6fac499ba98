"""Shared parsing and validation for the raw dict-per-line formats of MNRE and MORE.

Both data sets store one Python dict literal per line (single quotes: ``ast.literal_eval``, never
``eval`` and not JSON). Every check here names the file, the 1-based line number, the field and
the reason, so that ``strict`` mode can raise an error a user can act on, and the default mode can
count the skipped lines by reason (``ReadResult.skipped``) instead of dropping them silently.

Skip reasons (the keys of ``ReadResult.skipped``):

- ``malformed_line``: not a Python literal, or not a dict;
- ``bad_field``: a required field is missing or has the wrong type;
- ``span_out_of_range``: a token span ``[start, end)`` outside ``0 <= start < end <= len(tokens)``;
- ``span_name_mismatch``: the span's tokens do not spell the entity's name (see ``names_match``);
- ``bad_box``: an image-object box that is not 4 finite numbers inside the image;
- ``unknown_label``: a relation that is not in the label file.

A *missing* image is not a skip: the sample is kept with ``image_path=None`` and counted in
``ReadResult.missing_images`` (the model masks the image out). An *unreadable* image (the file
exists but does not decode) is treated the same way, counted apart in
``ReadResult.unreadable_images`` (``unreadable_image`` in the summary): one corrupt JPEG costs its
sample's image, never the sample's text. ``strict`` mode raises on both unless
``allow_missing_images=True``, because a user who asks for strictness on a full download wants to
hear about a lost or broken file.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from roc_jax.data.records import Entity, Sample

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "malformed_line",
    "bad_field",
    "span_out_of_range",
    "span_name_mismatch",
    "bad_box",
    "unknown_label",
)


class DataError(ValueError):
    """A bad line in a raw data file: ``file:line: field 'f': reason``."""

    def __init__(self, file: str | Path, line: int, field: str, reason: str, kind: str):
        self.file = str(file)
        self.line = line
        self.field = field
        self.reason = reason
        self.kind = kind  # one of SKIP_REASONS, "missing_image" or "unreadable_image"
        super().__init__(f"{file}:{line}: field '{field}': {reason} [{kind}]")


@dataclasses.dataclass
class ReadResult:
    """What a reader returns: the good samples and an account of everything else.

    ``skipped`` counts dropped lines by reason (``SKIP_REASONS``); ``missing_images`` counts kept
    samples whose image file does not exist and ``unreadable_images`` those whose file does not
    decode (both have ``Sample.image_path is None``); ``num_lines`` counts the non-blank lines
    read, so ``num_lines == len(samples) + sum(skipped.values())``.
    """

    samples: list[Sample]
    skipped: collections.Counter
    missing_images: int
    num_lines: int
    path: str = ""
    unreadable_images: int = 0

    def summary(self) -> dict[str, Any]:
        """JSON-able counts, as stored in the TFDS metadata."""
        return {
            "file": Path(self.path).name,
            "lines": self.num_lines,
            "samples": len(self.samples),
            "missing_images": self.missing_images,
            "unreadable_image": self.unreadable_images,
            "skipped": {reason: int(self.skipped.get(reason, 0)) for reason in SKIP_REASONS},
        }


def iter_dict_lines(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """Yields ``(line_number, dict)`` for each non-blank line, or a ``DataError`` to report.

    Blank lines (the usual trailing newline) carry no record and are not counted.
    """
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = ast.literal_eval(line.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                yield number, DataError(path, number, "<line>", f"not a Python literal ({e})",
                                        "malformed_line")
                continue
            if not isinstance(record, dict):
                yield number, DataError(path, number, "<line>",
                                        f"expected a dict, got {type(record).__name__}",
                                        "malformed_line")
                continue
            yield number, record


class LineChecker:
    """Field accessors that raise ``DataError`` for one line of one file."""

    def __init__(self, path: Path, line: int, record: dict):
        self.path, self.line, self.record = path, line, record

    def error(self, field: str, reason: str, kind: str) -> DataError:
        return DataError(self.path, self.line, field, reason, kind)

    def get(self, *keys: str, kind: type | tuple[type, ...]) -> Any:
        """``record[k0][k1]...`` checked against ``kind`` (a missing key is a ``bad_field``)."""
        value: Any = self.record
        for i, key in enumerate(keys):
            if not isinstance(value, dict) or key not in value:
                raise self.error(".".join(keys[: i + 1]), "missing", "bad_field")
            value = value[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(".".join(keys), f"expected {names}, got {type(value).__name__}",
                             "bad_field")
        return value

    def tokens(self, key: str = "token") -> tuple[str, ...]:
        tokens = self.get(key, kind=list)
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise self.error(key, "expected a non-empty list of str", "bad_field")
        return tuple(tokens)

    def span(self, entity: str, tokens: tuple[str, ...]) -> tuple[str, tuple[int, int]]:
        """The entity's name and its checked token span ``[start, end)``."""
        name = self.get(entity, "name", kind=str)
        pos = self.get(entity, "pos", kind=(list, tuple))
        if len(pos) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pos):
            raise self.error(f"{entity}.pos", f"expected [start, end] ints, got {pos!r}",
                             "bad_field")
        start, end = pos
        if not 0 <= start < end <= len(tokens):
            raise self.error(f"{entity}.pos", f"span [{start}, {end}) outside the "
                             f"{len(tokens)} tokens", "span_out_of_range")
        text = " ".join(tokens[start:end])
        if not names_match(text, name):
            raise self.error(f"{entity}.pos", f"span text {text!r} does not match name "
                             f"{name!r}", "span_name_mismatch")
        return name, (start, end)


_SPACE = re.compile(r"\s+")


def _normalize(text: str) -> str:
    return _SPACE.sub("", text).lower()


def names_match(span_text: str, name: str) -> bool:
    """Whether the tokens of a span (joined by spaces) spell the entity's name.

    The comparison ignores whitespace and case (tokenization splits ``"Nadal's"`` into
    ``Nadal 's``), and tolerates a leading ``#``/``@`` on either side (tweets write a hashtag or a
    mention where an annotator may have typed the bare name). On the real MNRE-2 train and val files
    all 27,742 entity names equal their span text exactly, so these tolerances reject nothing there.
    """
    a, b = _normalize(span_text), _normalize(name)
    return a == b or a.lstrip("#@") == b.lstrip("#@")


# Side of the reduced-scale decode that checks an image: JPEG decodes at 1/8 scale in the DCT
# domain (cheap), and every byte of the file is still read, so a truncated file fails too.
_CHECK_SIZE = 64


def check_image(path: Path) -> str | None:
    """``None`` when ``path`` decodes as an image, else the reason it does not.

    A full decode (at reduced scale), not ``Image.verify``: verify passes a truncated JPEG, which
    fails later when the pixels are read.
    """
    try:
        with Image.open(path) as image:
            image.draft("RGB", (_CHECK_SIZE, _CHECK_SIZE))
            image.load()
    except Exception as e:  # PIL raises many exception types for a corrupt file.
        return f"{type(e).__name__}: {e}"
    return None


def resolve_image(checker: LineChecker, image_dir: Path | None, img_id: str) -> Path | None:
    """The image's path, ``None`` when the file does not exist (``read_lines`` decodes it)."""
    if image_dir is None:
        return None
    if Path(img_id).name != img_id or img_id in ("", ".", ".."):
        raise checker.error("img_id", f"{img_id!r} is not a plain file name", "bad_field")
    path = image_dir / img_id
    if not path.is_file():
        return None
    return path


def make_sample(checker: LineChecker, tokens: tuple[str, ...], head: Entity, tail: Entity,
                img_id: str, rel2id: dict[str, int], image_dir: Path | None) -> Sample:
    """The checks every reader shares (relation in the label file, image resolved) -> a Sample."""
    relation = checker.get("relation", kind=str)
    if relation not in rel2id:
        raise checker.error("relation", f"{relation!r} is not in the label file", "unknown_label")
    image_path = resolve_image(checker, image_dir, img_id)
    return Sample(
        tokens=tokens,
        head=head,
        tail=tail,
        relation=relation,
        img_id=img_id,
        image_path=str(image_path) if image_path is not None else None,
        source=f"{checker.path.name}:{checker.line}",
    )


class Tally:
    """Collects samples and skip counts; raises instead in ``strict`` mode."""

    def __init__(self, path: Path, strict: bool, allow_missing_images: bool):
        self.path = path
        self.strict = strict
        self.allow_missing_images = allow_missing_images
        self.samples: list[Sample] = []
        self.skipped: collections.Counter = collections.Counter()
        self.missing_images = 0
        self.unreadable_images = 0
        self.num_lines = 0

    def skip(self, error: DataError) -> None:
        if self.strict:
            raise error
        self.skipped[error.kind] += 1
        # The first few reasons are logged in full; the rest only in the counts.
        if self.skipped[error.kind] <= 3:
            log.warning("skipping %s", error)

    def add(self, sample: Sample, line: int, check_image_file: bool) -> None:
        """Keeps ``sample``; an image that is missing or does not decode is dropped and counted."""
        if sample.image_path is None:
            if self.strict and not self.allow_missing_images:
                raise DataError(self.path, line, "img_id",
                                f"image {sample.img_id} not found", "missing_image")
            self.missing_images += 1
        elif check_image_file and (reason := check_image(Path(sample.image_path))) is not None:
            error = DataError(self.path, line, "img_id",
                              f"image {sample.image_path} is unreadable ({reason})",
                              "unreadable_image")
            if self.strict and not self.allow_missing_images:
                raise error
            self.unreadable_images += 1
            if self.unreadable_images <= 3:
                log.warning("image masked: %s", error)
            sample = dataclasses.replace(sample, image_path=None)
        self.samples.append(sample)

    def result(self) -> ReadResult:
        result = ReadResult(self.samples, self.skipped, self.missing_images, self.num_lines,
                            str(self.path), self.unreadable_images)
        # Skips and broken images are worth a warning; a clean read is routine.
        log.log(logging.WARNING if self.skipped or self.unreadable_images else logging.INFO,
                "read %s: %d lines, %d samples, %d missing images, %d unreadable images "
                "(masked), skipped %s", self.path, self.num_lines, len(self.samples),
                self.missing_images, self.unreadable_images, dict(self.skipped) or "none")
        return result


def read_lines(path: str | Path, parse: Callable[[LineChecker], Sample], *, dataset: str,
               strict: bool, allow_missing_images: bool, check_images: bool = True
               ) -> ReadResult:
    """The loop every reader shares: one dict literal per line -> ``parse`` -> tally.

    A bad line raises in ``strict`` mode and is skipped and counted by reason otherwise.
    ``check_images`` decodes each existing image (at reduced scale): one that does not decode is
    masked like a missing one and counted as ``unreadable_image``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{dataset} file not found: {path}")
    tally = Tally(path, strict, allow_missing_images)
    for number, record in iter_dict_lines(path):
        tally.num_lines += 1
        if isinstance(record, DataError):
            tally.skip(record)
            continue
        try:
            sample = parse(LineChecker(path, number, record))
        except DataError as e:
            tally.skip(e)
            continue
        tally.add(sample, number, check_images)
    return tally.result()
