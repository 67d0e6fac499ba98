"""End-to-end training on fixture data with the tiny config: 8 fake CPU devices, evaluation,
exact resume, 1-vs-8-device equivalence, non-finite stops (the restore in a new process, by
eval.py, is in test_checkpoint_layout.py)."""

from pathlib import Path

import jax
import numpy as np
import pytest
from roc_testutil import assert_same_state, load_config, metrics_rows, read_state, tiny_config

from roc_jax import checkpoint as ckpt
from roc_jax import parallel, train_lib
from roc_jax.data import sources as sources_lib


def _dev_rows(workdir):
    return {r["step"]: r for r in metrics_rows(workdir) if "dev/f1" in r}


def test_train_logs_metrics_events_and_the_best_step(trained, trained_result):
    """The shared run's logs; eval.py of it in a new process, identical to these dev metrics, is
    tested in test_checkpoint_layout.py (on a copy without the optimizer state)."""
    workdir, _ = trained
    assert trained_result["step"] == 4
    rows = metrics_rows(workdir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]  # log_every=2
    for key in ("train/loss", "train/accuracy", "train/grad_norm", "train/param_norm",
                "train/lr_encoder", "train/lr_head", "train/examples_per_sec"):
        assert np.isfinite(train_rows[-1][key]), key
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    dev = _dev_rows(workdir)
    assert sorted(dev) == [2, 4]  # every epoch
    best = trained_result["best_step"]
    assert dev[best]["dev/f1"] == max(r["dev/f1"] for r in dev.values())


def test_exact_resume_equals_uninterrupted_run(trained, trained_result, tmp_path):
    """Stop after step 3 (max_steps, mid-epoch), restart: same parameters and metrics as the run that never
    stopped. Tolerance: bitwise (same compiled step, same data, dropout keyed by step)."""
    ref_dir, config = trained
    workdir = tmp_path / "resumed"
    stopped = tiny_config(Path(config.data.raw_dir), max_steps=3)
    first = train_lib.train_and_evaluate(stopped, workdir)
    assert first["step"] == 3
    assert ckpt.make_manager(workdir, read_only=True).latest_step() == 3
    again = tiny_config(Path(config.data.raw_dir))
    second = train_lib.train_and_evaluate(again, workdir)
    assert second["step"] == 4
    assert_same_state(ref_dir, workdir, 4)
    assert _dev_rows(workdir)[4] | {"time": 0} == _dev_rows(ref_dir)[4] | {"time": 0}
    assert second["dev"]["f1"] == trained_result["dev"]["f1"]


def test_one_and_eight_devices_give_the_same_step(trained):
    """Same loss, gradients and parameters after one step on a 1-device and an 8-device mesh.

    The 8-device gradient is a sum of 8 partial sums, a different float order than one device.
    Gradients are compared through Adam's first moment after the step (``mu = (1 - b1) g``): rtol
    1e-4, atol 1e-5 of the leaf's largest ``|mu|`` (+ 1e-12). Parameters: 1e-5 absolute, except
    where ``0 < |g| < 1e-6`` (under 5 % of them): Adam's first step moves a parameter by
    ``lr g / (|g| + eps)``, which for a gradient within a few hundred ``eps`` of zero turns a
    float-order difference of ``g`` into an O(lr) difference of the step (those elements are
    compared with ``atol = peak lr``). Both directions of the InfoNCE loss: the relation-to-pair
    one normalizes over the global batch."""
    from roc_jax.data import pipeline
    from roc_jax.models.roc import create_model

    _, config = trained
    config = config.copy_and_resolve_references()
    config.train.relation_to_pair_weight = 1.0
    sources = sources_lib.load_sources(config, ["train"])
    built = create_model(config.model, use_images=False, num_relations=5)
    cache = train_lib.build_description_cache(config, built, sources_lib.label_names_of(config))
    it = pipeline.make_train_iterator(sources["train"], built.tokenizer,
                                      train_lib.pipeline_config(config, None), seed=0,
                                      batch_size=config.train.batch_size)
    batch = next(it)
    it.close()
    rel = train_lib.relations_input(config, cache)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(devices)
        trainer, state = train_lib.make_trainer(built.model, config.train, 10, mesh)
        with jax.set_mesh(mesh):
            state, out = trainer.train_step(state, parallel.shard_batch(batch, mesh),
                                            parallel.replicate(rel, mesh))
        results.append(jax.device_get((state["params"], out, state["opt_state"])))
    (p1, o1, s1), (p8, o8, s8) = results
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(o1["loss"], o8["loss"], rtol=1e-5)
    np.testing.assert_allclose(o1["grad_norm"], o8["grad_norm"], rtol=1e-5)
    grad_of = {}  # parameter path -> the 1-device gradient, from mu
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1), jax.tree.leaves(s8),
                            strict=True):
        name = jax.tree_util.keystr(path)
        if ".mu" in name:
            # float-order error scales with the summed terms, so atol with the leaf's largest;
            # 1e-12 for leaves whose gradient is zero up to rounding (a key bias under softmax)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max() + 1e-12,
                                       err_msg=name)
            grad_of[name.split(".mu", 1)[1]] = np.asarray(a) / (1 - 0.9)
    peak_lr = max(config.train.lr_encoder, config.train.lr_head)
    checked = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p8),
                            strict=True):
        g = grad_of[jax.tree_util.keystr(path)]
        well = (g == 0) | (np.abs(g) >= 1e-6)  # zero: unused embedding rows, decay only
        np.testing.assert_allclose(a[well], b[well], atol=1e-5)
        np.testing.assert_allclose(a[~well], b[~well], atol=peak_lr)
        checked += int(well.sum())
    assert checked > 0.95 * sum(x.size for x in jax.tree.leaves(p1))


@pytest.mark.parametrize("head, softmax_too, weight", [
    ("retrieval", False, 1.0), ("classification", False, 0.0), ("classification", True, 1.0)])
def test_relation_to_pair_loss_is_the_retrieval_heads(head, softmax_too, weight, monkeypatch):
    """configs/mnre.py turns the second direction on; the softmax baseline trains without it
    unless the control asks for it."""
    import optax

    from roc_jax.models.roc import create_model

    config = load_config("tiny", "text")
    config.model.head = head
    config.train.relation_to_pair_weight = 1.0
    config.train.softmax_relation_to_pair = softmax_too
    built = create_model(config.model, use_images=False, num_relations=5)
    weights = []
    monkeypatch.setattr(train_lib, "_jit_train", lambda gdef, spec, mesh, w: (
        weights.append(w), (None, optax.identity(), {}))[1])
    train_lib.make_trainer(built.model, config.train, 10, parallel.make_mesh(jax.devices()))
    assert weights == [weight]


def test_ctrl_c_saves_the_current_step(trained, tmp_path, monkeypatch):
    from roc_jax.data import pipeline

    _, config = trained
    real_next = pipeline.TrainIterator.__next__

    def interrupting_next(self):
        if self._step == 3:  # the 4th batch: steps 1-3 are done
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", interrupting_next)
    workdir = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train_lib.train_and_evaluate(config, workdir)
    manager = ckpt.make_manager(workdir, read_only=True)
    assert manager.latest_step() == 3
    assert ckpt.read_meta(manager, 3)["format_version"] == ckpt.FORMAT_VERSION
    assert int(read_state(workdir, 3)["step"]) == 3


def test_non_finite_loss_stops_with_the_step():
    good = {"loss": np.float32(1.0), "grad_norm": np.float32(2.0)}
    bad = {"loss": np.float32(np.nan), "grad_norm": np.float32(2.0)}
    train_lib.check_finite([good, good], first_step=1)
    with pytest.raises(train_lib.NonFiniteError, match="non-finite loss .* at step 12"):
        train_lib.check_finite([good, bad], first_step=11)
    inf_grad = {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)}
    with pytest.raises(train_lib.NonFiniteError, match="grad_norm .* at step 5"):
        train_lib.check_finite([inf_grad], first_step=5)


def test_batch_size_must_split_over_devices(trained):
    _, config = trained
    config = config.copy_and_resolve_references()
    config.train.batch_size = 12
    with pytest.raises(ValueError, match="batch_size=12 is not a multiple of the 8 devices"):
        train_lib.setup(config, None, restore=None)


def test_lr_schedule_warmup_and_decay():
    s = train_lib.lr_schedule(1.0, total_steps=10, warmup_ratio=0.2)
    assert [float(s(i)) for i in (0, 1, 2, 6, 10)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0])
