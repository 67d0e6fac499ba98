"""benchmarks/benchlib.py: the FLOP count behind every MFU figure, and the synthetic batch."""

import sys

import numpy as np
from roc_testutil import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import benchlib  # noqa: E402

MINILM = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6}
BERT_BASE = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
CLIP_B32 = {**BERT_BASE, "patch_size": 32}


def test_flops_match_the_recorded_results():
    """The counts that the results files record (train_step.json's text step, gpu-h200.json's
    paper-size step at batch 256), from one function for both scripts."""
    text = benchlib.train_flops_per_example(MINILM, 64, 32, (23, 5), object_tails=True)
    full = benchlib.train_flops_per_example(MINILM, 64, 32, (23, 5), pruned=False)
    assert (text, full) == (5024506368.0, 5591327232.0)
    gpu = benchlib.train_flops_per_example(BERT_BASE, 80, 256, (23, 5), CLIP_B32, 224)
    torch = benchlib.train_flops_per_example(BERT_BASE, 80, 256, (23, 5), CLIP_B32, 224,
                                             pruned=False)
    assert (gpu, torch) == (74782507008.0, 79465709568.0)


def test_layer_flops_formula():
    n, d, f = 10, 8, 32
    assert benchlib.layer_flops(n, d, f) == 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d
    # Two queries: keys and values for all n positions, the rest for the two.
    assert benchlib.layer_flops(n, d, f, 2) == 4 * n * d * d + 2 * 2 * (2 * d * d + 2 * d * f) \
        + 4 * 2 * n * d


def test_synthetic_batch_has_the_pipeline_keys_and_valid_markers():
    batch = benchlib.synthetic_batch(16, 64, image_size=28)
    assert set(batch) == {"input_ids", "attention_mask", "head_index", "tail_index", "has_image",
                          "label", "mask", "tail_box", "tail_is_object", "pixel_values"}
    lengths = batch["attention_mask"].sum(1)
    assert (batch["tail_index"] < lengths).all() and (batch["head_index"] >= 1).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert batch["pixel_values"].shape == (16, 28, 28, 3) and batch["has_image"].all()
    text_only = benchlib.synthetic_batch(4, 32, object_tail_fields=False)
    assert "pixel_values" not in text_only and not text_only["has_image"].any()
    assert "tail_box" not in text_only
    rel = benchlib.synthetic_relations(23, 5, 384)
    assert rel["embeddings"].shape == (23, 5, 384) and rel["mask"].all()
    assert np.isfinite(rel["embeddings"]).all()


def test_traced_op_times_name_the_jax_ops_of_a_compiled_call():
    """The profile both CPU scripts write: the XLA op events map back to their JAX ops, and the
    categories see the matmul of a small jitted function."""
    import jax
    import jax.numpy as jnp

    fn = jax.jit(lambda a, b: jnp.exp(a @ b))
    a = jnp.ones((256, 256), jnp.float32)
    wall, sums = benchlib.traced_op_times(fn.lower(a, a).compile().as_text(), lambda: fn(a, a), 3)
    assert wall > 0 and set(sums) == {"category", "phase", "op"}
    assert "matmul (dot_general)" in sums["category"], sums["category"]
    assert any(op.endswith("/dot_general") for _, op in sums["op"]), sums["op"]
    # The three views sum the same events.
    totals = [sum(c.values()) for c in sums.values()]
    assert totals[0] > 0 and max(totals) - min(totals) < 1e-6 * totals[0]
