"""Training protocols: the seeded low-resource fraction and held-out (zero-shot) relations."""

import numpy as np
import pytest

from roc_jax.data.subsets import SubsetSource, subset_source, unseen_relation_ids


class Records:
    """A random-access source whose text view must be the one the subset reads."""

    def __init__(self, relations):
        self.relations = list(relations)
        self.full_reads = 0

    def __len__(self):
        return len(self.relations)

    def __getitem__(self, i):
        self.full_reads += 1
        return {"relation": self.relations[i], "index": i, "image": "decoded"}

    def text_example(self, i):
        return {"relation": self.relations[i], "index": i}


def test_fraction_is_seeded_sorted_and_shared_across_calls():
    src = Records(np.arange(1000) % 7)
    a, rep = subset_source(src, fraction=0.1, seed=0)
    b, _ = subset_source(src, fraction=0.1, seed=0)
    c, _ = subset_source(src, fraction=0.1, seed=1)
    idx = [a[i]["index"] for i in range(len(a))]
    assert len(a) == 100 and rep == {"records": 1000, "kept": 100, "dropped_fraction": 900,
                                     "dropped_unseen": 0}
    assert idx == sorted(set(idx))
    assert idx == [b[i]["index"] for i in range(len(b))]
    assert idx != [c[i]["index"] for i in range(len(c))]
    assert a.text_example(3) == {"relation": src.relations[idx[3]], "index": idx[3]}


def test_unseen_relations_lose_every_record_and_nothing_else():
    rels = [0, 1, 2, 1, 3, 2, 0, 1]
    src = Records(rels)
    sub, rep = subset_source(src, unseen_ids=[1, 3])
    assert isinstance(sub, SubsetSource)
    assert [sub[i]["index"] for i in range(len(sub))] == [0, 2, 5, 6]
    assert rep["dropped_unseen"] == 4 and rep["kept"] == 4
    assert src.full_reads == 4  # the filter read the text view, not the (image) records
    same, rep = subset_source(src)
    assert same is src and rep["kept"] == 8


def test_bad_protocol_values_are_errors():
    with pytest.raises(ValueError, match="train_fraction=0"):
        subset_source(Records([0]), fraction=0)
    names = ["None", "/per/per/couple"]
    assert unseen_relation_ids(["/per/per/couple"], names) == [1]
    with pytest.raises(ValueError, match="not a relation"):
        unseen_relation_ids(["/per/misc/nope"], names)
    with pytest.raises(ValueError, match="'None' cannot"):
        unseen_relation_ids(["None"], names)
