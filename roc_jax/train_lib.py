"""Training and evaluation: one jit-compiled, donated, data-parallel step; orbax checkpoints.

The model is handled in the functional NNX style: ``nnx.split`` once into a graph definition, the
float32 parameters and the rest (dropout RNG streams). ``train_step(state, batch, ...)`` and
``eval_step(params, batch, ...)`` are plain functions, jitted once per model structure and mesh
(``make_trainer``); the train step ``nnx.merge``s the pieces, reseeds dropout from
``fold_in(rng, step)`` (so a resumed run draws the same masks as an uninterrupted one), and
returns new parameters and optimizer state. The train state is a plain pytree
``{'params', 'opt_state', 'step', 'rng'}`` (``roc_jax.checkpoint`` saves it as separate items).
Batches are global arrays sharded on the mesh's 'data' axis and parameters are replicated, so XLA
inserts the gradient all-reduce; there is no pmap. The data sources come from
``roc_jax.data.sources``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from roc_jax import host_memory, parallel
from roc_jax import metrics as metrics_lib
from roc_jax.data import sources as sources_lib
from roc_jax.data import subsets
from roc_jax.losses import masked_xent, relation_to_pair_xent
from roc_jax.models.roc import ROC, is_pretrained_path

log = logging.getLogger("roc_jax")

State = dict[str, Any]


class NonFiniteError(FloatingPointError):
    """The loss or the gradient became NaN/inf; the message names the step."""


# ---------------------------------------------------------------------------------------------
# loss and optimizer


def lr_schedule(peak: float, total_steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warm-up to ``peak`` over ``warmup_ratio * total_steps``, then linear decay to 0."""
    warmup = int(round(warmup_ratio * total_steps))
    decay = optax.linear_schedule(peak, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_groups(params: Any) -> Any:
    """``'encoder'`` for the pretrained towers' parameters, ``'head'`` for the new layers."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "encoder" if is_pretrained_path(_path_names(p)) else "head", params)


@dataclasses.dataclass(frozen=True)
class OptSpec:
    """The optimizer's hyper-parameters (hashable: compiled steps are cached per spec)."""

    lr_encoder: float
    lr_head: float
    warmup_ratio: float
    weight_decay: float
    grad_clip: float
    total_steps: int

    @classmethod
    def from_config(cls, train_cfg: Any, total_steps: int) -> OptSpec:
        return cls(float(train_cfg.lr_encoder), float(train_cfg.lr_head),
                   float(train_cfg.warmup_ratio), float(train_cfg.weight_decay),
                   float(train_cfg.grad_clip), int(total_steps))


def make_optimizer(spec: OptSpec) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """AdamW with two learning rates (encoders / new layers), warm-up + decay, global clipping.

    Weight decay skips biases, norm scales and the temperature (every parameter with ndim < 2).
    """
    schedules = {
        "encoder": lr_schedule(spec.lr_encoder, spec.total_steps, spec.warmup_ratio),
        "head": lr_schedule(spec.lr_head, spec.total_steps, spec.warmup_ratio),
    }

    def decay_mask(p):
        return jax.tree.map(lambda x: x.ndim >= 2, p)

    adam = {name: optax.adamw(s, weight_decay=spec.weight_decay, mask=decay_mask)
            for name, s in schedules.items()}
    tx = optax.chain(optax.clip_by_global_norm(spec.grad_clip),
                     optax.multi_transform(adam, param_groups))
    return tx, schedules


# ---------------------------------------------------------------------------------------------
# state and compiled steps


def train_step(state: State, batch: Mapping[str, jax.Array], relations: Mapping[str, jax.Array],
               rest: Any, *, graphdef: Any, tx: optax.GradientTransformation,
               relation_to_pair_weight: float = 0.0) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step on a global ``batch`` (docs/architecture.md, "Batch", ``[B, ...]``).

    ``state`` is ``{'params', 'opt_state', 'step' int32[], 'rng' uint32[2]}``; ``relations`` the
    replicated ``{'embeddings' [R, K, Dd], 'mask' [R, K]}`` description input; ``rest`` the
    model's non-parameter state (dropout RNG streams) and ``graphdef`` its train-mode structure.
    The loss is the cross-entropy over the relations (pair to relation), plus
    ``relation_to_pair_weight`` times the other direction (``losses.relation_to_pair_xent``).
    Returns the new state and ``{'loss', 'accuracy', 'grad_norm', 'param_norm'}`` (scalars).
    """
    # Dropout keys depend on (seed, step) only: resumed runs draw the same masks.
    seeded = nnx.merge(graphdef, state["params"], rest, copy=True)
    nnx.reseed(seeded, dropout=jax.random.fold_in(state["rng"], state["step"]))
    _, _, step_rest = nnx.split(seeded, nnx.Param, ...)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, step_rest, copy=True)
        logits, _ = model(batch, relations)
        loss, acc = masked_xent(logits, batch["label"], batch["mask"])
        if relation_to_pair_weight:
            loss = loss + relation_to_pair_weight * relation_to_pair_xent(
                logits, batch["label"], batch["mask"])
        return loss, acc

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    metrics = {"loss": loss, "accuracy": acc, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params)}
    return new_state, metrics


def eval_step(params: Any, batch: Mapping[str, jax.Array], relations: Mapping[str, jax.Array],
              rest: Any, *, graphdef: Any) -> dict[str, jax.Array]:
    """Predictions of the eval-mode model (``graphdef``) on a global ``batch``: ``{'pred' int32
    [B], 'logits' float32 [B, R]}``."""
    model = nnx.merge(graphdef, params, rest, copy=True)
    logits, _ = model(batch, relations)
    return {"pred": jnp.argmax(logits, -1).astype(jnp.int32), "logits": logits}


@dataclasses.dataclass
class Trainer:
    """One model's jitted ``train_step`` / ``eval_step`` on one mesh, with the pieces they need.

    ``train_step(state, batch, relations)`` donates ``state``; ``eval_step(params, batch,
    relations)``. A trainer built for evaluation only (``make_evaluator``) has no optimizer:
    ``tx`` is None and ``train_step`` raises.
    """

    graphdef_train: Any
    graphdef_eval: Any
    rest: Any
    mesh: jax.sharding.Mesh
    tx: optax.GradientTransformation | None
    schedules: dict[str, optax.Schedule]
    jit_train: Callable[..., tuple[State, dict[str, jax.Array]]] | None
    jit_eval: Callable[..., dict[str, jax.Array]]

    def train_step(self, state: State, batch: Mapping[str, jax.Array],
                   relations: Mapping[str, jax.Array]) -> tuple[State, dict[str, jax.Array]]:
        if self.jit_train is None:
            raise RuntimeError("this Trainer was built for evaluation only (no optimizer)")
        return self.jit_train(state, batch, relations, self.rest)

    def eval_step(self, params: Any, batch: Mapping[str, jax.Array],
                  relations: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return self.jit_eval(params, batch, relations, self.rest)

    def abstract_state(self, state_like: State) -> State:
        """Shapes, dtypes and (replicated) shardings of a state: the orbax restore target."""
        rep = parallel.replicated(self.mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            state_like)

    def model(self, params: Any, train: bool = False) -> ROC:
        """The NNX model with ``params`` (for inference and tests)."""
        return nnx.merge(self.graphdef_train if train else self.graphdef_eval, params, self.rest)


def split_model(model: ROC) -> tuple[Any, Any, Any, Any]:
    """``(graphdef_train, graphdef_eval, params, rest)``; the two graphdefs differ only in the
    dropout mode, their states are identical."""
    model.train()
    gdef_train, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    gdef_eval, _, _ = nnx.split(model, nnx.Param, ...)
    return gdef_train, gdef_eval, params, rest


@functools.lru_cache(maxsize=8)
def _jit_eval(gdef_eval: Any, mesh: jax.sharding.Mesh) -> Callable[..., dict[str, jax.Array]]:
    """``eval_step`` jitted for a model structure and mesh. Cached (as ``_jit_train``), so that a
    second run in the same process (a resumed run, a notebook re-run, the tests) reuses the
    compiled executables instead of compiling again."""
    return jax.jit(functools.partial(eval_step, graphdef=gdef_eval),
                   out_shardings=parallel.replicated(mesh))


@functools.lru_cache(maxsize=8)
def _jit_train(gdef_train: Any, spec: OptSpec, mesh: jax.sharding.Mesh,
               relation_to_pair_weight: float = 0.0
               ) -> tuple[Callable[..., tuple[State, dict[str, jax.Array]]],
                          optax.GradientTransformation, dict[str, optax.Schedule]]:
    """``train_step`` jitted for a model structure, optimizer spec, mesh and loss weight; its
    optimizer."""
    tx, schedules = make_optimizer(spec)
    rep = parallel.replicated(mesh)
    # The state stays replicated; donating it lets XLA update parameters and moments in place.
    jitted = jax.jit(functools.partial(train_step, graphdef=gdef_train, tx=tx,
                                       relation_to_pair_weight=relation_to_pair_weight),
                     donate_argnums=(0,), out_shardings=(rep, rep))
    return jitted, tx, schedules


def make_trainer(model: ROC, train_cfg: Any, total_steps: int, mesh: jax.sharding.Mesh,
                 seed: int = 0) -> tuple[Trainer, State]:
    """Splits ``model``, builds the optimizer and the jitted steps; returns the initial state
    ``{'params', 'opt_state', 'step', 'rng'}`` (replicated on ``mesh``)."""
    gdef_train, gdef_eval, params, rest = split_model(model)
    weight = float(train_cfg.get("relation_to_pair_weight", 0.0))
    if weight and model.config.head != "retrieval" and not train_cfg.get(
            "softmax_relation_to_pair", False):
        # The baseline stays the plain softmax head, whatever the retrieval default is.
        log.info("train.relation_to_pair_weight=%s is the retrieval head's; the %s head trains "
                 "with the cross-entropy alone (train.softmax_relation_to_pair=True adds it)",
                 weight, model.config.head)
        weight = 0.0
    jit_train, tx, schedules = _jit_train(gdef_train, OptSpec.from_config(train_cfg, total_steps),
                                          mesh, weight)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(seed),  # raw uint32[2]: a plain array orbax saves as is
    }
    # Fresh copies (the state is donated to the step, so it must not share buffers with the
    # model's own arrays), placed on every process's devices.
    state = parallel.replicate(state, mesh)
    rest = parallel.replicate(rest, mesh)
    trainer = Trainer(gdef_train, gdef_eval, rest, mesh, tx, schedules, jit_train,
                      _jit_eval(gdef_eval, mesh))
    return trainer, state


def make_evaluator(model: ROC, mesh: jax.sharding.Mesh) -> tuple[Trainer, State]:
    """``make_trainer`` without an optimizer (evaluation, prediction): the trainer has only its
    ``eval_step``, and the state is ``{'params'}`` (replicated on ``mesh``)."""
    gdef_train, gdef_eval, params, rest = split_model(model)
    trainer = Trainer(gdef_train, gdef_eval, parallel.replicate(rest, mesh), mesh, None, {}, None,
                      _jit_eval(gdef_eval, mesh))
    return trainer, parallel.replicate({"params": params}, mesh)


def check_finite(history: Sequence[Mapping[str, np.ndarray]], first_step: int) -> None:
    """Raises ``NonFiniteError`` naming the first step whose loss or gradient norm is not finite.

    ``history[i]`` holds the host copies of the metrics of step ``first_step + i``.
    """
    for i, m in enumerate(history):
        for key in ("loss", "grad_norm"):
            if not np.isfinite(m[key]):
                raise NonFiniteError(
                    f"non-finite {key} ({float(m[key])}) at step {first_step + i}: lower the "
                    "learning rate (train.lr_*), check the inputs, or use model.dtype=float32")


def evaluate(trainer: Trainer, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
             relations: Mapping[str, jax.Array], label_names: Sequence[str]) -> dict:
    """Runs the eval step over padded batches; padding rows (``mask`` False) are excluded.

    Returns ``metrics.evaluate``'s dict (micro P/R/F1 without None, accuracy, per relation,
    confusion). One host sync per batch (the predictions are needed on the host anyway).
    """
    acc = metrics_lib.Accumulator()
    with jax.set_mesh(trainer.mesh):
        for batch in batches:
            sharded = parallel.shard_batch(batch, trainer.mesh)
            out = trainer.eval_step(params, sharded, relations)
            # Every host counts the global batch (all hosts' rows), so all return the same
            # metrics; each passed only its own rows, padding (mask False) included.
            rows = _to_host({"label": sharded["label"], "pred": out["pred"],
                             "mask": sharded["mask"]})
            acc.add(rows["label"], rows["pred"], rows["mask"])
    return acc.result(label_names)


def _to_host(tree: Any) -> Any:
    """Global arrays -> host numpy arrays of their global value, on every process.

    Data-sharded arrays span the hosts' devices, so several processes gather them (one
    collective for the whole tree); on one process this is ``device_get``.
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))


class Timer:
    """Examples per second between log steps (wall clock on the host)."""

    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def rate(self) -> float:
        now = time.perf_counter()
        r = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return r


class Progress:
    """The training bar: epoch, loss, examples/s and an ETA from the median of the last 50 step
    times, so that the steps that compile (the first of each batch shape) stay out of it."""

    def __init__(self, total: int, initial: int, steps_per_epoch: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.steps_per_epoch, self.epochs = steps_per_epoch, -(-total // steps_per_epoch)
        self.recent: collections.deque[float] = collections.deque(maxlen=50)
        self.last = time.perf_counter()
        self.bar = tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                        dynamic_ncols=True, desc=self._epoch(initial),
                        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}{postfix}]")

    def _epoch(self, step: int) -> str:
        """The epoch of the step just done (``step`` steps done)."""
        return f"epoch {min(max(step - 1, 0) // self.steps_per_epoch + 1, self.epochs)}/{self.epochs}"

    def update(self, step: int) -> None:
        now = time.perf_counter()
        self.recent.append(now - self.last)
        self.last = now
        self.bar.set_description_str(self._epoch(step), refresh=False)
        self.bar.update(1)

    def set_postfix(self, **values: str) -> None:
        left = self.bar.total - self.bar.n
        eta = float(np.median(self.recent)) * left if self.recent else float("nan")
        eta_text = f"{eta / 60:.0f} min" if eta >= 60 else f"{eta:.0f} s"
        self.bar.set_postfix(collections.OrderedDict([*values.items(), ("eta", eta_text)]))

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# pipeline config and descriptions


def pipeline_config(config: Any, image_spec: Any) -> Any:
    from roc_jax.data.pipeline import PipelineConfig

    return PipelineConfig(max_len=config.data.max_len, marker_style=config.data.marker_style,
                          buckets=tuple(config.data.buckets), use_images=config.data.use_images,
                          image_spec=image_spec, num_workers=config.data.num_workers)


def build_description_cache(config: Any, built: Any, label_names: Sequence[str]) -> Any:
    """Encodes the relation descriptions once with the (frozen) description encoder."""
    from roc_jax.labels import cache as cache_lib
    from roc_jax.labels import descriptions as desc_lib

    path = config.data.descriptions or None
    if path is None and config.data.dataset != "mnre":
        raise FileNotFoundError(f"config.data.descriptions is empty and no descriptions file "
                                f"ships for {config.data.dataset!r}: generate one "
                                "(roc_jax.labels.generate) and pass its path")
    descriptions = desc_lib.load_descriptions(path, list(label_names))
    encoder = built.description_encoder
    encoder.eval()
    encode_fn = cache_lib.text_encode_fn(encoder, built.description_tokenizer)
    return cache_lib.ensure_cache(None, descriptions, list(label_names), encode_fn,
                                  cache_lib.encoder_params(encoder))


def _same_on_every_host(cache: Any) -> Any:
    """Process 0's description cache on every process (the cache itself with one process).

    Every host encodes the same texts with the same parameters; a fingerprint that differs means
    a host read another descriptions file (an error), and the broadcast makes the embeddings
    bitwise process 0's, which are also what the checkpoint holds (orbax writes host arrays
    from process 0).
    """
    if jax.process_count() == 1:
        return cache
    from jax.experimental import multihost_utils

    digest = np.frombuffer(bytes.fromhex(cache.fingerprint), np.uint8)
    multihost_utils.assert_equal(digest, "the description cache's fingerprint differs between "
                                 "hosts: every host must read the same descriptions and labels")
    arrays = multihost_utils.broadcast_one_to_all({"embeddings": cache.embeddings,
                                                   "mask": cache.mask.astype(np.uint8)})
    return dataclasses.replace(cache, embeddings=np.asarray(arrays["embeddings"], np.float32),
                               mask=np.asarray(arrays["mask"]).astype(np.bool_))


def relations_input(config: Any, cache: Any, tokenizer: Any | None = None) -> dict[str, np.ndarray]:
    """The model's ``relations`` argument from the cache (and, when the description tower is
    trained, the tokenized description texts ``[R*K, Ld]``)."""
    rel = {"embeddings": np.asarray(cache.embeddings, np.float32),
           "mask": np.asarray(cache.mask, bool)}
    if config.model.train_description_tower:
        r, k = rel["mask"].shape
        flat = [cache.texts[i][j] if j < len(cache.texts[i]) else ""
                for i in range(r) for j in range(k)]
        enc = tokenizer(flat, padding="max_length", truncation=True,
                        max_length=config.model.description_max_len, return_tensors="np")
        rel["input_ids"] = enc["input_ids"].astype(np.int32)
        rel["attention_mask"] = enc["attention_mask"].astype(np.int32)
    return rel


# ---------------------------------------------------------------------------------------------
# the experiment


@dataclasses.dataclass
class Experiment:
    """Everything built from a config: model pieces, label set, description cache, trainer."""

    config: Any
    label_names: list[str]
    built: Any
    cache: Any
    trainer: Trainer
    state: State
    relations: dict[str, jax.Array]
    pipeline_cfg: Any
    restored: dict[str, Any] | None  # what was restored from a checkpoint (None: fresh start)


def _check_batch_sizes(config: Any, mesh: jax.sharding.Mesh) -> None:
    n = parallel.global_batch_multiple(mesh)
    for key in ("batch_size", "eval_batch_size"):
        value = config.train[key]
        if value % n:
            raise ValueError(f"config.train.{key}={value} is not a multiple of the {n} devices: "
                             f"use a multiple of {n}")


def setup(config: Any, workdir: str | Path | None, *, mesh: jax.sharding.Mesh | None = None,
          total_steps: int = 1, restore: str | int | None = "latest",
          label_names: Sequence[str] | None = None, with_optimizer: bool = True) -> Experiment:
    """Builds the model and, when ``workdir`` holds a checkpoint, restores it.

    ``restore``: ``'latest'`` (resume), ``'best'``, a step, or None (never restore). A restored
    run takes its description cache from the checkpoint (no re-encoding); a fresh one encodes it.
    ``label_names`` defaults to the raw folder's label file; restoring checks that they match.
    With ``'latest'``, a step that cannot be read is moved to ``unreadable_checkpoints/`` and the
    next older one is restored, with one warning; other choices raise
    ``checkpoint.UnreadableCheckpoint``. ``with_optimizer=False`` (evaluation, prediction)
    builds no optimizer and reads only the parameters (``make_evaluator``): ``state`` is
    ``{'params'}`` and the trainer has no ``train_step``.
    """
    mesh = mesh or parallel.make_mesh()
    _check_batch_sizes(config, mesh)
    from roc_jax import checkpoint as ckpt
    from roc_jax.models.roc import create_model

    if label_names is None:
        label_names = sources_lib.label_names_of(config)
    label_names = list(label_names)
    manager = None
    candidates: list[int] = []
    if workdir is not None and restore is not None:
        manager = ckpt.make_manager(workdir, read_only=True) if \
            (Path(workdir) / "checkpoints").exists() else None
        if manager is not None and manager.latest_step() is not None:
            candidates = sorted(manager.all_steps(), reverse=True) if restore == "latest" \
                else [ckpt.select_step(manager, restore)]
    built = create_model(config.model, use_images=config.data.use_images,
                         num_relations=len(label_names), seed=config.seed)
    if built.random_init:
        log.warning("model.random_init=True: RANDOM text/image encoders (tests and smoke runs "
                    "only; the scores mean nothing)")
    if with_optimizer:
        trainer, state = make_trainer(built.model, config.train, total_steps, mesh,
                                      seed=config.seed)
    else:
        trainer, state = make_evaluator(built.model, mesh)
    restored = None
    from roc_jax.labels import cache as cache_lib

    try:
        if candidates:
            restored = _restore_newest(manager, candidates, trainer.abstract_state(state),
                                       config, label_names, with_data=with_optimizer)
    finally:  # also on a failed restore: an open manager's threads outlive the error message
        if manager is not None:
            manager.close()
    if restored is not None:
        step = restored["step"]
        state = restored["state"]
        cache = cache_lib.from_restored(restored["labels"])
        if list(cache.names) != label_names:
            raise ckpt.CheckpointError(f"{manager.directory}/{step}: the description cache's "
                                       "relations differ from the checkpoint's label set")
        log.info("restored %s step %d", manager.directory, step)
    else:
        cache = _same_on_every_host(build_description_cache(config, built, label_names))
    rel = relations_input(config, cache, built.description_tokenizer)
    return Experiment(config, label_names, built, cache, trainer, state,
                      parallel.replicate(rel, mesh), pipeline_config(config, built.image_spec),
                      restored)


def _restore_newest(manager: Any, candidates: Sequence[int], abstract_state: State, config: Any,
                    label_names: Sequence[str], with_data: bool) -> dict[str, Any]:
    """Restores the first of ``candidates`` (steps, newest first) that reads; earlier ones that
    do not are set aside with one warning. Raises when none reads, or a checkpoint holds another
    model or label set (that is no damage: the user must choose)."""
    from roc_jax import checkpoint as ckpt
    from roc_jax.labels import cache as cache_lib

    bad: list[ckpt.UnreadableCheckpoint] = []
    for step in candidates:
        try:
            meta = ckpt.read_meta(manager, step)
            ckpt.check_meta(meta, config=config, label_names=label_names,
                            where=f"{manager.directory}/{step}")
            restored = ckpt.restore(manager, step, abstract_state=abstract_state,
                                    labels_restore_args=cache_lib.restore_args(),
                                    with_data=with_data)
        except ckpt.UnreadableCheckpoint as e:
            if len(candidates) == 1:
                raise
            bad.append(e)
            continue
        for e in bad:
            moved = ckpt.set_aside(manager, e.step) if jax.process_index() == 0 else None
            log.warning("%s; resuming from step %d instead (step %d moved to %s)", e, step,
                        e.step, moved)
        restored["step"] = step
        return restored
    raise ckpt.CheckpointError(
        f"no checkpoint in {manager.directory} can be read: " + "; ".join(str(e) for e in bad)
        + f". Delete {manager.directory} to train from scratch")


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size  # training drops the remainder (a random choice each epoch)


def train_and_evaluate(config: Any, workdir: str | Path, *,
                       mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint when there is one.

    Evaluates on ``config.data.eval_split`` every ``train.eval_every_epochs`` epochs and saves a
    checkpoint there (ranked by dev micro-F1), plus every ``train.checkpoint_every`` steps and at
    the end. ``train.max_steps > 0`` stops early without changing the schedule (the learning rate
    follows ``num_epochs``), so a stopped and resumed run equals an uninterrupted one.

    Returns ``{'step', 'dev': last dev metrics or None, 'best_step'}``.
    """
    from roc_jax import checkpoint as ckpt
    from roc_jax import writers
    from roc_jax.data import pipeline

    if parallel.initialize_distributed(config.distributed) and jax.process_index() != 0:
        log.setLevel(logging.WARNING)  # process 0 logs the run; the others only their problems
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or parallel.make_mesh()
    _check_batch_sizes(config, mesh)
    log.info("host memory: %s", host_memory.huge_pages_status())
    label_names = sources_lib.label_names_of(config)
    sources = sources_lib.load_sources(config, [config.data.train_split, config.data.eval_split])
    unseen = subsets.unseen_relation_ids(config.data.unseen_relations, label_names)
    sources[config.data.train_split], kept = subsets.subset_source(
        sources[config.data.train_split], fraction=config.data.train_fraction,
        seed=config.data.subset_seed, unseen_ids=unseen)
    if kept["kept"] != kept["records"]:
        log.info("training protocol (data.train_fraction=%s, data.unseen_relations=%s): %s",
                 config.data.train_fraction, list(config.data.unseen_relations), kept)
    steps_per_epoch = _steps_per_epoch(len(sources[config.data.train_split]),
                                       config.train.batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(sources[config.data.train_split])} training samples make no "
                         f"batch of {config.train.batch_size}")
    total = steps_per_epoch * config.num_epochs
    exp = setup(config, workdir, mesh=mesh, total_steps=total, label_names=label_names)
    tokenizer = exp.built.tokenizer
    train_it = pipeline.make_train_iterator(sources[config.data.train_split], tokenizer,
                                            exp.pipeline_cfg, seed=config.seed,
                                            batch_size=config.train.batch_size)
    assert train_it.steps_per_epoch == steps_per_epoch, (train_it.steps_per_epoch, steps_per_epoch)
    eval_batches = pipeline.make_eval_batches(sources[config.data.eval_split], tokenizer,
                                              exp.pipeline_cfg, config.train.eval_batch_size)
    train_relations = _without_relations(exp.relations, unseen, mesh)
    state = exp.state
    if exp.restored is not None:
        train_it.set_state(exp.restored["data"])
    step = int(jax.device_get(state["step"]))
    if exp.restored is not None and step != exp.restored["step"]:
        raise ckpt.CheckpointError(f"checkpoint step {exp.restored['step']} holds state step {step}")

    manager = ckpt.make_manager(workdir)
    meta = ckpt.make_meta(config, label_names, {"steps_per_epoch": steps_per_epoch,
                                                "total_steps": total,
                                                "data_fingerprint": sources_lib.data_fingerprint(config)})
    labels_args = _labels_save_args(exp.cache)
    is_main = jax.process_index() == 0
    writer = writers.create_default_writer(workdir, enabled=is_main)
    if exp.restored is None:
        writer.write_hparams(config.to_dict())
    stop = total if config.train.max_steps <= 0 else min(total, config.train.max_steps)
    log.info("training %d steps (%d per epoch, %d epochs) from step %d on %d devices",
             total, steps_per_epoch, config.num_epochs, step, mesh.devices.size)

    saving: list[int] = []  # the step whose (asynchronous) save may still be running

    def save(metrics: dict[str, float] | None = None) -> None:
        if step in manager.all_steps():
            return
        _finish_saves(manager, saving, step)  # a failure of the previous save shows here
        try:
            ckpt.save(manager, step, state=state, labels_args=labels_args,
                      data_state=train_it.get_state(), meta=meta, metrics=metrics, force=True)
        except Exception as e:
            raise _save_failed(manager, step, step, e) from e
        saving.append(step)

    pending: list[dict[str, jax.Array]] = []
    inflight: collections.deque[jax.Array] = collections.deque()
    timer = Timer()
    dev: dict[str, Any] | None = None
    bar = Progress(stop, step, steps_per_epoch, enabled=config.train.progress_bar and is_main)
    sigterm = _Preemption(step)
    failed = False
    try:
        with jax.set_mesh(mesh):
            while step < stop:
                batch = next(train_it)
                state, out = exp.trainer.train_step(state, parallel.shard_batch(batch, mesh),
                                                    train_relations)
                pending.append(out)
                # Bound JAX's asynchronous run-ahead: without it the host enqueues every step up
                # to the next log step, and each queued step pins its batch in memory. Waiting
                # for the step `max_steps_in_flight` back keeps the device busy (the newer steps
                # are queued) and transfers nothing to the host.
                inflight.append(out["loss"])
                if len(inflight) > config.train.max_steps_in_flight > 0:
                    inflight.popleft().block_until_ready()
                step += 1
                timer.add(config.train.batch_size)
                bar.update(step)
                if step % config.train.log_every == 0 or step == stop:
                    _log_step(writer, bar, pending, step, exp.trainer, timer)
                    pending = []
                epoch_end = step % steps_per_epoch == 0
                if epoch_end and (step // steps_per_epoch) % config.train.eval_every_epochs == 0:
                    if pending:  # a non-finite loss must stop before it is saved
                        _log_step(writer, bar, pending, step, exp.trainer, timer)
                        pending = []
                    dev = evaluate(exp.trainer, state["params"], eval_batches, exp.relations,
                                   label_names)
                    if is_main:  # the full report (per relation, confusion) of every eval
                        metrics_lib.write_json({**dev, "step": step},
                                               workdir / "dev_metrics" / f"step_{step}.json")
                    scalars = metrics_lib.merge_prefixed("dev", dev)
                    writer.write_scalars(step, {**scalars, "epoch": step / steps_per_epoch})
                    writer.flush()
                    log.info("step %d dev: P %.4f R %.4f F1 %.4f acc %.4f", step,
                             dev["precision"], dev["recall"], dev["f1"], dev["accuracy"])
                    save({ckpt.BEST_METRIC: dev["f1"]})
                elif step % config.train.checkpoint_every == 0 or step == stop:
                    if pending:
                        _log_step(writer, bar, pending, step, exp.trainer, timer)
                        pending = []
                    save()
                if sigterm.reached(step) and step < stop:
                    # Preemption (a TPU VM, a cluster scheduler): save this step and stop.
                    if pending:
                        _log_step(writer, bar, pending, step, exp.trainer, timer)
                        pending = []
                    save()
                    _finish_saves(manager, saving, step)
                    log.warning("SIGTERM at step %d: saved a checkpoint; run the same command to "
                                "resume", step)
                    raise Preempted(f"stopped by SIGTERM at step {step} of {stop}; checkpoint "
                                    f"saved in {manager.directory}: run the same command to "
                                    "resume")
    except KeyboardInterrupt:
        # Ctrl-C: keep the work done so far (no check of unlogged steps is skipped: a step is
        # saved only after its metrics passed the finiteness check).
        if jax.process_count() > 1:
            # Ctrl-C reaches the processes at different steps, so they cannot save one step
            # together; SIGTERM can (the preemption service), tools/launch_local.py sends it.
            log.warning("interrupted at step %d: not saving (one of several processes); the "
                        "latest checkpoint is step %s", step, manager.latest_step())
            raise
        log.warning("interrupted at step %d: saving a checkpoint before exiting", step)
        try:
            if pending:
                _log_step(writer, bar, pending, step, exp.trainer, timer)
            save()
        except RuntimeError as e:  # interrupted inside the step call: its input was donated
            log.warning("could not save step %d (%s); the latest checkpoint is step %s", step, e,
                        manager.latest_step())
        raise
    except BaseException:
        failed = True
        raise
    finally:
        sigterm.restore()
        bar.close()
        try:
            _finish_saves(manager, saving, step)
        except ckpt.CheckpointSaveError as e:
            if not failed:
                raise
            log.error("%s", e)  # the exception already on its way matters more
        finally:
            manager.close()
        writer.close()
        train_it.close()
    return {"step": step, "dev": dev, "best_step": _best_step(workdir)}


class Preempted(Exception):
    """Training stopped on SIGTERM after saving its step; rerunning resumes it."""


class _Preemption:
    """SIGTERM, checked between steps. With one process a Python handler notes the signal. With
    several, jax's preemption service (started by ``jax.distributed.initialize``) catches SIGTERM
    on any host and names a step at which every host stops, so that they save that step
    together; it needs ``reached(step)`` called at every step on every host, and once with the
    first step (here), since it names the step after the last one it was told of."""

    def __init__(self, step: int) -> None:
        self._flag = _SignalFlag(signal.SIGTERM) if jax.process_count() == 1 else None
        if self._flag is None:
            self.reached(step)

    def reached(self, step: int) -> bool:
        if self._flag is not None:
            return self._flag.received
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)

    def restore(self) -> None:
        if self._flag is not None:
            self._flag.restore()


class _SignalFlag:
    """Notes that ``signum`` arrived (from the main thread only); ``restore`` puts the previous
    handler back. The loop checks ``received`` between steps, so no step is cut in half."""

    def __init__(self, signum: int):
        self.signum, self.received, self.previous = signum, False, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: stopping after this step", signum)
        self.received = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(self.signum, self.previous)
            self.previous = None


def _finish_saves(manager: Any, saving: list[int], step: int) -> None:
    """Waits for the asynchronous save of ``saving[-1]``; raises ``CheckpointSaveError`` if it
    failed (orbax reports a failed write only when it is waited for)."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _save_failed(manager, saving[-1] if saving else step, step, e) from e


def _save_failed(manager: Any, saved: int, step: int, error: BaseException) -> Exception:
    from roc_jax import checkpoint as ckpt

    manager.reload()
    intact = sorted(s for s in manager.all_steps() if s != saved)
    return ckpt.CheckpointSaveError(
        f"saving checkpoint step {saved} to {manager.directory} failed "
        f"({ckpt.error_reason(error)}): training stopped at step {step}. The checkpoints saved "
        f"before are intact (steps {intact}): free disk space or fix the folder's permissions, "
        "then run the same command to resume")


def _without_relations(relations: dict[str, jax.Array], ids: Sequence[int],
                       mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """``relations`` with the descriptions of ``ids`` masked out: those relations score
    ``NO_DESCRIPTION_SCORE``, so they are no candidates (zero-shot training)."""
    if not ids:
        return relations
    mask = np.asarray(jax.device_get(relations["mask"])).copy()
    mask[list(ids)] = False
    return {**relations, "mask": parallel.replicate(mask, mesh)}


def _best_step(workdir: Path) -> int | None:
    from roc_jax import checkpoint as ckpt

    m = ckpt.make_manager(workdir, read_only=True)
    try:
        return m.best_step()
    finally:
        m.close()


def _labels_save_args(cache: Any) -> Any:
    from roc_jax.labels import cache as cache_lib

    return cache_lib.save_args(cache)


def _log_step(writer: Any, bar: Any, pending: list[dict[str, jax.Array]], step: int,
              trainer: Trainer, timer: Timer) -> None:
    """The one host sync of the loop: fetch the metrics since the last log, check, write."""
    host = jax.device_get(pending)
    check_finite(host, step - len(host) + 1)
    scalars = {f"train/{k}": float(np.mean([h[k] for h in host])) for k in host[0]}
    scalars["train/examples_per_sec"] = timer.rate()
    for name, sched in trainer.schedules.items():
        scalars[f"train/lr_{name}"] = float(sched(step - 1))
    writer.write_scalars(step, scalars)
    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", ex_s=f"{scalars['train/examples_per_sec']:.1f}")
