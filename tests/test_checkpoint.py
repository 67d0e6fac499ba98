"""Checkpoints: Composite round trip, best/latest retention, and clear errors on bad input
(another label set, another model, a newer format, unknown config keys, missing data)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from roc_testutil import REPO, load_config, tiny_config

from roc_jax import checkpoint as ckpt
from roc_jax import parallel, train_lib
from roc_jax.data import sources
from roc_jax.labels import cache as cache_lib

NAMES = ["None", "/per/per/couple", "/per/loc/place_of_residence", "/per/org/member_of",
         "/org/loc/locate_at"]


def _cache(names=NAMES):
    texts = {n: [f"{n} one", f"{n} two"] for n in names}
    return cache_lib.encode_descriptions(
        texts, names, lambda t: np.arange(len(t) * 3, dtype=np.float32).reshape(len(t), 3), "fp")


def _state(mesh):
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)},
             "opt_state": {"mu": jnp.zeros(3)}, "step": jnp.asarray(7, jnp.int32),
             "rng": jax.random.PRNGKey(3)}
    return jax.device_put(state, parallel.replicated(mesh))


def _save(workdir, step, meta, metrics=None):
    mesh = parallel.make_mesh()
    manager = ckpt.make_manager(workdir)
    ckpt.save(manager, step, state=_state(mesh), labels_args=cache_lib.save_args(_cache()),
              data_state={"format": 1, "next_step": step}, meta=meta, metrics=metrics,
              force=True)
    manager.wait_until_finished()
    manager.close()


def test_composite_round_trip(tmp_path):
    config = load_config("tiny", "text")
    meta = ckpt.make_meta(config, NAMES)
    _save(tmp_path, 7, meta)
    mesh = parallel.make_mesh()
    manager = ckpt.make_manager(tmp_path, read_only=True)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)),
        _state(mesh))
    got = ckpt.restore(manager, 7, abstract_state=target,
                       labels_restore_args=cache_lib.restore_args())
    for a, b in zip(jax.tree.leaves(got["state"]), jax.tree.leaves(_state(mesh)), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.sharding.is_equivalent_to(parallel.replicated(mesh), a.ndim)
    restored_cache = cache_lib.from_restored(got["labels"])
    assert restored_cache.texts == _cache().texts
    np.testing.assert_array_equal(restored_cache.embeddings, _cache().embeddings)
    assert got["data"] == {"format": 1, "next_step": 7}
    assert got["meta"]["label_names"] == NAMES
    assert got["meta"]["format_version"] == ckpt.FORMAT_VERSION
    assert got["meta"]["config"]["model"]["head"] == "retrieval"


def test_keeps_latest_and_best_dev_f1(tmp_path):
    meta = ckpt.make_meta(load_config("tiny", "text"), NAMES)
    for step, f1 in [(1, 0.5), (2, 0.9), (3, 0.3), (4, None)]:
        _save(tmp_path, step, meta, None if f1 is None else {ckpt.BEST_METRIC: f1})
    manager = ckpt.make_manager(tmp_path, read_only=True)
    assert manager.best_step() == 2
    assert manager.latest_step() == 4
    assert sorted(manager.all_steps()) == [2, 4]
    assert ckpt.select_step(manager, "best") == 2
    with pytest.raises(ckpt.CheckpointError, match="no step 3"):
        ckpt.select_step(manager, 3)


@pytest.fixture
def fixture_config(tmp_path):
    from fixtures import write_mnre_fixture

    return tiny_config(write_mnre_fixture(tmp_path / "data"))


def test_workdir_with_another_label_set(tmp_path, fixture_config):
    other = ["None", "/x/y/z"]
    _save(tmp_path / "wd", 5, ckpt.make_meta(fixture_config, other))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"another label set \(2 relations.*than this run's data \(5 "
                             r"relations.*use a new --workdir or delete this one"):
        train_lib.setup(fixture_config, tmp_path / "wd")


def test_workdir_with_another_model(tmp_path, fixture_config):
    meta = ckpt.make_meta(fixture_config, NAMES)
    meta["config"]["model"]["proj_dim"] = 999
    _save(tmp_path / "wd", 5, meta)
    with pytest.raises(ckpt.CheckpointError,
                       match=r"another model \(model.proj_dim: checkpoint 999 vs run 16\)"):
        train_lib.setup(fixture_config, tmp_path / "wd")


def test_checkpoint_from_a_newer_format(tmp_path, fixture_config):
    meta = ckpt.make_meta(fixture_config, NAMES)
    meta["format_version"] = ckpt.FORMAT_VERSION + 1
    _save(tmp_path / "wd", 5, meta)
    with pytest.raises(ckpt.CheckpointError, match="is newer than this roc_jax supports.*upgrade"):
        train_lib.setup(fixture_config, tmp_path / "wd")
    from roc_jax import inference

    with pytest.raises(ckpt.CheckpointError, match="newer"):
        inference.load(tmp_path / "wd")


def test_eval_of_a_workdir_without_checkpoints(tmp_path):
    from roc_jax import inference

    with pytest.raises(ckpt.CheckpointError, match="no checkpoints in .*train first"):
        inference.load(tmp_path / "empty")


def _parse_config_flags(argv):
    # config_flags reads the override flags off the command line (sys_argv), as train.py does.
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    from roc_jax.cli import parse_flags

    parse_flags(argv, fv)
    return fv.config


def test_unknown_config_key_is_an_error():
    path = REPO / "configs" / "tiny.py"
    config = _parse_config_flags(["prog", f"--config={path}:text", "--config.num_epochs=3",
                                  "--config.train.lr_head=0.5"])
    assert config.num_epochs == 3 and config.train.lr_head == 0.5
    assert config.data.use_images is False  # the :text variant
    from absl import app

    with pytest.raises(app.UsageError,
                       match=r"--config.train.no_such_key=1: unknown config field "
                             r"'train.no_such_key' .*fields of train: batch_size, "):
        _parse_config_flags(["prog", f"--config={path}", "--config.train.no_such_key=1"])


def test_unknown_config_variant():
    with pytest.raises(ValueError, match=r"unknown variant ':nope'"):
        load_config("tiny", "nope")
    with pytest.raises(ValueError, match=r"configs/mnre.py: unknown variant ':x'"):
        load_config("mnre", "one_way,x")
    assert load_config("mnre").train.relation_to_pair_weight == 1.0
    assert load_config("mnre", "one_way").train.relation_to_pair_weight == 0.0


def test_data_not_found(tmp_path, monkeypatch):
    config = load_config("tiny", "text")
    config.data.raw_dir = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"raw_dir=.*missing: ours_rel2id.json not found"):
        sources.load_sources(config, ["train"])
    config.data.raw_dir = ""
    with pytest.raises(FileNotFoundError, match="config.data.raw_dir is empty"):
        sources.label_names_of(config)
    monkeypatch.delenv("ROC_DATA_DIR", raising=False)
    with pytest.raises(ValueError, match="ROC_DATA_DIR, which is not set"):
        load_config("mnre", "offline")
    monkeypatch.setenv("ROC_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"mnre_train.txt not found"):
        load_config("mnre", "offline")


def test_missing_split_file(tmp_path, fixture_config):
    (tmp_path / "data" / "mnre_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="mnre_val.txt"):
        sources.load_sources(fixture_config, ["val"])
