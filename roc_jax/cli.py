"""Command-line entry points: ``roc-train``, ``roc-eval``, ``roc-predict`` (and train.py, eval.py,
predict.py at the repository root, which call these).

    python train.py --config configs/mnre.py:offline --workdir workdirs/mnre --config.num_epochs=1
    python eval.py --workdir workdirs/mnre [--split val] [--checkpoint best|latest|STEP]
    python predict.py --workdir workdirs/mnre \\
        --text "[[Rafael Nadal]] gets engaged to [[Mery Perello]]" [--image post.jpg] [--json]

Configs are Python files with ``get_config(arg)`` (ml_collections); ``--config.x.y=value``
overrides a field, and an unknown field is an error (the config is locked).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from absl import app, flags

FLAGS = flags.FLAGS


def _define_common() -> None:
    if "workdir" not in FLAGS:
        flags.DEFINE_string("workdir", None, "The run's folder (checkpoints, metrics, logs).")


def _setup_logging() -> None:
    # Our progress at INFO; orbax / absl chatter (per-file throughput lines) only from WARNING.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("roc_jax").setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------


def _train(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup_logging()
    from roc_jax import train_lib

    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    from roc_jax import checkpoint as ckpt

    try:
        result = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except train_lib.Preempted as e:
        sys.exit(f"{e}")  # status 1: the run is not finished
    except ckpt.CheckpointError as e:  # a failed save, a workdir of another model, ...
        sys.exit(f"error: {e}")
    dev = result["dev"]
    import jax

    if dev is not None and jax.process_index() == 0:  # one line per run, not per host
        print(f"step {result['step']}: dev micro-F1 {dev['f1']:.4f} (P {dev['precision']:.4f} "
              f"R {dev['recall']:.4f}) accuracy {dev['accuracy']:.4f}; best step "
              f"{result['best_step']}")


def _load_config_file(spec: str):
    """``path/to/config.py[:arg]`` -> ``get_config(arg)`` (what config_flags does)."""
    import importlib.util

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("roc_config", path)
    if module_spec is None or not Path(path).is_file():
        raise app.UsageError(f"--config={spec}: config file {path} not found")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def unknown_override_message(argv: list[str], flag_name: str = "config") -> str | None:
    """Names the first ``--config.a.b=...`` override whose field does not exist, with the fields
    that do; None when every override names a field."""
    spec = None
    for i, a in enumerate(argv):
        if a.startswith(f"--{flag_name}="):
            spec = a.split("=", 1)[1]
        elif a == f"--{flag_name}" and i + 1 < len(argv):
            spec = argv[i + 1]
    if spec is None:
        return None
    config = _load_config_file(spec)
    prefix = f"--{flag_name}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        path = arg[len(prefix):].split("=", 1)[0]
        node = config
        parts = path.split(".")
        for i, key in enumerate(parts):
            keys = list(node.keys()) if hasattr(node, "keys") else []
            if key not in keys:
                where = ".".join(parts[:i]) or "the config"
                return (f"{arg}: unknown config field '{path}' ({spec}); fields of {where}: "
                        f"{', '.join(sorted(keys))}")
            node = node[key]
    return None


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """absl parsing, with a clear error for a ``--config.x=...`` override of an unknown field
    (ml_collections raises a bare ``AttributeError: 'x'`` there)."""
    try:
        return flag_values(argv)
    except (AttributeError, KeyError, flags.Error) as e:
        message = unknown_override_message(argv)
        if message is None:
            raise
        raise app.UsageError(message) from e


def _app_flags_parser(argv: list[str]) -> list[str]:
    try:
        return parse_flags(argv)
    except app.UsageError as e:
        sys.exit(f"FATAL Flags parsing error: {e}")


def train_main() -> None:
    """``roc-train`` / ``python train.py``."""
    from ml_collections import config_flags

    _define_common()
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mnre.py:offline.",
                                    lock_config=True)
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_train, flags_parser=_app_flags_parser)


# ---------------------------------------------------------------------------------------------


def _load_or_exit(workdir: str, checkpoint: str, **kwargs):
    """``inference.load``; a checkpoint that is missing or unreadable ends the program with its
    one-line message (exit status 1), not a traceback."""
    from roc_jax import checkpoint as ckpt
    from roc_jax import inference

    previous = sys.unraisablehook
    sys.unraisablehook = _without_closed_loop_noise(previous)
    try:
        loaded = inference.load(workdir, checkpoint=checkpoint, **kwargs)
    except ckpt.UnreadableCheckpoint as e:
        _exit_after_failed_read(f"error: {e}; choose one with --checkpoint N")
    except ckpt.CheckpointError as e:
        _exit_after_failed_read(f"error: {e}")
    sys.unraisablehook = previous
    return loaded


def _exit_after_failed_read(message: str) -> None:
    """Prints ``message`` to stderr and ends the process with status 1 at once (``os._exit``).

    Why not ``sys.exit``: the reads that orbax abandoned when one of them failed are still
    pending, and a normal interpreter exit collects them, which prints late noise after the
    message: ``RuntimeWarning: coroutine ... was never awaited`` or asyncio's "Task exception was
    never retrieved" with the read's traceback. Nothing is left to save on this path (the load
    failed before any output was written), so skipping the exit handlers loses nothing."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)


def _without_closed_loop_noise(hook):
    """``hook`` less one message: when tensorstore fails to read a damaged checkpoint, orbax
    closes its asyncio loop while reads are still completing, and each late completion reaches
    ``sys.unraisablehook`` as ``RuntimeError('Event loop is closed')``, which Python would print
    with a traceback around the one-line error. Every other unraisable error goes to ``hook``."""
    def filtered(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            hook(unraisable)
    return filtered


def _eval(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup_logging()
    from roc_jax import inference, metrics

    loaded = _load_or_exit(FLAGS.workdir, FLAGS.checkpoint, data_dir=FLAGS.data_dir)
    split = FLAGS.split or loaded.config.data.eval_split
    out_dir = Path(FLAGS.output_dir or Path(FLAGS.workdir) / "eval")
    evaluated = None
    variant = FLAGS.perturbation or FLAGS.explain or FLAGS.descriptions or FLAGS.descriptions_k
    if FLAGS.prior_weight or FLAGS.unseen_offset:
        # The prediction rules of roc_jax.sentence_prior (docs/results.md).
        from roc_jax import sentence_prior

        if variant:
            sys.exit("error: --prior_weight/--unseen_offset evaluate the plain split; drop "
                     "--perturbation, --explain and --descriptions(_k)")
        try:
            result = sentence_prior.evaluate(loaded, inference.split_source(loaded, split),
                                             FLAGS.prior_weight, FLAGS.unseen_offset)
        except ValueError as e:
            sys.exit(f"error: {e}")
        out_dir = out_dir.with_name(
            f"{out_dir.name}_prior_w{FLAGS.prior_weight:g}_b{FLAGS.unseen_offset:g}")
    elif variant:
        # Per-sample evaluation over the raw files (perturbed, other descriptions, explained).
        from roc_jax import robustness

        try:
            descriptions = robustness.description_set(loaded, FLAGS.descriptions,
                                                      FLAGS.descriptions_k)
            evaluated, info = robustness.evaluate_variant(loaded, split, FLAGS.perturbation,
                                                          seed=FLAGS.perturbation_seed,
                                                          descriptions=descriptions)
        except ValueError as e:  # a descriptions file or head that does not fit, a bad split
            sys.exit(f"error: {e}")
        result = {**evaluated.metrics, "variant": info}
        tag = robustness.variant_name(FLAGS.perturbation, FLAGS.perturbation_seed,
                                      FLAGS.descriptions, FLAGS.descriptions_k)
        out_dir = out_dir.with_name(f"{out_dir.name}_{tag}") if tag else out_dir
    else:
        result = loaded.evaluate_split(split)
    result["step"] = loaded.step
    result["split"] = split
    paths = inference.write_eval_outputs(result, loaded.label_names, out_dir, split)
    if FLAGS.explain:
        from roc_jax import explain

        paths["explain"] = explain.write_jsonl(explain.explain_rows(evaluated),
                                               out_dir / f"explain_{split}.jsonl")
    print(f"{FLAGS.workdir} step {loaded.step}, split {split}:")
    print(metrics.format_report(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def eval_main() -> None:
    """``roc-eval`` / ``python eval.py``."""
    from roc_jax.robustness import PERTURBATIONS  # pure Python: no JAX import yet

    _define_common()
    flags.DEFINE_string("split", None, "Split to evaluate (default: the config's eval split).")
    flags.DEFINE_string("checkpoint", "best", "'best' (dev F1), 'latest' or a step number.")
    flags.DEFINE_string("data_dir", None, "Raw data folder (default: the one the run used).")
    flags.DEFINE_string("output_dir", None, "Where to write the outputs (default WORKDIR/eval); "
                        "a perturbed or re-described evaluation adds its name: eval_untyped, ...")
    flags.DEFINE_enum("perturbation", None, list(PERTURBATIONS), "Evaluate a perturbed copy "
                      "of the split (roc_jax/robustness.py).")
    flags.DEFINE_integer("perturbation_seed", 0, "Seed of the seeded perturbations.")
    flags.DEFINE_bool("explain", False, "Also write explain_<split>.jsonl: per sample the gold "
                      "and predicted relation, its margin and nearest description.")
    flags.DEFINE_string("descriptions", None, "Score with this descriptions file instead of the "
                        "checkpoint's (retrieval head, frozen description tower).")
    flags.DEFINE_integer("descriptions_k", None, "Keep the first K descriptions of each relation.")
    flags.DEFINE_float("prior_weight", 0.0, "Add this weight times the sentence prior (the "
                       "post's cosine to each relation's descriptions) to the logits.")
    flags.DEFINE_float("unseen_offset", 0.0, "Add this to the logits of the checkpoint's "
                       "data.unseen_relations (calibrated stacking, zero-shot runs).")
    flags.mark_flags_as_required(["workdir"])
    app.run(_eval)


# ---------------------------------------------------------------------------------------------


def _span(value: str | None, name: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        a, b = (int(x) for x in value.split(","))
    except ValueError:
        raise app.UsageError(f"--{name} must be START,END (token indices), got {value!r}") from None
    return a, b


def _predict(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _setup_logging()
    from roc_jax.labels import descriptions as desc_lib

    if (FLAGS.text is None) == (FLAGS.tokens is None):
        raise app.UsageError("give --text '[[head]] ... [[tail]] ...' or --tokens with "
                             "--head and --tail")
    extra = None
    if FLAGS.extra_descriptions:
        extra = desc_lib.load_descriptions(FLAGS.extra_descriptions)
    loaded = _load_or_exit(FLAGS.workdir, FLAGS.checkpoint)
    if FLAGS.text is not None:
        text, head, tail = FLAGS.text, None, None
    else:
        text, head, tail = FLAGS.tokens.split(), _span(FLAGS.head, "head"), _span(FLAGS.tail,
                                                                                    "tail")
    results = loaded.predict(text, FLAGS.image, head=head, tail=tail, top_k=FLAGS.top_k,
                             extra_descriptions=extra)
    if FLAGS.json:
        print(json.dumps(results, indent=2))
        return
    for i, r in enumerate(results, 1):
        line = f"{i}. {r['relation']:<32} p={r['probability']:.3f}  score={r['score']:.3f}"
        if "description" in r:
            line += f"\n   nearest description ({r['description_similarity']:.3f}): " \
                    f"{r['description']}"
        print(line)


def predict_main() -> None:
    """``roc-predict`` / ``python predict.py``."""
    _define_common()
    flags.DEFINE_string("text", None, "Sentence with both entities marked: "
                        "'[[Rafael Nadal]] gets engaged to [[Mery Perello]]' (head first).")
    flags.DEFINE_string("tokens", None, "Whitespace-separated tokens (with --head/--tail spans).")
    flags.DEFINE_string("head", None, "Head span START,END over --tokens.")
    flags.DEFINE_string("tail", None, "Tail span START,END over --tokens.")
    flags.DEFINE_string("image", None, "The post's image (optional).")
    flags.DEFINE_integer("top_k", 5, "How many relations to show.")
    flags.DEFINE_bool("json", False, "Print JSON instead of text.")
    flags.DEFINE_string("extra_descriptions", None, "A descriptions JSON file of relations never "
                        "seen in training, scored too (retrieval head).")
    flags.DEFINE_string("checkpoint", "best", "'best' (dev F1), 'latest' or a step number.")
    flags.mark_flags_as_required(["workdir"])
    app.run(_predict)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(f"run train.py, eval.py or predict.py (got {sys.argv})")
