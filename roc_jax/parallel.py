"""Data parallelism: one mesh over every device, batches as global arrays sharded on 'data'.

This replaces ``pmap``: parameters are replicated (``P()``), a batch is one global ``jax.Array``
whose leading axis is split across the mesh's ``'data'`` axis, and XLA inserts the gradient
all-reduce inside the single jit-compiled step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(enabled: bool) -> None:
    """Joins a multi-host run (TPU pod slice, multi-node GPU) through ``jax.distributed``.

    The coordinator address and process ids come from the environment (cloud TPU sets them; on
    GPU clusters set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
    """
    if enabled:
        jax.distributed.initialize()


def make_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every host) with a 'data' axis.

    Auto axis types: ``jax.make_mesh`` defaults to explicit axes, whose sharding-in-types rules
    reject some of the model's contractions.
    """
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree, mesh: jax.sharding.Mesh):
    """Places every leaf of ``tree`` on every device of ``mesh``."""
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This host's rows -> global arrays sharded on 'data' along the leading (batch) axis.

    With one process the local batch is the global batch; with several, each host passes its own
    ``B / num_processes`` rows and the global batch is their concatenation.
    """
    sharding = data_sharding(mesh)
    n_local = len(mesh.local_devices)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.shape[0] % n_local:
            raise ValueError(f"batch['{k}'] has {v.shape[0]} rows, not a multiple of the "
                             f"{n_local} local devices: set the batch size to a multiple of it")
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def global_batch_multiple(mesh: jax.sharding.Mesh) -> int:
    """Global batch sizes must be a multiple of this (the number of devices in the mesh)."""
    return mesh.devices.size
