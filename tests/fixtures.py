"""Writers of tiny raw-format data sets for tests (MNRE and MORE layouts).

Other test modules import these: ``write_mnre_fixture(tmp_path)`` gives a folder that every MNRE
reader, builder and pipeline accepts, with varied but learnable sentences (the relation follows
from a keyword of the sentence, and each relation's images share a colour), so a tiny model can
fit it in a few steps.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

MNRE_FIXTURE_REL2ID = {
    "None": 0,
    "/per/per/couple": 1,
    "/per/loc/place_of_residence": 2,
    "/per/org/member_of": 3,
    "/org/loc/locate_at": 4,
}

_PEOPLE = [
    ["Rafael", "Nadal"], ["Mery", "Perello"], ["Serena", "Williams"], ["Alexis", "Ohanian"],
    ["Barack", "Obama"], ["Michelle", "Obama"], ["Lionel", "Messi"], ["Antonela", "Roccuzzo"],
    ["Taylor", "Swift"], ["Joe", "Alwyn"], ["Emma", "Watson"], ["Tom", "Hanks"],
    ["Rita", "Wilson"], ["Kanye", "West"], ["Kim", "Kardashian"], ["Bill", "Gates"],
]
_PLACES = [
    ["Paris"], ["New", "York"], ["London"], ["Madrid"], ["Tokyo"], ["Berlin"],
    ["Los", "Angeles"], ["Chicago"], ["Rome"], ["Sydney"],
]
_ORGS = [
    ["Google"], ["Real", "Madrid"], ["NASA"], ["the", "Lakers"], ["Microsoft"], ["Barcelona"],
    ["Apple"], ["the", "United", "Nations"], ["Tesla"], ["Chelsea"],
]
# (relation, head kind, tail kind, templates); '{h}' / '{t}' are the entity slots.
_TEMPLATES = {
    "/per/per/couple": ("per", "per", [
        "RT @celebnews : {h} and {t} got married in a private ceremony #wedding",
        "{h} celebrates anniversary with wife {t} tonight",
        "Congratulations to {h} and husband {t} on their engagement !",
    ]),
    "/per/loc/place_of_residence": ("per", "loc", [
        "{h} lives in {t} with the family now",
        "RT @homes : {h} buys a house in {t} and moves there",
        "{h} spotted at home in {t} this morning #local",
    ]),
    "/per/org/member_of": ("per", "org", [
        "{h} signs a new contract to play for {t}",
        "RT @sport : {h} joins {t} as a member of the team",
        "{h} has worked for {t} for ten years #career",
    ]),
    "/org/loc/locate_at": ("org", "loc", [
        "{h} opens its headquarters in {t}",
        "The offices of {h} are located in {t} #business",
        "RT @biz : {h} is based in downtown {t}",
    ]),
    "None": ("per", "per", [
        "{h} retweeted a photo of {t} at the game",
        "Who wore it better : {h} or {t} ? #fashion",
        "{h} and {t} trend today on @twitter",
    ]),
}
_COLOURS = {name: colour for name, colour in zip(MNRE_FIXTURE_REL2ID, [
    (128, 128, 128), (220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 200, 30)], strict=True)}


def _pick(rng: random.Random, kind: str) -> list[str]:
    return list(rng.choice({"per": _PEOPLE, "loc": _PLACES, "org": _ORGS}[kind]))


def _mnre_line(rng: random.Random, relation: str, index: int) -> dict:
    head_kind, tail_kind, templates = _TEMPLATES[relation]
    template = templates[index % len(templates)]
    head = _pick(rng, head_kind)
    tail = _pick(rng, tail_kind)
    while tail == head:
        tail = _pick(rng, tail_kind)
    tokens: list[str] = []
    spans = {}
    for word in template.split():
        if word in ("{h}", "{t}"):
            entity = head if word == "{h}" else tail
            spans[word] = [len(tokens), len(tokens) + len(entity)]
            tokens.extend(entity)
        else:
            tokens.append(word)
    return {
        "token": tokens,
        "h": {"name": " ".join(head), "pos": spans["{h}"]},
        "t": {"name": " ".join(tail), "pos": spans["{t}"]},
        "img_id": f"fixture_{index:03d}.jpg",
        "relation": relation,
    }


def _write_split(root: Path, split: str, n: int, offset: int, rng: random.Random) -> None:
    relations = list(_TEMPLATES)
    image_dir = root / "img_org" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        relation = relations[i % len(relations)]
        record = _mnre_line(rng, relation, offset + i)
        lines.append(repr(record))
        # Every third sample has no image: readers must count it as missing, not drop it.
        if i % 3 != 2:
            colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in _COLOURS[relation])
            Image.new("RGB", (40, 30), colour).save(image_dir / record["img_id"], quality=90)
    (root / f"mnre_{split}.txt").write_text("\n".join(lines) + "\n")


def write_mnre_fixture(directory: str | Path, *, seed: int = 0) -> Path:
    """Writes a tiny MNRE-format folder into ``directory`` and returns its path.

    Layout: ``mnre_train.txt`` (40 lines), ``mnre_val.txt`` (16 lines), ``mnre_test.txt``
    (10 lines, no images), ``ours_rel2id.json`` (5 labels incl. ``None``) and
    ``img_org/{train,val}/fixture_NNN.jpg`` (40x30 JPEGs) for two thirds of the samples; the
    others' images are missing on purpose. Lines are Python dict literals (single quotes), as
    in the real files. Deterministic for a given ``seed``.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    (root / "ours_rel2id.json").write_text(json.dumps(MNRE_FIXTURE_REL2ID))
    _write_split(root, "train", 40, 0, rng)
    _write_split(root, "val", 16, 100, rng)
    _write_split(root, "test", 10, 200, rng)
    for path in (root / "img_org" / "test").glob("*.jpg"):
        path.unlink()
    return root


MORE_FIXTURE_REL2ID = {"none": 0, "/per/loc/place_of_residence": 1, "/per/org/member_of": 2}


def write_more_fixture(directory: str | Path) -> Path:
    """Writes a tiny MORE-format folder (see ``roc_jax.data.more``) and returns its path.

    ``txt/{train,valid,test}.txt`` (dict literals whose tail is ``{'name', 'box'}`` with a
    normalized ``(cx, cy, w, h)`` box), ``rel2id.json`` and ``img_org/<split>/`` with UUID-named
    images for every other sample.
    """
    root = Path(directory)
    (root / "txt").mkdir(parents=True, exist_ok=True)
    (root / "rel2id.json").write_text(json.dumps(MORE_FIXTURE_REL2ID))
    relations = list(MORE_FIXTURE_REL2ID)
    for split, n in (("train", 6), ("valid", 3), ("test", 3)):
        image_dir = root / "img_org" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            img_id = f"{split[:2]}{i:02d}aaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee.jpg"
            person = _PEOPLE[i % len(_PEOPLE)]
            tokens = [*person, "visits", "the", "city", "today"]
            lines.append(repr({
                "token": tokens,
                "h": {"name": " ".join(person), "pos": [0, len(person)]},
                "t": {"name": f"object_{i % 3}", "box": [0.25 + 0.25 * (i % 3), 0.5, 0.2, 0.4]},
                "img_id": img_id,
                "relation": relations[i % len(relations)],
            }))
            if i % 2 == 0:
                Image.new("RGB", (50, 40), (10 * i, 100, 150)).save(image_dir / img_id)
        (root / "txt" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root
