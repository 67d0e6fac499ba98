"""Reader for MNRE (Zheng et al., 2021): MNRE-2 (23 labels) and MNRE-1 (31 labels).

Layout of a data folder (the public repository's ``mnre_txt/`` plus the image archive)::

    mnre_train.txt  mnre_val.txt  mnre_test.txt   one Python dict literal per line
    ours_rel2id.json                              {relation: id}; MNRE-1's label file has the
                                                  same format, pass its path as ``label_file``
    img_org/{train,val,test}/<img_id>             the posts' images

A line: ``{'token': [...], 'h': {'name': str, 'pos': [start, end]}, 't': {...}, 'img_id': str,
'relation': str}``, spans ``[start, end)`` over ``token``. The label set always comes from the
label file, never from code.
"""

from __future__ import annotations

from pathlib import Path

from roc_jax.data.reading import (
    LineChecker,
    ReadResult,
    make_sample,
    read_lines,
)
from roc_jax.data.records import Entity, Sample, load_rel2id

SPLITS = ("train", "val", "test")
LABEL_FILE = "ours_rel2id.json"


def split_file(root: str | Path, split: str, prefix: str = "mnre_") -> Path:
    """``<root>/<prefix><split>.txt``; the upstream ``mnre_val .txt`` (a space) is accepted.

    MNRE-1's public files are ``mnre_org_{train,val,test}.txt``: ``prefix="mnre_org_"``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown MNRE split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    path = root / f"{prefix}{split}.txt"
    upstream = root / f"{prefix}{split} .txt"
    if not path.exists() and upstream.exists():
        return upstream
    return path


def read_mnre(path: str | Path, rel2id: dict[str, int], image_dir: str | Path | None,
              strict: bool = False, *, allow_missing_images: bool = False,
              check_images: bool = True) -> ReadResult:
    """Reads and validates one MNRE file.

    Args:
      path: an ``mnre_<split>.txt`` file.
      rel2id: the label set (``records.load_rel2id``); a relation outside it is ``unknown_label``.
      image_dir: the split's image folder (``img_org/<split>``); ``None`` reads text only (every
        image counts as missing).
      strict: raise ``reading.DataError`` (file, line, field, reason) on the first bad line,
        instead of skipping and counting it.
      allow_missing_images: in ``strict`` mode, keep samples whose image file is missing or
        does not decode.
      check_images: decode each existing image (at reduced scale); one that does not decode is
        masked like a missing one and counted in ``ReadResult.unreadable_images``.

    Returns:
      ``ReadResult`` with the samples in file order and the skip counts by reason.
    """
    image_dir = Path(image_dir) if image_dir is not None else None
    return read_lines(path, lambda c: _parse(c, rel2id, image_dir), dataset="MNRE",
                      strict=strict, allow_missing_images=allow_missing_images,
                      check_images=check_images)


def _parse(c: LineChecker, rel2id: dict[str, int], image_dir: Path | None) -> Sample:
    tokens = c.tokens("token")
    head_name, head_span = c.span("h", tokens)
    tail_name, tail_span = c.span("t", tokens)
    img_id = c.get("img_id", kind=str)
    return make_sample(c, tokens, Entity(head_name, span=head_span),
                       Entity(tail_name, span=tail_span), img_id, rel2id, image_dir)


def read_mnre_split(root: str | Path, split: str, strict: bool = False, *,
                    label_file: str | Path | None = None, prefix: str = "mnre_",
                    **kwargs) -> ReadResult:
    """Reads ``<root>/<prefix><split>.txt`` with images from ``<root>/img_org/<split>/``.

    ``label_file`` defaults to ``<root>/ours_rel2id.json`` (MNRE-2); for MNRE-1 (31 labels) give
    its label file and ``prefix="mnre_org_"``. Other keyword arguments go to ``read_mnre``.
    """
    root = Path(root)
    rel2id = load_rel2id(label_file if label_file is not None else root / LABEL_FILE)
    return read_mnre(split_file(root, split, prefix), rel2id, root / "img_org" / split, strict,
                     **kwargs)
