"""Orbax checkpoints: one ``CheckpointManager`` per workdir, one Composite per saved step.

Items of a step (docs/contracts.md):

- ``state``: the train state pytree ``{'params', 'opt_state', 'step', 'rng'}`` (StandardSave);
- ``labels``: the description cache (``roc_jax.labels.cache.save_args``), so eval and predict
  never re-encode the descriptions;
- ``data``: the input iterator's state (JSON), so a resumed run sees the same batches;
- ``meta``: config, label names, library versions and ``FORMAT_VERSION`` (JSON).

Retention: the latest step (to resume) and the best step by dev micro-F1 (to evaluate). Orbax
writes each step to a temporary folder and renames it when complete, so a kill mid-save never
leaves a half checkpoint that looks valid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocpm

FORMAT_VERSION = 1
BEST_METRIC = "dev/f1"
ITEMS = ("state", "labels", "data", "meta")

# Config sections whose values must match for a checkpoint to be resumed or evaluated: the
# model's architecture and the label set. Everything else (epochs, max_steps, logging) may change
# between a run and its restart.
_MODEL_KEYS = ("head", "text_encoder", "image_encoder", "fusion_layers", "proj_dim",
               "train_description_tower", "random_init", "text_config", "image_config")


class CheckpointError(RuntimeError):
    """A workdir's checkpoint cannot be used with this run; the message says what to do."""


def make_manager(workdir: str | Path, *, read_only: bool = False,
                 async_save: bool = True) -> ocp.CheckpointManager:
    """The manager of ``workdir/checkpoints``: keeps the latest step and the best dev-F1 step."""
    directory = Path(workdir).absolute() / "checkpoints"
    if read_only and not directory.exists():
        raise CheckpointError(f"no checkpoints in {directory}: train first "
                              f"(python train.py --workdir {workdir})")
    policy = ocpm.AnyPreservationPolicy([
        ocpm.LatestN(n=1),
        ocpm.BestN(get_metric_fn=_best_metric, reverse=False, n=1,
                   keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_metric,
        best_mode="max",
        preservation_policy=policy,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def _best_metric(metrics: Mapping[str, float]) -> float:
    return float(metrics[BEST_METRIC])


def make_meta(config: Any, label_names: Sequence[str], extra: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
    """The ``meta`` item: JSON of the config, the label set and the versions that wrote it."""
    import flax
    import jax
    import optax

    from roc_jax import __version__

    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    meta = {
        "format_version": FORMAT_VERSION,
        "config": json.loads(json.dumps(cfg, default=_json_default)),
        "label_names": list(label_names),
        "versions": {"roc_jax": __version__, "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "orbax": ocp.__version__},
    }
    if extra:
        meta.update(extra)
    return meta


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple | set):
        return list(o)
    return str(o)


def check_meta(meta: Mapping[str, Any], *, config: Any | None, label_names: Sequence[str] | None,
               where: str) -> None:
    """Raises ``CheckpointError`` when ``meta`` (read from ``where``) does not fit this run."""
    version = int(meta.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: checkpoint format version {version} is newer than this roc_jax supports "
            f"({FORMAT_VERSION}); upgrade roc_jax (written by {meta.get('versions')})")
    if version < 1:
        raise CheckpointError(f"{where}: meta has no valid format_version; not a roc_jax checkpoint")
    if label_names is not None and list(meta["label_names"]) != list(label_names):
        saved = meta["label_names"]
        raise CheckpointError(
            f"{where}: the checkpoint was trained on another label set ({len(saved)} relations: "
            f"{saved[:5]}...) than this run's data ({len(label_names)} relations: "
            f"{list(label_names)[:5]}...); use a new --workdir or delete this one")
    if config is not None:
        mine = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        mine = json.loads(json.dumps(mine, default=_json_default))
        saved_model = meta["config"].get("model", {})
        diffs = [k for k in _MODEL_KEYS
                 if k in mine.get("model", {}) and saved_model.get(k) != mine["model"].get(k)]
        if diffs:
            detail = ", ".join(f"model.{k}: checkpoint {saved_model.get(k)!r} vs run "
                               f"{mine['model'].get(k)!r}" for k in diffs)
            raise CheckpointError(f"{where}: the checkpoint holds another model ({detail}); "
                                  "use a new --workdir or delete this one")


def save(manager: ocp.CheckpointManager, step: int, *, state: Any, labels_args: Any,
         data_state: Any, meta: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
         force: bool = False) -> bool:
    """Saves one step (asynchronously: call ``manager.wait_until_finished()`` before exit).

    ``labels_args`` is ``roc_jax.labels.cache.save_args(cache)``; ``metrics`` (with ``dev/f1``)
    rank the step for best-checkpoint retention; steps without metrics are kept only as latest.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        labels=labels_args,
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(dict(meta)),
    )
    return manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=force)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    where = f"{manager.directory}/{step}"
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except FileNotFoundError as e:
        raise CheckpointError(f"{where}: no meta item ({e}); not a roc_jax checkpoint") from None
    return dict(restored["meta"])


def select_step(manager: ocp.CheckpointManager, which: str | int = "best") -> int:
    """``'best'`` (dev F1), ``'latest'`` or an explicit step number."""
    if isinstance(which, int) or str(which).isdigit():
        step = int(which)
        if step not in manager.all_steps():
            raise CheckpointError(f"{manager.directory}: no step {step}; saved steps: "
                                  f"{list(manager.all_steps())}")
        return step
    if which not in ("best", "latest"):
        raise CheckpointError(f"checkpoint must be 'best', 'latest' or a step, got {which!r}")
    step = manager.best_step() if which == "best" else manager.latest_step()
    if step is None:
        raise CheckpointError(f"{manager.directory}: no checkpoint saved yet")
    return step


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_state: Any,
            labels_restore_args: Any, with_data: bool = True) -> dict[str, Any]:
    """Restores ``state`` (onto ``abstract_state``'s shapes and shardings), labels, data, meta."""
    items = {"state": ocp.args.StandardRestore(abstract_state),
             "labels": labels_restore_args,
             "meta": ocp.args.JsonRestore()}
    if with_data:
        items["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return {k: restored[k] for k in items}
