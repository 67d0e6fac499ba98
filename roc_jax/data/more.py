"""Reader for MORE (He et al., ACM MM 2023): the tail is an object in the image, not a text span.

What the public loader does (NJUNLP/MORE, ``processor/dataset.py`` and ``run.py`` at commit
f523eede, read through the code search tool):

- files: ``txt/{train,valid,test}.txt``, labels ``rel2id.json`` (the first line is a JSON object
  ``{relation: id}``), images ``img_org/{train,valid,test}/<img_id>`` (UUID file names), plus
  ``ent_{split}_dict.pth`` (``torch.save`` of ``{img_id: {object name: box}}``) for all objects;
- a line is one Python dict literal read with ``ast.literal_eval``: ``'token'`` (list of str),
  ``'h'`` ``{'name', 'pos': [start, end)}`` (a text entity), ``'t'`` — commented there as
  ``{name, box}`` — the image object, ``'img_id'`` and ``'relation'``;
- box convention: the loader crops an object with ``left = box[0] - box[2] / 2``,
  ``top = box[1] - box[3] / 2``, ... then multiplies by the image width/height, so a box is
  ``(center_x, center_y, width, height)`` normalized to ``[0, 1]`` (the YOLO convention).

This reader takes the tail's box from ``t['box']`` when the line has it, else from the
``ent_<split>_dict.pth`` entry of ``img_id`` and the tail's name (as the loader does; that file
needs ``torch`` to read). It stores the box as corners ``(x0, y0, x1, y1)`` normalized to
``[0, 1]``, the convention of ``records.Entity.box`` and of the TFDS example (docs/architecture.md).
MORE's data itself is not available here, so the format is tested on fixtures written from the
loader's description.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from roc_jax.data.reading import (
    LineChecker,
    ReadResult,
    make_sample,
    read_lines,
)
from roc_jax.data.records import Entity, Sample, load_rel2id

SPLITS = ("train", "valid", "test")
LABEL_FILE = "rel2id.json"
# Centres or sizes this far outside [0, 1] are rounding of the annotation tool, not errors.
_BOX_TOLERANCE = 1e-3


def yolo_to_corners(box: Any) -> tuple[float, float, float, float]:
    """``(cx, cy, w, h)`` normalized -> ``(x0, y0, x1, y1)`` normalized and clipped to ``[0, 1]``.

    Raises ``ValueError`` for anything but 4 finite numbers with a positive size and a centre
    inside the image.
    """
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"expected 4 numbers (cx, cy, w, h), got {box!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in box):
        raise ValueError(f"expected 4 finite numbers, got {box!r}")
    cx, cy, w, h = (float(v) for v in box)
    lo, hi = -_BOX_TOLERANCE, 1 + _BOX_TOLERANCE
    if not (lo <= cx <= hi and lo <= cy <= hi and 0 < w <= hi and 0 < h <= hi):
        raise ValueError(f"box {box!r} is not a normalized (cx, cy, w, h) inside the image")

    def clip(v: float) -> float:
        return min(1.0, max(0.0, v))

    return clip(cx - w / 2), clip(cy - h / 2), clip(cx + w / 2), clip(cy + h / 2)


def load_object_dict(path: str | Path) -> dict[str, dict[str, Any]]:
    """Reads an ``ent_<split>_dict.pth`` file: ``{img_id: {object name: (cx, cy, w, h)}}``."""
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs torch (it is a torch.save file); install torch "
                          "or put the tail box in each line as t['box']") from None
    # weights_only: the file holds plain dicts/lists/floats; never unpickle arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def read_more(path: str | Path, rel2id: dict[str, int], image_dir: str | Path | None,
              strict: bool = False, *, objects: dict[str, dict[str, Any]] | None = None,
              allow_missing_images: bool = False, check_images: bool = True) -> ReadResult:
    """Reads and validates one MORE file (see the module docstring for the format).

    Args:
      path: a ``txt/<split>.txt`` file.
      rel2id: the label set; a relation outside it is ``unknown_label``.
      image_dir: the split's image folder (``img_org/<split>``); ``None`` reads text only.
      strict: raise ``reading.DataError`` on the first bad line instead of skipping it.
      objects: the split's object dict (``load_object_dict``), used when a line's tail has no box.
      allow_missing_images, check_images: as in ``mnre.read_mnre``.

    Returns:
      ``ReadResult``; each tail is ``Entity(name, span=None, box=(x0, y0, x1, y1))``.
    """
    image_dir = Path(image_dir) if image_dir is not None else None
    return read_lines(path, lambda c: _parse(c, rel2id, image_dir, objects), dataset="MORE",
                      strict=strict, allow_missing_images=allow_missing_images,
                      check_images=check_images)


def _parse(c: LineChecker, rel2id: dict[str, int], image_dir: Path | None,
           objects: dict[str, dict[str, Any]] | None) -> Sample:
    tokens = c.tokens("token")
    head_name, head_span = c.span("h", tokens)
    tail_name = c.get("t", "name", kind=str)
    img_id = c.get("img_id", kind=str)
    if "box" in c.get("t", kind=dict):
        raw_box = c.record["t"]["box"]
    elif objects is not None:
        raw_box = objects.get(img_id, {}).get(tail_name)
        if raw_box is None:
            raise c.error("t.name", f"object {tail_name!r} not in the object dict of {img_id}",
                          "bad_box")
    else:
        raise c.error("t.box", "missing (and no ent_<split>_dict.pth to look it up)",
                      "bad_field")
    try:
        box = yolo_to_corners(raw_box)
    except ValueError as e:
        raise c.error("t.box", str(e), "bad_box") from None
    return make_sample(c, tokens, Entity(head_name, span=head_span), Entity(tail_name, box=box),
                       img_id, rel2id, image_dir)


def read_more_split(root: str | Path, split: str, strict: bool = False, *,
                    label_file: str | Path | None = None, **kwargs) -> ReadResult:
    """Reads ``<root>/txt/<split>.txt`` with images from ``<root>/img_org/<split>/``.

    The object dict ``<root>/ent_<split>_dict.pth`` is loaded when it exists.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown MORE split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    rel2id = load_rel2id(label_file if label_file is not None else root / LABEL_FILE)
    objects_path = root / f"ent_{split}_dict.pth"
    if "objects" not in kwargs and objects_path.exists():
        kwargs["objects"] = load_object_dict(objects_path)
    return read_more(root / "txt" / f"{split}.txt", rel2id, root / "img_org" / split, strict,
                     **kwargs)
