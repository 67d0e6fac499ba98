"""Orbax checkpoints: one ``CheckpointManager`` per workdir, one Composite per saved step.

Items of a step (docs/architecture.md, "Checkpoint Composite"), one folder each:

- ``params``: the model's parameters (StandardSave);
- ``opt_state``: the optimizer's state (AdamW moments and counts: twice the parameters' size);
- ``progress``: ``{'step', 'rng'}``, the step counter and the dropout seed key;
- ``labels``: the description cache (``roc_jax.labels.cache.save_args``), so eval and predict
  never re-encode the descriptions;
- ``data``: the input iterator's state (JSON), so a resumed run sees the same batches;
- ``meta``: config, label names, library versions, ``FORMAT_VERSION``, the raw data's
  fingerprint (``data_fingerprint``) and the checksums of every leaf of the three state items
  (``state_checksums``) (JSON).

Resuming training reads them all; evaluation and prediction read ``meta``, ``labels`` and
``params`` only, so a step whose ``opt_state`` was deleted still evaluates. Checkpoints of format
1 hold the train state ``{'params', 'opt_state', 'step', 'rng'}`` as one item, ``state``: they
still evaluate (the parameters are read from it) and resume.

Retention: the latest step (to resume) and the best step by dev micro-F1 (to evaluate). Orbax
writes each step to a temporary folder and renames it when complete, so a kill mid-save never
leaves a half checkpoint that looks valid, and a save that fails (disk full, permission) leaves
the earlier steps as they were.

A step whose files cannot be read (a corrupted chunk) raises ``UnreadableCheckpoint``, one line
naming the step, the item folder, the reason and the steps that exist; training falls back to
the newest step that reads (``roc_jax.train_lib.setup``). Not every damaged chunk fails to
decode (zstd frames are written without a checksum: flipped bytes can decode to other numbers),
so each step's ``meta`` also records checksums of the state's leaves (``state_checksums``),
verified on restore.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocpm

FORMAT_VERSION = 2
BEST_METRIC = "dev/f1"
# The train state's keys -> the item that holds them (format 2).
STATE_ITEMS = {"params": "params", "opt_state": "opt_state", "step": "progress",
               "rng": "progress"}
ITEMS = ("params", "opt_state", "progress", "labels", "data", "meta")
OLD_STATE_ITEM = "state"  # format 1: the whole train state in one item

# Config sections whose values must match for a checkpoint to be resumed or evaluated: the
# model's architecture and the label set. Everything else (epochs, max_steps, logging) may change
# between a run and its restart.
_MODEL_KEYS = ("head", "text_encoder", "image_encoder", "fusion_layers", "proj_dim",
               "train_description_tower", "random_init", "text_config", "image_config")


class CheckpointError(RuntimeError):
    """A workdir's checkpoint cannot be used with this run; the message says what to do."""


class UnreadableCheckpoint(CheckpointError):
    """A saved step whose files cannot be read (corrupted, truncated)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class CheckpointSaveError(CheckpointError):
    """Writing a checkpoint failed (disk full, permission); the earlier steps are intact."""


def error_reason(error: BaseException) -> str:
    """The innermost cause of ``error``, on one line (orbax wraps tensorstore's short message in
    an exception whose text is the whole TensorStore spec)."""
    inner = error
    seen = {id(inner)}
    while (nxt := inner.__cause__ or inner.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        inner = nxt
    text = " ".join(str(inner).split()) or type(inner).__name__
    if len(text) > 400:
        text = text[:400] + "..."
    return f"{type(inner).__name__}: {text}"


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


@jax.jit
def _checksums(leaves: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    out = []
    for x in leaves:
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
            bits = x.astype(jnp.uint32)
        elif x.dtype.itemsize == 2:
            bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        else:  # 4 bytes: one word; 8 bytes: two words per element
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        bits = bits.reshape(-1)
        position = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
        # Two sums modulo 2**32: any single changed word changes the first, a swap the second.
        out.append(jnp.stack([bits.sum(dtype=jnp.uint32), (bits * position).sum(dtype=jnp.uint32)]))
    return tuple(out)


def state_checksums(state: Any) -> dict[str, list[int]]:
    """``{leaf path: [sum, position-weighted sum]}`` of each leaf's bits (32-bit words, modulo
    2**32), computed on the device: a few numbers per leaf, recorded in each step's ``meta``."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    sums = jax.device_get(_checksums(tuple(x for _, x in leaves)))
    return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(c)]
            for (path, _), c in zip(leaves, sums, strict=True)}


def save(manager: ocp.CheckpointManager, step: int, *, state: Any, labels_args: Any,
         data_state: Any, meta: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
         force: bool = False) -> bool:
    """Saves one step (asynchronously: call ``manager.wait_until_finished()`` before exit).

    ``state`` is the train state ``{'params', 'opt_state', 'step', 'rng'}``, written as the items
    ``params``, ``opt_state`` and ``progress``. ``labels_args`` is
    ``roc_jax.labels.cache.save_args(cache)``; ``metrics`` (with ``dev/f1``) rank the step for
    best-checkpoint retention; steps without metrics are kept only as latest.
    """
    if set(state) != set(STATE_ITEMS):
        raise ValueError(f"a train state has the keys {sorted(STATE_ITEMS)}, got {sorted(state)}")
    args = ocp.args.Composite(
        **{item: ocp.args.StandardSave(part) for item, part in _by_item(state).items()},
        labels=labels_args,
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({**meta, "state_checksums": state_checksums(state)}),
    )
    return manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=force)


def _by_item(state: Mapping[str, Any]) -> dict[str, dict[str, Any] | Any]:
    """``{'params': params, 'opt_state': opt_state, 'progress': {'step', 'rng'}}`` of the keys of
    ``state`` (a full train state, or a part of one)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key not in STATE_ITEMS:
            raise ValueError(f"unknown train state key {key!r} (expected {sorted(STATE_ITEMS)})")
        item = STATE_ITEMS[key]
        if item == key:
            out[item] = value
        else:
            out.setdefault(item, {})[key] = value
    return out


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    where = f"{manager.directory}/{step}"
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except FileNotFoundError as e:
        raise CheckpointError(f"{where}: no meta item ({e}); not a roc_jax checkpoint") from None
    except Exception as e:  # an unparsable meta file
        raise UnreadableCheckpoint(
            f"checkpoint step {step} cannot be read: {where}/meta ({error_reason(e)}); saved "
            f"steps: {sorted(manager.all_steps())}", step) from e
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


def restore(manager: ocp.CheckpointManager, step: int, *, abstract_state: Mapping[str, Any],
            labels_restore_args: Any, with_data: bool = True) -> dict[str, Any]:
    """Restores the keys of ``abstract_state`` (onto its shapes and shardings), labels, meta and,
    with ``with_data``, the input iterator's state.

    ``abstract_state`` holds any of the train state's keys: all four to resume training,
    ``{'params'}`` to evaluate or predict (then no other state item is read, and a step without
    ``opt_state`` restores). Returns ``{'state', 'labels', 'meta'[, 'data']}``. Raises
    ``CheckpointError`` when an item the restore needs is not there (one line: which, and what
    still works), ``UnreadableCheckpoint`` naming the step, the item folder and the reason when
    an item's files cannot be read or do not match their checksums.
    """
    items = {"meta": ocp.args.JsonRestore(), "labels": labels_restore_args}
    if with_data:
        items["data"] = ocp.args.JsonRestore()
    out = {}
    for name, args in items.items():
        out[name] = _restore_item(manager, step, name,
                                  lambda n=name, a=args: manager.restore(
                                      step, args=ocp.args.Composite(**{n: a}))[n])
    folder = Path(str(manager.directory)) / str(step)
    old_layout = int(out["meta"].get("format_version", 1)) < 2
    if old_layout:
        out["state"] = _restore_item(manager, step, OLD_STATE_ITEM,
                                     lambda: _restore_old_state(folder, abstract_state))
    else:
        wanted = _by_item(abstract_state)
        missing = [item for item in wanted if not (folder / item).is_dir()]
        if missing:
            raise CheckpointError(_missing_message(folder, step, missing))
        state: dict[str, Any] = {}
        for item, target in wanted.items():
            part = _restore_item(manager, step, item, lambda i=item, t=target: manager.restore(
                step, args=ocp.args.Composite(**{i: ocp.args.StandardRestore(t)}))[i])
            if item in STATE_ITEMS:  # params, opt_state
                state[item] = part
            else:  # progress: step and rng
                state.update(part)
        out["state"] = state
    _verify(manager, step, out["state"], out["meta"].get("state_checksums"), old_layout)
    return out


def _restore_old_state(folder: Path, abstract_state: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``abstract_state`` from a format-1 step's ``state`` item."""
    wanted = dict(abstract_state)
    return ocp.PyTreeCheckpointer().restore(folder / OLD_STATE_ITEM, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True))


def _missing_message(folder: Path, step: int, missing: Sequence[str]) -> str:
    if missing == ["opt_state"]:
        return (f"checkpoint step {step} has no optimizer state ({folder}/opt_state is missing): "
                "it evaluates (eval.py, predict.py) but cannot resume training; train in a new "
                "--workdir, or from another step")
    return (f"checkpoint step {step} lacks the items {missing} (no folders {folder}/"
            f"{{{','.join(missing)}}}); it was written by another program or the folders were "
            "deleted")


def _verify(manager: ocp.CheckpointManager, step: int, state: Any,
            recorded: Mapping[str, Sequence[int]] | None, old_layout: bool) -> None:
    if recorded is None:  # written before checksums were recorded
        return
    for path, sums in state_checksums(state).items():
        if path in recorded and list(recorded[path]) != sums:
            key = path.split("]", 1)[0].strip("['")
            item = OLD_STATE_ITEM if old_layout else STATE_ITEMS.get(key, key)
            raise UnreadableCheckpoint(
                f"checkpoint step {step} cannot be read: {manager.directory}/{step}/{item} (the "
                f"data of {path} differs from the checksum recorded when it was saved: the files "
                f"are damaged); saved steps: {sorted(manager.all_steps())}", step)


def _restore_item(manager: ocp.CheckpointManager, step: int, item: str, read: Any) -> Any:
    try:
        return read()
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise UnreadableCheckpoint(
            f"checkpoint step {step} cannot be read: {manager.directory}/{step}/{item} "
            f"({error_reason(e)}); saved steps: {sorted(manager.all_steps())}", step) from e


def set_aside(manager: ocp.CheckpointManager, step: int) -> Path:
    """Moves an unreadable step out of the checkpoint folder, to ``<workdir>/unreadable_checkpoints/``
    (kept for inspection; a resumed run would otherwise skip saving that step again)."""
    directory = Path(str(manager.directory))
    target = directory.parent / "unreadable_checkpoints" / str(step)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(directory / str(step)), str(target))
    return target
