"""The ROC model on tiny random encoders: shapes, masking, retrieval scores, MORE box pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from roc_testutil import load_config

from roc_jax.models.bert import BertConfig, BertEncoder
from roc_jax.models.roc import ROC, ROCConfig, box_patch_weights
from roc_jax.models.scoring import NO_DESCRIPTION_SCORE, relation_scores
from roc_jax.models.vit import ViT, ViTConfig

R, K, B, L, D = 4, 3, 4, 12, 32


def _model(head="retrieval", images=True, dtype=jnp.float32, **kw):
    tcfg = BertConfig(vocab_size=200, hidden_size=D, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rngs = nnx.Rngs(params=0, dropout=1)
    vision = None
    if images:
        vision = ViT(ViTConfig(variant="vit", image_size=16, patch_size=8, hidden_size=24,
                               num_hidden_layers=1, num_attention_heads=4, intermediate_size=48),
                     dtype=dtype, rngs=rngs)
    cfg = ROCConfig(num_relations=R, description_dim=20, head=head, fusion_layers=1,
                    proj_dim=8, **kw)
    return ROC(cfg, BertEncoder(tcfg, dtype=dtype, rngs=rngs), vision, None,
               image_dim=24 if images else None, dtype=dtype, rngs=rngs)


@nnx.jit
def _forward(model, batch, relations):
    # One compiled forward per model structure (eager op-by-op dispatch is slow on CPU).
    return model(batch, relations)


@nnx.jit
def _logits_loss_grads(model, batch, relations):
    """``(logits [B, R], loss, gradients of every nnx.Param)`` of a softmax loss on relation 0.

    One compiled function per model structure and batch layout: the batch is an argument, so
    tests that change only its values (which rows have images) reuse the compilation, and the
    logits come out of the same function as the gradients (the CPU compile dominates these
    tests)."""

    def loss(m):
        logits, _ = m(batch, relations)
        return jax.nn.logsumexp(logits, -1).mean() - logits[:, 0].mean(), logits

    (value, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, value, grads


def _batch(seed=0, has_image=(True, False, True, False)):
    rng = np.random.default_rng(seed)
    return {
        "input_ids": jnp.asarray(rng.integers(5, 200, (B, L)), jnp.int32),
        "attention_mask": jnp.asarray(np.arange(L)[None] < np.array([[12], [9], [7], [12]]),
                                      jnp.int32),
        "head_index": jnp.asarray([1, 2, 1, 3], jnp.int32),
        "tail_index": jnp.asarray([5, 4, 3, 6], jnp.int32),
        "pixel_values": jnp.asarray(rng.normal(size=(B, 16, 16, 3)), jnp.float32),
        "has_image": jnp.asarray(has_image),
        "tail_box": jnp.zeros((B, 4), jnp.float32),
        "tail_is_object": jnp.zeros((B,), bool),
    }


def _relations(seed=1):
    rng = np.random.default_rng(seed)
    mask = np.ones((R, K), bool)
    mask[3, 2] = False  # relations may have fewer descriptions
    return {"embeddings": jnp.asarray(rng.normal(size=(R, K, 20)), jnp.float32),
            "mask": jnp.asarray(mask)}


def test_retrieval_outputs_and_scores():
    model = _model()
    logits, inter = _forward(model, _batch(), _relations())
    assert logits.shape == (B, R) and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(inter["pair"], axis=-1), 1.0, rtol=1e-5)
    assert inter["relations"].shape == (R, K, 8)
    assert float(inter["temperature"]) == pytest.approx(0.07, rel=1e-5)
    # the score is the cosine to the relation's (mean) description vector / temperature
    expected = relation_scores(inter["pair"], inter["relations"], _relations()["mask"],
                               inter["temperature"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.asarray(logits) * 0.07) <= 1 + 1e-5)  # cosines in [-1, 1]


def test_missing_image_rows_ignore_their_pixels():
    """has_image False: that row's image tokens are masked out, whatever the pixels hold."""
    model = _model()
    b1, b2 = _batch(0), _batch(0)
    b2["pixel_values"] = b2["pixel_values"].at[1].set(100.0).at[3].set(-7.0)
    l1, _ = _forward(model, b1, _relations())
    l2, _ = _forward(model, b2, _relations())
    np.testing.assert_allclose(l1[1], l2[1], atol=1e-6)
    np.testing.assert_allclose(l1[3], l2[3], atol=1e-6)
    assert not np.allclose(l1[0], _forward(model, _batch(5), _relations())[0][0])


def test_no_image_in_batch_skips_the_tower_with_the_same_result():
    """A batch without any image takes the lax.cond branch that skips the ViT and fuses the text
    alone: same logits as running the ViT and masking its tokens (skip_vision_without_images=False)."""
    batch = _batch(has_image=(False,) * B)
    skip = _model()
    full = _model(skip_vision_without_images=False)
    np.testing.assert_allclose(_forward(skip, batch, _relations())[0],
                               _forward(full, batch, _relations())[0],
                               atol=1e-5)


@pytest.mark.parametrize("has_image", [(True, False, False, True), (True, True, True, False)])
def test_few_image_rows_run_the_tower_on_those_rows_alone(has_image):
    """With at most vision_rows images the ViT and the image fusion run on a gathered sub-batch
    (3 images > 2 take the full path): the same logits and box-pooled object tails as the full
    computation, and the same gradients."""
    batch = _batch(has_image=has_image)
    # Object tails on the image rows (one without its image has nothing to pool on any path).
    batch["tail_is_object"] = jnp.asarray(has_image) & jnp.asarray([True, True, False, True])
    batch["tail_box"] = jnp.asarray([[0.0, 0.0, 0.5, 1.0]] * B, jnp.float32)
    few = _model(vision_rows=2)
    full = _model(skip_vision_without_images=False)
    lf, _, gf = _logits_loss_grads(few, batch, _relations())
    lu, _, gu = _logits_loss_grads(full, batch, _relations())
    np.testing.assert_allclose(lf, lu, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gu), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("images,has_image,object_tails", [
    (False, (False,) * B, False),
    (True, (False,) * B, True),              # the text-only branch
    (True, (True, False, False, False), True),  # the few-rows branch
    (True, (True,) * B, True),               # every row's image tokens
])
def test_last_fusion_layer_on_the_markers_alone_is_exact(images, has_image, object_tails):
    """prune_last_fusion_layer (the default) runs the last fusion layer's queries, attention
    output and FFN on the two marker positions (plus the image tokens for object tails): the
    same logits, loss and gradients as computing every position."""
    batch = _batch(has_image=has_image)
    if object_tails:
        batch["tail_is_object"] = jnp.asarray([True, False, True, False])
        batch["tail_box"] = jnp.asarray([[0.0, 0.0, 0.5, 1.0]] * B, jnp.float32)
    else:
        del batch["tail_is_object"], batch["tail_box"]
    if not images:
        del batch["pixel_values"]
    # vision_rows=2: 1 image takes the few-rows branch, 4 the full one; the pruned model is the
    # few-image-rows test's, whose compile it reuses
    pruned = _model(images=images, vision_rows=2)
    full = _model(images=images, vision_rows=2, prune_last_fusion_layer=False)
    assert pruned.config.prune_last_fusion_layer
    logits_p, lp, gp = _logits_loss_grads(pruned, batch, _relations())
    logits_f, lf, gf = _logits_loss_grads(full, batch, _relations())
    np.testing.assert_allclose(logits_p, logits_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp, lf, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gf), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_model_without_images_needs_no_pixels_and_with_images_requires_them():
    text_only = _model(images=False)
    batch = _batch()
    del batch["pixel_values"]
    logits, _ = _forward(text_only, batch, _relations())
    assert logits.shape == (B, R)
    with pytest.raises(KeyError, match="no pixel_values"):
        _model()(batch, _relations())


def test_classification_head():
    model = _model(head="classification")
    logits, inter = _forward(model, _batch(), None)
    assert logits.shape == (B, R)
    assert "relations" not in inter


def test_a_relation_without_descriptions_is_no_candidate_for_either_head():
    """Zero-shot training masks a relation's descriptions: neither head scores it, and the
    softmax head's row for it gets no gradient (it is not trained as a negative)."""
    rel = _relations()
    rel = {**rel, "mask": rel["mask"].at[2].set(False)}
    for head in ("retrieval", "classification"):
        logits, _, grads = _logits_loss_grads(_model(head=head), _batch(), rel)
        np.testing.assert_array_equal(logits[:, 2], NO_DESCRIPTION_SCORE)
        assert np.all(np.asarray(logits[:, [0, 1, 3]]) > NO_DESCRIPTION_SCORE / 2), head
    kernel = np.asarray(grads["classifier"]["kernel"][...])  # [D', R]
    assert np.all(kernel[:, 2] == 0) and np.all(np.abs(kernel[:, [0, 1, 3]]).sum(0) > 0)


def test_gradients_flow_to_every_new_layer():
    # vision_rows=2 as in the few-image-rows test (2 images: that path), whose compile it reuses
    _, _, grads = _logits_loss_grads(_model(vision_rows=2), _batch(), _relations())
    for name in ("fusion", "pair_mlp", "pair_proj", "rel_proj", "image_proj", "log_temperature"):
        norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[name]))
        assert norm > 0 and np.isfinite(norm), name


def test_bfloat16_compute_keeps_float32_params():
    model = _model(dtype=jnp.bfloat16)
    params = nnx.state(model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    logits, _ = _forward(model, _batch(), _relations())
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_box_patch_weights():
    # 2x2 grid, patch centres at 0.25 / 0.75; row-major order (y, x)
    w = box_patch_weights(jnp.asarray([[0.0, 0.0, 1.0, 0.5],      # top row: patches 0, 1
                                       [0.5, 0.5, 1.0, 1.0],      # bottom right: patch 3
                                       [0.1, 0.6, 0.2, 0.7]]),    # no centre inside: fallback
                          2)
    np.testing.assert_allclose(w, [[0.5, 0.5, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])


def test_more_object_tail_reads_the_box():
    model = _model()
    batch = _batch(has_image=(True,) * B)
    batch["tail_is_object"] = jnp.asarray([True, True, False, False])
    batch["tail_box"] = jnp.asarray([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0, 0, 0, 0],
                                     [0, 0, 0, 0]], jnp.float32)
    states, (fused, _, _) = nnx.jit(lambda m, b: (m.pair_states(b), m.fuse(b)))(model, batch)
    patches = fused[:, L + 1:]  # [B, 4, D]: 16x16 image, patch 8 -> 2x2 grid
    np.testing.assert_allclose(states[0, D:], patches[0, 0], atol=1e-6)
    np.testing.assert_allclose(states[1, D:], patches[1, 3], atol=1e-6)
    np.testing.assert_allclose(states[2, D:], fused[2, 3], atol=1e-6)  # text tail at index 3


def test_config_errors():
    with pytest.raises(ValueError, match="model.head='softmax'"):
        ROCConfig(num_relations=3, description_dim=4, head="softmax")


def test_tiny_config_builds_random_encoders_explicitly():
    from roc_jax.models.roc import create_model

    c = load_config("tiny", "text")
    assert c.model.random_init is True
    built = create_model(c.model, use_images=False, num_relations=5)
    assert built.random_init and built.model.vision is None
    c.model.random_init = False
    c.model.text_encoder = "/nonexistent/encoder"
    with pytest.raises(Exception, match="nonexistent"):
        create_model(c.model, use_images=False, num_relations=5)


def test_trained_description_tower_recomputes_relation_vectors():
    """model.train_description_tower: the relation vectors come from the description tower's
    mean-pooled states of the tokenized descriptions, and gradients reach that tower."""
    tcfg = BertConfig(vocab_size=200, hidden_size=D, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rngs = nnx.Rngs(params=0, dropout=1)
    desc = BertEncoder(tcfg, rngs=rngs)
    cfg = ROCConfig(num_relations=R, description_dim=D, fusion_layers=1, proj_dim=8,
                    train_description_tower=True)
    model = ROC(cfg, BertEncoder(tcfg, rngs=rngs), None, desc, rngs=rngs)
    rng = np.random.default_rng(2)
    mask = np.ones((R, K), bool)
    relations = {"input_ids": jnp.asarray(rng.integers(5, 200, (R * K, 6)), jnp.int32),
                 "attention_mask": jnp.ones((R * K, 6), jnp.int32), "mask": jnp.asarray(mask)}
    batch = _batch()
    del batch["pixel_values"]
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits, _ = nnx.merge(graphdef, p, rest, copy=True)(batch, relations)
        return -jax.nn.log_softmax(logits)[:, 1].mean()

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["description"]))
    assert norm > 0
