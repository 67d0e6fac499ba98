"""Word-piece encoding of a sentence with entity markers around the head and the tail.

The ROC text tower reads the fused states at the head's and the tail's *start marker*, so those two
positions must be exact. They are computed by construction: every raw token is turned into word
pieces on its own (BERT's pre-tokenizer splits on whitespace anyway, so per-word pieces equal
whole-sentence pieces), markers are inserted as known piece ids at known places, and the kept
positions are tracked through truncation. Nothing ever searches the output for ``@`` or ``#``,
which tweets carry themselves (``@user``, ``#tag``).

Marker styles (``MARKER_STYLES``):

- ``typed`` (default): ``@ * person * Rafael Nadal @`` for the head, ``# ^ person ^ Mery Perello #``
  for the tail (an entity without a type gets ``@ * * Rafael Nadal @``);
- ``untyped``: ``@ Rafael Nadal @`` and ``# Mery Perello #``;
- ``special``: ``[E1] Rafael Nadal [/E1]`` and ``[E2] Mery Perello [/E2]``. These four markers
  REUSE the vocabulary's unused entries ``[unused0]`` .. ``[unused3]`` (BERT / MiniLM vocabularies
  have them), so the pretrained embedding table keeps its shape and the weight map stays one to
  one; their embeddings start untrained. A vocabulary without them raises ``ValueError``.

Truncation keeps both entities: marker pieces are always kept, then entity-name pieces (the first
pieces of each name first), then context pieces by their distance to the nearest entity, so the
result is one window around both entities when they are close, and two windows (the middle cut
out) when they are far apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

MARKER_STYLES = ("typed", "untyped", "special")

# Piece kinds used to rank pieces for truncation (lower kinds are kept first).
_MARKER, _NAME, _CONTEXT = 0, 1, 2
_SPECIAL_VOCAB = {"[E1]": "[unused0]", "[/E1]": "[unused1]", "[E2]": "[unused2]", "[/E2]": "[unused3]"}


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One encoded sentence: ``input_ids`` int32 ``[n]`` with ``[CLS]``/``[SEP]``, ``n <= max_len``.

    ``head_index`` / ``tail_index`` are the positions of the start markers' first pieces in
    ``input_ids``; ``tail_index`` is 0 (``[CLS]``) when the tail has no text span (MORE's image
    objects). ``truncated`` says whether pieces were dropped.
    """

    input_ids: np.ndarray
    head_index: int
    tail_index: int
    truncated: bool


class WordPieceCache:
    """Per-word word pieces of a Hugging Face tokenizer, computed in batched calls and cached.

    Tweets repeat words a lot, so the cache turns tokenization into dictionary look-ups.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[str, tuple[int, ...]] = {}
        # A fast tokenizer's Rust backend is ~2x quicker than the Python wrapper's __call__. Use a
        # copy without the padding/truncation that tokenizer.json may carry (they would pad
        # every single word to the model length).
        self._backend = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_padding()
            self._backend.no_truncation()

    def prime(self, words: Sequence[str]) -> None:
        """Tokenizes all words not seen yet in one batched tokenizer call."""
        missing = list(dict.fromkeys(w for w in words if w not in self._cache))
        if not missing:
            return
        if self._backend is not None:
            # One pre-tokenized "sentence" of all missing words; word_ids maps pieces back.
            encoding = self._backend.encode(missing, is_pretokenized=True, add_special_tokens=False)
            ids = [[] for _ in missing]
            for piece, word in zip(encoding.ids, encoding.word_ids, strict=True):
                ids[word].append(piece)
        else:
            ids = self.tokenizer(missing, add_special_tokens=False)["input_ids"]
        for word, pieces in zip(missing, ids, strict=True):
            self._cache[word] = tuple(int(i) for i in pieces)

    def __call__(self, word: str) -> tuple[int, ...]:
        pieces = self._cache.get(word)
        if pieces is None:
            self.prime([word])
            pieces = self._cache[word]
        return pieces


def _check_span(span: Sequence[int] | None, n: int, what: str) -> tuple[int, int] | None:
    if span is None:
        return None
    start, end = (int(x) for x in span)
    if start == -1 and end == -1:
        return None
    if not 0 <= start < end <= n:
        raise ValueError(f"{what} span [{start}, {end}) is outside the {n} tokens")
    return start, end


class MarkerTokenizer:
    """Encodes ``(tokens, head span/type, tail span/type)`` into marked word pieces.

    ``tokenizer`` is a Hugging Face tokenizer (fast or not) with ``cls_token_id`` and
    ``sep_token_id``; ``max_len`` counts ``[CLS]`` and ``[SEP]``.
    """

    def __init__(self, tokenizer: Any, *, style: str = "typed", max_len: int = 80):
        if style not in MARKER_STYLES:
            raise ValueError(f"marker style {style!r} is not one of {MARKER_STYLES}")
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("the tokenizer has no [CLS]/[SEP] ids: a BERT-style tokenizer is needed")
        self.style = style
        self.max_len = int(max_len)
        self.pieces = WordPieceCache(tokenizer)
        self.cls_id = int(tokenizer.cls_token_id)
        self.sep_id = int(tokenizer.sep_token_id)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        if style == "special":
            self._special = {}
            for marker, entry in _SPECIAL_VOCAB.items():
                token_id = tokenizer.convert_tokens_to_ids(entry)
                if token_id is None or token_id == tokenizer.unk_token_id:
                    raise ValueError(
                        f"marker style 'special' reuses the vocabulary entry {entry} for {marker}, "
                        "but this tokenizer's vocabulary has no such entry")
                self._special[marker] = int(token_id)
        # The shortest possible marked sentence: both entities with one name piece each.
        untyped = self._open("head", "") + self._close("head") + self._open("tail", "")
        minimum = 2 + len(untyped) + len(self._close("tail")) + 2
        if self.max_len < minimum:
            raise ValueError(f"max_len={max_len} is too short for {style!r} markers (need >= {minimum})")

    def _words(self, words: Sequence[str]) -> list[int]:
        return [i for w in words for i in self.pieces(w)]

    def _open(self, which: str, type_: str) -> list[int]:
        if self.style == "special":
            return [self._special["[E1]" if which == "head" else "[E2]"]]
        bound, star = ("@", "*") if which == "head" else ("#", "^")
        if self.style == "untyped":
            return self._words([bound])
        return self._words([bound, star, *type_.split(), star])

    def _close(self, which: str) -> list[int]:
        if self.style == "special":
            return [self._special["[/E1]" if which == "head" else "[/E2]"]]
        return self._words(["@" if which == "head" else "#"])

    def prime(self, token_lists: Sequence[Sequence[str]], types: Sequence[str] = ()) -> None:
        """Tokenizes every distinct word of many sentences (and type words) in one call."""
        words = [w for tokens in token_lists for w in tokens]
        words += [w for t in types for w in t.split()] + ["@", "#", "*", "^"]
        self.pieces.prime(words)

    def encode(
        self,
        tokens: Sequence[str],
        head_span: Sequence[int] | None,
        tail_span: Sequence[int] | None,
        head_type: str = "",
        tail_type: str = "",
    ) -> Encoded:
        """Marks the head and the tail, tokenizes, truncates to ``max_len`` around the entities.

        Spans are token spans ``[start, end)``; ``tail_span`` ``None`` or ``(-1, -1)`` is an image
        object (no tail markers, ``tail_index`` 0). Spans may nest or overlap (MNRE has such
        pairs): at each token boundary the closing markers come before the opening ones, outer
        spans open first and close last.
        """
        n = len(tokens)
        head = _check_span(head_span, n, "head")
        if head is None:
            raise ValueError("the head entity needs a token span")
        tail = _check_span(tail_span, n, "tail")
        spans = [("head", head, head_type)] + ([("tail", tail, tail_type)] if tail else [])
        opens: dict[int, list] = {}
        closes: dict[int, list] = {}
        # Longer spans open first / close last, so nested spans nest properly.
        for which, (start, _end), type_ in sorted(spans, key=lambda s: s[1][0] - s[1][1]):
            opens.setdefault(start, []).append((which, type_))
        for which, (_start, end), _ in sorted(spans, key=lambda s: s[1][1] - s[1][0]):
            closes.setdefault(end, []).append(which)

        ids: list[int] = []
        kinds: list[int] = []
        starts: dict[str, int] = {}
        inside = 0  # number of open entities: pieces inside any entity are name pieces
        for pos in range(n + 1):
            for which in closes.get(pos, ()):
                piece_ids = self._close(which)
                ids += piece_ids
                kinds += [_MARKER] * len(piece_ids)
                inside -= 1
            for which, type_ in opens.get(pos, ()):
                starts[which] = len(ids)
                piece_ids = self._open(which, type_)
                ids += piece_ids
                kinds += [_MARKER] * len(piece_ids)
                inside += 1
            if pos < n:
                piece_ids = self.pieces(tokens[pos])
                ids += piece_ids
                kinds += [_NAME if inside else _CONTEXT] * len(piece_ids)

        if len(ids) <= self.max_len - 2:  # the common case: no truncation, positions as built
            out = np.asarray([self.cls_id, *ids, self.sep_id], np.int32)
            tail_index = starts["tail"] + 1 if tail else 0
            return Encoded(out, starts["head"] + 1, tail_index, False)
        keep, truncated = _truncate(np.asarray(kinds), self.max_len - 2)
        new_pos = np.cumsum(keep) - 1  # position among the kept pieces
        out = np.concatenate([[self.cls_id], np.asarray(ids, np.int32)[keep], [self.sep_id]])
        head_index = int(new_pos[starts["head"]]) + 1
        tail_index = int(new_pos[starts["tail"]]) + 1 if tail else 0
        return Encoded(out.astype(np.int32), head_index, tail_index, truncated)


def _truncate(kinds: np.ndarray, budget: int) -> tuple[np.ndarray, bool]:
    """Chooses which pieces to keep: ``kinds`` int ``[n]`` -> keep bool ``[n]``, truncated flag.

    Ranking: markers, then name pieces by distance from the start of their name, then context
    pieces by distance from the nearest marker or name piece; ties go to the earlier piece.
    """
    n = len(kinds)
    if n <= budget:
        return np.ones(n, bool), False
    n_markers = int(np.sum(kinds == _MARKER))
    if n_markers > budget:
        raise ValueError(f"the entity markers alone take {n_markers} pieces, more than the "
                         f"{budget} that max_len allows")
    pos = np.arange(n)
    entity = kinds != _CONTEXT
    # Distance to the nearest entity piece, from the left and from the right.
    left = np.where(entity, pos, -(10**9))
    left = pos - np.maximum.accumulate(left)
    right = np.where(entity, pos, 10**9)
    right = np.minimum.accumulate(right[::-1])[::-1] - pos
    context_distance = np.minimum(left, right)
    # Name pieces: distance to the closest marker on their left (the name's start).
    marker_left = np.maximum.accumulate(np.where(kinds == _MARKER, pos, -(10**9)))
    name_distance = pos - marker_left
    distance = np.where(kinds == _CONTEXT, context_distance,
                        np.where(kinds == _NAME, name_distance, 0))
    order = np.lexsort((pos, distance, kinds))  # last key is the primary one
    keep = np.zeros(n, bool)
    keep[order[:budget]] = True
    return keep, True
