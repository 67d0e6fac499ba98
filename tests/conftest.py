"""Test setup: 8 fake CPU devices (before JAX initializes its backend) and shared fixtures."""

import os
from pathlib import Path
from typing import Any

import jax
import pytest

# Data-parallel code is tested on 8 CPU devices; 1-device runs use a sub-mesh of them.
jax.config.update("jax_num_cpu_devices", 8)
# Tests never reach a model hub: loaders must find everything locally or fail clearly.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite is compile-bound (tiny models, a few steps each). XLA's CPU compiler at LLVM
# optimization level 0 with its classic fusion emitters compiles these programs about 3x faster
# (test_roc_model: 95 -> 30 CPU-s). No test measures speed; results move by float rounding
# against the default build, so values a test requires to be identical are always computed under
# the same flags: set in the environment, the processes the tests start (CLI runs, multihost
# workers, the notebook's kernel) inherit them. Read when JAX starts its backend.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_flags] + [f for f in _FAST_COMPILE if f.split("=")[0] not in _flags]).strip()


@pytest.fixture(scope="session")
def mnre_dir() -> Path:
    """The real MNRE-2 folder given by ``ROC_MNRE_DIR``; tests that need it skip without it."""
    value = os.environ.get("ROC_MNRE_DIR")
    if not value:
        pytest.skip("ROC_MNRE_DIR is not set: real-data test skipped")
    path = Path(value)
    if not (path / "mnre_train.txt").exists():
        pytest.fail(f"ROC_MNRE_DIR={value} does not hold mnre_train.txt")
    return path


@pytest.fixture(scope="session")
def _trained_run(tmp_path_factory) -> tuple[Path, Any, dict]:
    """The tiny text config trained for 2 epochs (4 steps) on 8 devices on fixture data, once per
    test session: (workdir, config, ``train_and_evaluate``'s result). Tests must not change it."""
    from fixtures import write_mnre_fixture
    from roc_testutil import tiny_config

    from roc_jax import train_lib

    data = tmp_path_factory.mktemp("mnre_fixture")
    write_mnre_fixture(data)
    config = tiny_config(data)
    workdir = tmp_path_factory.mktemp("trained")
    return workdir, config, train_lib.train_and_evaluate(config, workdir)


@pytest.fixture(scope="session")
def trained(_trained_run) -> tuple[Path, Any]:
    """(workdir, config) of the shared trained run."""
    return _trained_run[:2]


@pytest.fixture(scope="session")
def trained_result(_trained_run) -> dict:
    """``{'step', 'dev', 'best_step'}`` of the shared trained run."""
    return _trained_run[2]
