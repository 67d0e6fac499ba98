"""Test setup: 8 fake CPU devices (before JAX initializes its backend) and shared fixtures."""

import os
from pathlib import Path

import jax
import pytest

# Data-parallel code is tested on 8 CPU devices; 1-device runs use a sub-mesh of them.
jax.config.update("jax_num_cpu_devices", 8)
# Tests never reach a model hub: loaders must find everything locally or fail clearly.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


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
