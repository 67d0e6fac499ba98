"""Data parallelism: one mesh over every device, batches as global arrays sharded on 'data'.

This replaces ``pmap``: parameters are replicated (``P()``), a batch is one global ``jax.Array``
whose leading axis is split across the mesh's ``'data'`` axis, and XLA inserts the gradient
all-reduce inside the single jit-compiled step. Several processes (hosts) join through
``initialize_distributed`` into one mesh over all their devices; each passes its own rows of
every global batch (docs/multihost.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

log = logging.getLogger("roc_jax")
T = TypeVar("T")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def distributed_args(cfg: Any) -> dict[str, Any] | None:
    """The ``jax.distributed.initialize`` arguments of ``config.distributed``; None: one process.

    A run is multi-process when ``cfg.enabled`` is True or ``JAX_COORDINATOR_ADDRESS`` is set
    (``tools/launch_local.py`` sets it). Each value comes from the config when set there (``''``
    and ``-1`` are unset), else from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``, else None: jax detects it (Cloud TPU, SLURM, Open MPI).
    """
    env_address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    if not (cfg.enabled or env_address):
        return None
    num = int(cfg.num_processes) if int(cfg.num_processes) > 0 else _env_int("JAX_NUM_PROCESSES")
    pid = int(cfg.process_id) if int(cfg.process_id) >= 0 else _env_int("JAX_PROCESS_ID")
    return {"coordinator_address": cfg.coordinator_address or env_address or None,
            "num_processes": num, "process_id": pid}


def initialize_distributed(cfg: Any) -> bool:
    """Joins a multi-process run through ``jax.distributed``; True when the run has several.

    Must run before anything else touches a JAX device (jax raises otherwise). Calling it again
    in a process that already joined does nothing. On CPU the cross-process collectives are gloo,
    so processes on one or several machines form one mesh (``make_mesh``).
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    args = distributed_args(cfg)
    if args is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**args)
    except ValueError as e:
        raise ValueError(
            f"jax.distributed.initialize({args}): {e}. Outside Cloud TPU and SLURM, set "
            "--config.distributed.coordinator_address/num_processes/process_id or "
            "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID "
            "(docs/multihost.md)") from e
    log.info("process %d of %d: %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def main_process_first(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` on process 0, then, once it returned there, on the other processes.

    For work that several hosts would otherwise do at once in a shared folder (a dataset build):
    process 0 does it and the others find it done (or, with host-local folders, do it after).
    ``name`` names the barrier; with one process this is ``fn()``.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        result = fn()
    multihost_utils.sync_global_devices(name)
    if jax.process_index() != 0:
        result = fn()
    return result


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


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every leaf of ``tree`` copied onto every device of ``mesh``, as replicated global arrays.

    Built from the host value with ``make_array_from_callback``, because ``device_put`` cannot
    move an array of this process onto other processes' devices; each process must pass the same
    value (the same seed, files and restored values give that). The copies never share buffers
    with ``tree``, so the result may be donated.
    """
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


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
