"""CPU throughput of the full ROC train step: JAX next to PyTorch, and next to the hardware's limit.

What one run measures (every figure goes to ``benchmarks/results/train_step.json``, with the
machine's description and a ``summary``):

- ``matmul``: the float32 throughput of XLA on this machine, a ``2048^3`` ``jnp.dot``, median of
  repeats: the MFU denominator (the limit the hardware reaches through the same compiler).
- ``text``: the ``minilm-l6`` text-only ROC train step (forward, contrastive loss, backward, AdamW
  update; ``roc_jax.train_lib.make_trainer``'s jitted, donated step), batch 32 x 64 tokens, real
  MiniLM weights, real description-cache embeddings of the 23 MNRE relations. The same model in
  PyTorch (``benchmarks/torch_roc.TorchROC`` over ``transformers.BertModel``, the JAX model's
  weights copied in, AdamW, clipping) runs too. Each framework runs in its own fresh processes,
  JAX and PyTorch processes alternating for ``--rounds`` rounds (``compare`` says why: in one
  process each one's freed memory slowed the other); the figure of each side is the median of
  all its timed blocks; ``ratio_vs_torch`` = JAX / PyTorch examples/s. Inside each process a
  second variant alternates with the step (``benchlib.time_interleaved``): ``jax_full``, the
  library with ``prune_last_fusion_layer`` off (the last fusion layer over every position, as
  the PyTorch code of the field computes it), and ``torch_pruned``, PyTorch with the same
  pruning (``torch_roc.bert_layer_at``): what that change is worth in each framework. The
  PyTorch processes run on glibc's defaults (``--parts torch_env`` measures why).
  Before timing, both PyTorch models' eval-mode logits on the batch are compared with the
  library's (``parity_max_abs_diff_logits``).
- ``multimodal``: the same with the ``dinov2-s14-offline`` image tower at ``--image-size`` px
  (default 112: 8 x 8 = 64 patches + class token; DINOv2 interpolates its position embeddings in
  both frameworks), every row with an image (``has_image`` True, so the vision tower always runs).
- ``variants``: the text step with one change at a time, prototyped inside this process (library
  files untouched) to show where the time goes: forward only, no dropout, no attention-probability
  dropout, dropout masks from the ``rbg`` PRNG, the library before its dropout and GELU changes
  (``nnx_dropout``, ``erfc_gelu``, ``before``), the dense layers' kernel gradient as autodiff
  writes it (``generic_kernel_gradient``), and bfloat16 compute (``bf16``, and
  ``bf16_f32_accumulation`` with the dense products accumulated and returned in float32).
- ``profile``: a ``jax.profiler`` trace of the text step and of the multimodal one, the XLA ops'
  durations summed by kind (matmul, dropout random bits, ...) and phase (forward / backward /
  optimizer) through the compiled HLO's ``op_name`` metadata, and the top ops; the tables go to
  ``benchmarks/profiles/text_train_step.txt`` and ``multimodal_train_step.txt``.
- ``compile``: one epoch of real MNRE train batches (``roc_jax.data.pipeline`` on
  ``$ROC_MNRE_DIR`` train, text only, config ``configs/mnre.py:offline`` buckets) and the val eval
  batches. Method: every batch of the epoch is drawn from the pipeline and its shape signature
  recorded; the jitted train step then runs once on one real batch of each distinct signature, and
  the eval step once per distinct eval signature (an epoch of full steps would take 5-10 min on 2
  cores; the compiled cache is keyed by exactly these signatures, so running every batch could not
  compile more). Compilations are counted with a ``jax.monitoring`` listener on XLA backend
  compiles (every jitted computation, not only the step) and with the steps' ``_cache_size()``.
- ``retrieval``: eval/predict examples/s scoring against the cached description embeddings
  versus re-encoding the 115 descriptions with the text tower (``cache.text_encode_fn``, the
  library's encoder, tokenization included) before each batch; at the eval batch (64) and a
  predict batch (8); and retrieval alone (``cache.top_k_relations`` on given pair vectors).
- ``memory``: peak resident memory (``VmHWM``, see ``benchlib.peak_rss_gb``) of a subprocess that runs
  ``train_lib.train_and_evaluate`` (``mnre.py:offline``, text only, minilm-l6) for ``--memory-steps``
  steps (200): data, description cache, compiled step, optimizer state and one checkpoint; under
  each host-memory setting of ``MALLOC_SETTINGS``, with the examples/s the training loop logged
  on real batches.

FLOPs per example (analytic, matmuls only, a multiply-add = 2 FLOPs, training = 3 x forward):
  transformer layer of width d, MLP width f, over n tokens:   2n(4d^2 + 2df) + 4n^2 d
  the same layer computing the outputs of q of them:    4nd^2 + 2q(2d^2 + 2df) + 4qnd
  text: 6 layers over L tokens (d=384, f=1536); fusion: 2 BERT layers over L (+ T image tokens),
  the last one at q = 2 marker positions (+ the T image tokens when the batch carries object-tail
  fields, as the pipeline's do) unless pruning is off (``jax_full``, ``torch``);
  image (multimodal): patch embedding 2N(3p^2)dv + 12 layers over T = N+1 tokens (dv=384,
  fv=1536), projection 2T dv d; pair head 2(2d d + d P) + 2RP; relation projection 2RK Dd P per
  step, divided by the batch. Embedding lookups, norms, softmax and the optimizer are not counted.
MFU = FLOPs per example (the ones that side computes) x examples/s / measured matmul FLOP/s; in ``text`` and ``multimodal`` the
matmul probe runs in the same alternating rounds as the two steps (``matmul_interleaved``), so both
sides of the fraction see the same load; ``matmul`` is the separate probe at the start.

- ``malloc``: the ``text`` comparison in six fresh processes, the three host-memory settings of
  ``MALLOC_SETTINGS`` alternating (glibc's defaults; 2 MiB pages for glibc's mapped blocks, which
  the entry points and this script restart themselves with; the opt-in retained heap,
  ``ROC_MALLOC_TUNING=1``; see ``roc_jax.host_memory``), with the minor page faults and kernel
  seconds per step of each side (``text`` records them too, under the run's own setting:
  ``glibc_tunables`` and ``host_memory`` in the results file).

``--parts flags`` (not in the default set; minutes): the JAX text step in a fresh process per
``XLA_FLAGS`` setting of ``FLAG_SETS``. ``--parts torch_env`` (likewise): the PyTorch side of
``text`` alone on glibc's defaults and on 2 MiB pages, 2 fresh processes each. ``--parts order``
(likewise): both frameworks' text steps in one process, each JAX step timed with its kernel
seconds right after a PyTorch step and right after a JAX step. ``--keep`` keeps the sections of an earlier results file
that a run does not measure (each section records when, and under which load, it was measured).

    ROC_MNRE_DIR=/work/shared/data/mnre python benchmarks/train_step.py [--parts text,compile,...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

# Before JAX or torch start their threads: with ROC_MALLOC_TUNING=1, roc_jax tunes glibc malloc
# on import (host_memory); its status goes into the results.
from roc_jax import host_memory  # noqa: E402

PARTS = ("matmul", "text", "multimodal", "variants", "profile", "compile", "retrieval",
         "memory", "malloc")
# Run on request (--parts flags,torch_env): several minutes of fresh processes each.
EXTRA_PARTS = ("flags", "torch_env", "order")
BATCH, LENGTH, FUSION, PROJ = 32, 64, 2, 256
TRAIN_CFG = types.SimpleNamespace(lr_encoder=1e-5, lr_head=1e-3, warmup_ratio=0.1,
                                  weight_decay=0.01, grad_clip=1.0)
# Host-memory settings that the malloc and memory parts compare, each in fresh processes:
# glibc's defaults (the library imported in a notebook), 2 MiB pages for glibc's mapped blocks
# (what the entry points train.py / roc-train and this script restart themselves with) and the
# opt-in retained heap (ROC_MALLOC_TUNING=1). See roc_jax/host_memory.py.
MALLOC_SETTINGS = {
    "glibc_default": {"GLIBC_TUNABLES": "", host_memory.ENV: "0", host_memory.HUGE_PAGES_ENV: "0"},
    "huge_pages": {"GLIBC_TUNABLES": host_memory.HUGETLB_TUNABLE, host_memory.ENV: "0"},
    "malloc_tuned": {"GLIBC_TUNABLES": "", host_memory.ENV: "1", host_memory.HUGE_PAGES_ENV: "0"},
}
TARGETS = {"ratio_vs_torch": 1.3, "mfu": 0.5, "cache_vs_reencode_ratio": 5.0, "peak_rss_gb": 4.0}


# ---------------------------------------------------------------------------------------------
# FLOPs


def layer_flops(n: int, d: int, f: int, queries: int | None = None) -> float:
    """Forward matmul FLOPs of one transformer layer over ``n`` tokens, with the outputs of
    ``queries`` of them (all when None): keys and values for all n, the rest for the queries."""
    q = n if queries is None else queries
    return 4 * n * d * d + 2 * q * (2 * d * d + 2 * d * f) + 4 * q * n * d


def flops_per_example(text: Any, seq: int, batch: int, relations: tuple[int, int],
                      vision: Any = None, image_size: int = 0, pruned: bool = True,
                      object_tails: bool = True) -> float:
    """Training FLOPs per example (3 x the forward matmuls; see the module docstring).

    ``pruned``: the last fusion layer computes the two marker positions (and with images and
    ``object_tails`` in the batch, the image tokens too: ``ROC.pair_states``) instead of all."""
    d, f = text.hidden_size, text.intermediate_size
    r, k = relations
    fwd = text.num_hidden_layers * layer_flops(seq, d, f)
    tokens = seq
    if vision is not None:
        dv, p = vision.hidden_size, vision.patch_size
        fv = vision.intermediate_size
        patches = (image_size // p) ** 2
        t = patches + 1
        fwd += 2 * patches * 3 * p * p * dv + vision.num_hidden_layers * layer_flops(t, dv, fv)
        fwd += 2 * t * dv * d
        tokens += t
    queries = (2 + (t if vision is not None and object_tails else 0)) if pruned else None
    fwd += (FUSION - 1) * layer_flops(tokens, d, f) + layer_flops(tokens, d, f, queries)
    fwd += 2 * (2 * d * d + d * PROJ) + 2 * r * PROJ + 2 * r * k * d * PROJ / batch
    return 3 * fwd


# ---------------------------------------------------------------------------------------------
# shared pieces


def mnre_dir() -> Path:
    path = Path(os.environ.get("ROC_MNRE_DIR", "/work/shared/data/mnre"))
    if not (path / "ours_rel2id.json").exists():
        raise FileNotFoundError(f"ROC_MNRE_DIR={path}: ours_rel2id.json not found; point it at the "
                                "raw MNRE folder")
    return path


def mnre_config(use_images: bool = False) -> Any:
    """``configs/mnre.py:offline`` on the raw folder (no TFDS build), text only by default."""
    os.environ.setdefault("ROC_DATA_DIR", str(mnre_dir()))
    spec = importlib.util.spec_from_file_location("roc_bench_mnre", ROOT / "configs" / "mnre.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("offline")
    c.data.raw_dir = str(mnre_dir())
    c.data.source = "raw"
    c.data.use_images = use_images
    return c


@dataclasses.dataclass
class Shared:
    """What every part uses: label names, the description cache, its encoder and tokenizer."""

    names: list[str]
    descriptions: dict[str, list[str]]
    cache: Any
    desc_encoder: Any
    tokenizer: Any
    relations_np: dict[str, np.ndarray]


def shared_pieces() -> Shared:
    from flax import nnx

    from roc_jax.data.records import id2rel, load_rel2id
    from roc_jax.labels import cache as cache_lib
    from roc_jax.labels import descriptions as desc_lib
    from roc_jax.models import weights

    names = id2rel(load_rel2id(mnre_dir() / "ours_rel2id.json"))
    descriptions = desc_lib.load_descriptions(None, names)
    enc, tok, _ = weights.load_text_encoder("minilm-l6", rngs=nnx.Rngs(params=2, dropout=3))
    enc.eval()
    encode = cache_lib.text_encode_fn(enc, tok)
    cache = cache_lib.ensure_cache(None, descriptions, names, encode,
                                   cache_lib.encoder_params(enc))
    rel = {"embeddings": np.asarray(cache.embeddings, np.float32),
           "mask": np.asarray(cache.mask, bool)}
    return Shared(names, descriptions, cache, enc, tok, rel)


def synthetic_batch(batch: int, seq: int, image_size: int = 0, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """A Batch (contracts.md) with real-looking lengths; values do not change the cost."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(seq // 2, seq + 1, size=batch)
    mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
    out = {
        "input_ids": np.where(mask, rng.integers(1000, 30000, size=(batch, seq)), 0).astype(
            np.int32),
        "attention_mask": mask,
        "head_index": rng.integers(1, seq // 4, size=batch).astype(np.int32),
        "tail_index": rng.integers(seq // 4, seq // 2, size=batch).astype(np.int32),
        "has_image": np.full(batch, image_size > 0),
        # As the pipeline gives MNRE batches: no object tails, but the keys are there.
        "tail_box": np.zeros((batch, 4), np.float32),
        "tail_is_object": np.zeros(batch, bool),
        "label": rng.integers(0, 23, size=batch).astype(np.int32),
        "mask": np.ones(batch, bool),
    }
    out["input_ids"][:, 0] = 101  # [CLS]
    if image_size:
        out["pixel_values"] = rng.standard_normal((batch, image_size, image_size, 3)).astype(
            np.float32)
    return out


def build_roc(shared: Shared, image: bool, seed: int = 0, prune: bool = True,
              dtype: Any = None) -> tuple[Any, Any, Any]:
    """The ROC model with real minilm-l6 (and dinov2-s14-offline) weights: (model, tcfg, vcfg).

    ``prune=False``: every position of the last fusion layer (``prune_last_fusion_layer``).
    ``dtype``: the compute dtype (float32 when None; parameters stay float32)."""
    import jax.numpy as jnp
    from flax import nnx

    from roc_jax.models import weights
    from roc_jax.models.roc import ROC, ROCConfig

    dtype = dtype or jnp.float32
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    text, _, tcfg = weights.load_text_encoder("minilm-l6", dtype=dtype, rngs=rngs)
    vision, vcfg = None, None
    if image:
        vision, _, vcfg = weights.load_image_encoder("dinov2-s14-offline", dtype=dtype, rngs=rngs)
    cfg = ROCConfig(num_relations=len(shared.names), description_dim=shared.cache.dim,
                    fusion_layers=FUSION, proj_dim=PROJ, skip_vision_without_images=False,
                    prune_last_fusion_layer=prune)
    model = ROC(cfg, text, vision, image_dim=vcfg.hidden_size if vcfg else None, dtype=dtype,
                rngs=nnx.Rngs(params=seed + 4, dropout=seed + 5))
    return model, tcfg, vcfg


def build_torch(jax_model: Any, tcfg: Any, vcfg: Any, prune: bool = False) -> Any:
    """``TorchROC`` with ``jax_model``'s weights (HF BertModel / Dinov2Model towers); ``prune``:
    its last fusion layer at the markers alone (``torch_roc.bert_layer_at``)."""
    import torch
    import transformers
    from torch_roc import TorchROC, state_dict_from_roc

    from roc_jax.models import weights

    hf_text = transformers.BertConfig(**{k: v for k, v in dataclasses.asdict(tcfg).items()
                                         if k != "add_pooler"})
    text = transformers.BertModel(hf_text, add_pooling_layer=tcfg.add_pooler)
    vision = None
    if vcfg is not None:
        folder = weights.resolve("dinov2-s14-offline")
        vision = transformers.Dinov2Model(transformers.Dinov2Config.from_pretrained(str(folder)))
    model = TorchROC(text, hf_text, vision, vcfg.hidden_size if vcfg else None,
                     jax_model.config.description_dim, FUSION, PROJ, pair_gelu="tanh",
                     prune_last_fusion_layer=prune)
    sd = state_dict_from_roc(jax_model, model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.endswith(("position_ids", "token_type_ids", "mask_token"))]
    if bad or unexpected:
        raise RuntimeError(f"torch weights: missing {bad[:5]}, unexpected {unexpected[:5]}")
    torch.manual_seed(0)
    return model


def torch_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    out = {}
    for k, v in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        if k in ("input_ids", "head_index", "tail_index", "label"):
            t = t.long()
        if k == "pixel_values":
            t = t.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        out[k] = t
    return out


# ---------------------------------------------------------------------------------------------
# train-step throughput


def jax_setup(model: Any, batch: dict[str, np.ndarray], rel_np: dict[str, np.ndarray]) -> dict:
    import jax

    from roc_jax import parallel
    from roc_jax.train_lib import make_trainer

    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer, state = make_trainer(model, TRAIN_CFG, total_steps=100_000, mesh=mesh)
    jb = parallel.shard_batch(batch, mesh)
    rel = parallel.replicate(rel_np, mesh)
    return {"trainer": trainer, "state": state, "batch": jb, "rel": rel, "mesh": mesh}


def jax_train_step(js: dict) -> Any:
    """``step() -> loss``: one train step of ``jax_setup``'s trainer on its batch; the (donated)
    state lives in ``js["state"]``."""

    def step() -> Any:
        js["state"], out = js["trainer"].train_step(js["state"], js["batch"], js["rel"])
        return out["loss"]

    return step


def torch_train_step(tmodel: Any, batch: dict[str, np.ndarray], rel_np: dict) -> Any:
    """``step() -> loss``: one ``torch_roc.make_train_step`` step of ``tmodel`` (train mode)."""
    import torch
    from torch_roc import make_train_step

    tmodel.train()
    return functools.partial(make_train_step(tmodel), torch_batch(batch),
                             torch.from_numpy(rel_np["embeddings"]),
                             torch.from_numpy(rel_np["mask"]))


def parity(js: dict, tmodel: Any, batch: dict[str, np.ndarray], rel_np: dict) -> float:
    """Max |logits_jax - logits_torch| in eval mode (no dropout) on ``batch``: same model?"""
    import torch

    out = js["trainer"].eval_step(js["state"]["params"], js["batch"], js["rel"])
    tmodel.eval()
    with torch.no_grad():
        tl = tmodel(torch_batch(batch), torch.from_numpy(rel_np["embeddings"]),
                    torch.from_numpy(rel_np["mask"])).numpy()
    tmodel.train()
    return float(np.max(np.abs(np.asarray(out["logits"]) - tl)))


SIDES = {"jax": ("jax", "jax_full"), "torch": ("torch", "torch_pruned")}


def compare(name: str, image_size: int, args: argparse.Namespace, peak: float | None,
            torch_env: dict[str, str] | None = None) -> dict[str, Any]:
    """The JAX train step vs the PyTorch one on the same weights and batch.

    Each framework runs in its own fresh processes (``side_child``), JAX and PyTorch processes
    alternating for ``--rounds`` rounds; a side's figure is the median of all its timed blocks.
    Separate processes because in one process each framework's freed memory slows the other's
    next step: under the entry points' 2 MiB pages, a JAX step right after a PyTorch one can
    spend over a second in the kernel compacting memory for huge pages (``--parts order``).
    A user runs one framework per process too. ``torch_env``: the PyTorch processes' host-memory
    setting (``MALLOC_SETTINGS``; None: this process's). The headline runs PyTorch on glibc's
    defaults, what its users get and its faster setting: on 2 MiB pages its own full step spends
    more time in the kernel and runs slower (``--parts torch_env``).

    Inside a process two variants alternate: ``jax`` (the library: last fusion layer at the
    markers alone) with ``jax_full`` (``prune_last_fusion_layer=False``: every position, as the
    field's code computes it) and the matmul probe; ``torch`` (the field's code) with
    ``torch_pruned`` (the same pruning in PyTorch). Each side's MFU counts the FLOPs it computes;
    the headline ``ratio_vs_torch`` is ``jax`` over ``torch``.
    """
    children: dict[str, list[dict[str, Any]]] = {"jax": [], "torch": []}
    child_args = ["--repeats", str(args.repeats if not image_size else args.mm_repeats),
                  "--iters", str(args.iters if not image_size else max(1, args.iters // 2)),
                  "--warmup", str(args.warmup), "--matmul", str(args.matmul),
                  "--image-size", str(image_size)]
    for rnd in range(args.rounds):
        for framework in (("jax", "torch") if rnd % 2 == 0 else ("torch", "jax")):
            env = (torch_env or {}) if framework == "torch" else {}
            r = child_json("--side-child", [*child_args, "--side", framework], env, timeout=1800)
            children[framework].append(r)
            print(f"[{name}] round {rnd} {framework}: " + ", ".join(
                f"{s} {BATCH / statistics.median(r['blocks'][s]):.2f} ex/s"
                for s in SIDES[framework]), flush=True)
    flops = children["jax"][0]["flops"]
    res: dict[str, Any] = {"batch": BATCH, "length": LENGTH, "rounds": args.rounds,
                           "flops_per_example": flops["pruned"],
                           "flops_per_example_full": flops["full"],
                           "parity_max_abs_diff_logits": children["torch"][0]["parity"],
                           "torch_num_threads": children["torch"][0]["torch_num_threads"],
                           "torch_attn_implementation": children["torch"][0]["attn"],
                           "torch_env": torch_env or "as the parent",
                           "processes": children}
    if args.matmul:
        secs = [t for c in children["jax"] for t in c["blocks"]["matmul"]]
        res["matmul_interleaved"] = {"n": args.matmul, "flops_per_s": 2.0 * args.matmul**3 /
                                     statistics.median(secs)}
        peak = res["matmul_interleaved"]["flops_per_s"]
    for framework, sides in SIDES.items():
        for side in sides:
            blocks = [t for c in children[framework] for t in c["blocks"][side]]
            res[side] = benchlib.rate_summary(blocks, BATCH)
            # Page faults and kernel time per step: the cost of fresh mappings (host_memory).
            for key in ("minor_faults_per_step", "sys_s_per_step"):
                res[side][key] = statistics.median(v for c in children[framework]
                                                   for v in c["usage"][side][key])
            res[side]["final_loss"] = children[framework][-1]["final_loss"][side]
            if peak:  # the interleaved probe when there is one, else the run's separate probe
                res[side]["mfu"] = (flops["pruned"] if side in ("jax", "torch_pruned")
                                    else flops["full"]) * res[side]["ex_per_s"] / peak
    rate = {side: res[side]["ex_per_s"] for sides in SIDES.values() for side in sides}
    res["ratio_vs_torch"] = rate["jax"] / rate["torch"]
    res["ratio_vs_torch_pruned"] = rate["jax"] / rate["torch_pruned"]
    res["ratio_full_vs_torch"] = rate["jax_full"] / rate["torch"]
    res["pruning_speedup"] = {"jax": rate["jax"] / rate["jax_full"],
                              "torch": rate["torch_pruned"] / rate["torch"]}
    if peak:
        res["mfu"], res["torch_mfu"] = res["jax"]["mfu"], res["torch"]["mfu"]
        res["mfu_denominator_flops_per_s"] = peak
    print(f"[{name}] jax {rate['jax']:.2f} ex/s (every position {rate['jax_full']:.2f}), torch "
          f"{rate['torch']:.2f} ex/s (pruned {rate['torch_pruned']:.2f}), ratio "
          f"{res['ratio_vs_torch']:.2f} (vs pruned torch {res['ratio_vs_torch_pruned']:.2f}), "
          f"mfu {res.get('mfu', float('nan')):.3f}, parity {res['parity_max_abs_diff_logits']}",
          flush=True)
    return res


def torch_env_ab(args: argparse.Namespace) -> dict[str, Any]:
    """The PyTorch side of ``text`` alone in fresh processes on glibc's defaults and on 2 MiB
    pages, alternating, twice: which setting the PyTorch baseline gets in ``compare``."""
    child_args = ["--repeats", str(args.repeats), "--iters", str(args.iters), "--warmup",
                  str(args.warmup), "--matmul", "0", "--image-size", "0", "--side", "torch"]
    runs: dict[str, list[dict[str, Any]]] = {"glibc_default": [], "huge_pages": []}
    for _ in range(2):
        for label in runs:
            runs[label].append(child_json("--side-child", child_args, MALLOC_SETTINGS[label],
                                          timeout=1800))
    res: dict[str, Any] = {}
    for label, children in runs.items():
        res[label] = {"env": MALLOC_SETTINGS[label]}
        for side in SIDES["torch"]:
            res[label][side] = benchlib.rate_summary(
                [t for c in children for t in c["blocks"][side]], BATCH)
            res[label][side]["sys_s_per_step"] = statistics.median(
                v for c in children for v in c["usage"][side]["sys_s_per_step"])
        print(f"[torch_env] {label}: " + ", ".join(
            f"{side} {res[label][side]['ex_per_s']:.2f} ex/s "
            f"({res[label][side]['sys_s_per_step']:.2f} s kernel/step)"
            for side in SIDES["torch"]), flush=True)
    return res


def order_effect(args: argparse.Namespace) -> dict[str, Any]:
    """Why ``compare`` separates the frameworks: in one process (this one's host-memory setting),
    rounds of ``jax, torch, jax, jax`` steps; each JAX step's seconds and kernel seconds, by
    whether a PyTorch or a JAX step ran just before it."""
    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    shared = shared_pieces()
    batch = synthetic_batch(BATCH, LENGTH)
    model, tcfg, _ = build_roc(shared, False)
    tstep = torch_train_step(build_torch(model, tcfg, None), batch, shared.relations_np)
    step = jax_train_step(jax_setup(model, batch, shared.relations_np))

    def jstep() -> None:
        jax.block_until_ready(step())

    jstep()
    tstep()
    jstep()  # so that the first timed JAX step follows a JAX step
    runs: dict[str, dict[str, list[float]]] = {
        k: {"s": [], "sys_s": [], "minor_faults": []}
        for k in ("jax_after_jax", "torch_after_jax", "jax_after_torch")}
    for _ in range(args.repeats):
        for label, fn in (("jax_after_jax", jstep), ("torch_after_jax", tstep),
                          ("jax_after_torch", jstep), ("jax_after_jax", jstep)):
            ru, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            fn()
            dt, ru2 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            runs[label]["s"].append(round(dt, 4))
            runs[label]["sys_s"].append(round(ru2.ru_stime - ru.ru_stime, 4))
            runs[label]["minor_faults"].append(ru2.ru_minflt - ru.ru_minflt)
    res: dict[str, Any] = {"glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), **runs}
    for label, r in runs.items():
        res[label]["median_s"] = statistics.median(r["s"])
        res[label]["median_sys_s"] = statistics.median(r["sys_s"])
        print(f"[order] {label}: {res[label]['median_s']:.2f} s/step, "
              f"{res[label]['median_sys_s']:.2f} s kernel", flush=True)
    return res


def side_child(args: argparse.Namespace) -> None:
    """One framework's two variants of the train step (``SIDES[args.side]``), alternating blocks,
    in this fresh process; prints one JSON line (blocks, usage, final losses; the PyTorch side
    also the eval-mode parity of both its models with the library's logits)."""
    import jax
    import jax.numpy as jnp

    shared = shared_pieces()
    image = args.image_size > 0
    batch = synthetic_batch(BATCH, LENGTH, image_size=args.image_size)
    model, tcfg, vcfg = build_roc(shared, image)
    r, k = shared.relations_np["mask"].shape
    size = args.image_size
    out: dict[str, Any] = {"side": args.side, "final_loss": {}, "load_average": os.getloadavg(),
                           "flops": {"pruned": flops_per_example(tcfg, LENGTH, BATCH, (r, k),
                                                                 vcfg, size),
                                     "full": flops_per_example(tcfg, LENGTH, BATCH, (r, k), vcfg,
                                                               size, pruned=False)}}
    fns: dict[str, Any] = {}
    if args.side == "torch":
        import torch

        torch.set_num_threads(os.cpu_count())
        js = jax_setup(model, batch, shared.relations_np)  # the parity reference only
        out["parity"] = {}
        for side, prune in (("torch", False), ("torch_pruned", True)):
            tmodel = build_torch(model, tcfg, vcfg, prune=prune)
            out["parity"][side] = parity(js, tmodel, batch, shared.relations_np)
            fns[side] = torch_train_step(tmodel, batch, shared.relations_np)
        out["torch_num_threads"] = torch.get_num_threads()
        out["attn"] = tmodel.text.config._attn_implementation
        del js, model
    else:
        for side, prune in (("jax", True), ("jax_full", False)):
            jax_step = jax_train_step(jax_setup(
                model if prune else build_roc(shared, image, prune=False)[0], batch,
                shared.relations_np))
            t0 = time.perf_counter()
            jax.block_until_ready(jax_step())
            out[f"{side}_compile_and_first_step_s"] = time.perf_counter() - t0
            fns[side] = jax_step
        if args.matmul:
            # The matmul probe runs in the same rounds as the steps, so the MFU's numerator and
            # denominator see the same load on a shared machine.
            a = jax.random.normal(jax.random.key(0), (args.matmul, args.matmul), jnp.float32)
            mm = jax.jit(jnp.dot)
            jax.block_until_ready(mm(a, a))
            fns["matmul"] = lambda: mm(a, a)

    def sync(x: Any) -> Any:
        return jax.block_until_ready(x) if isinstance(x, jax.Array) else x

    for _ in range(args.warmup):
        for fn in fns.values():
            sync(fn())
    usage: dict[str, dict[str, list[float]]] = {}
    out["blocks"] = benchlib.time_interleaved(fns, args.repeats, args.iters, sync=sync,
                                              usage=usage)
    out["usage"] = {side: {"minor_faults_per_step": u["minor_faults"],
                           "sys_s_per_step": u["sys_s"]} for side, u in usage.items()}
    for side in SIDES[args.side]:
        out["final_loss"][side] = float(fns[side]())
    print(json.dumps(out, default=float), flush=True)


# ---------------------------------------------------------------------------------------------
# variants: where the time of the JAX step goes (prototypes; no library file is changed)


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def prng_impl(name: str):
    import jax

    prev = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", name)
    try:
        yield
    finally:
        jax.config.update("jax_default_prng_impl", prev)


def variants(shared: Shared, batch: dict, args: argparse.Namespace, flops: float,
             peak: float | None) -> dict[str, Any]:
    """The text step as in ``compare`` and with one change each, timed in alternating blocks.

    Each variant's model is built and its step traced (first call) inside the change's context,
    after clearing ``train_lib._compiled_steps`` (an lru cache keyed by the graphdef: a change
    that patches a method leaves the graphdef as it was, so without the clear the variant would
    reuse the baseline's executable). The compiled step keeps the change afterwards. The library
    files are not modified.

    - ``forward_only``: the eval step (no backward, no optimizer, no dropout).
    - ``no_dropout``: the train step built from the eval graphdef: what dropout costs in all.
    - ``no_attention_dropout``: dropout on the [B, H, L, L] attention probabilities off (the
      hidden-state dropouts kept): which dropout costs.
    - ``rbg_dropout``: ``jax_default_prng_impl='rbg'``: masks from XLA's RngBitGenerator.
    - ``nnx_dropout``: ``flax.nnx.Dropout``'s own ``__call__`` (a float uniform from a 32-bit
      word per element, a divide by ``keep``) in place of ``layers.Dropout``'s.
    - ``erfc_gelu``: ``jax.nn.gelu(approximate=False)`` (the erfc form) in place of the erf one.
    - ``before``: both of the last two: the library before the change of 2026-11-27.
    - ``generic_kernel_gradient``: the dense layers' product as plain ``jax.lax.dot_general``
      (autodiff's kernel gradient, which XLA:CPU runs on its generic dot) in place of
      ``layers.dense_dot_general``.
    - ``bf16``: the model with bfloat16 compute (``dtype``; float32 parameters), as on a GPU.
    - ``bf16_f32_accumulation``: that, with the dense layers' products asking XLA for float32
      results (``preferred_element_type``) and rounding them to bfloat16: on this CPU such a
      product of the model's shapes runs at about twice the float32 rate, while a bf16 -> bf16
      one runs below it. Is the whole step faster?
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from roc_jax import train_lib
    from roc_jax.models import layers

    fns, res = {}, {}

    def split_eval(m: Any) -> tuple:  # the train graphdef with dropout off
        m.eval()
        gdef, params, rest = nnx.split(m, nnx.Param, ...)
        return gdef, gdef, params, rest

    def make(label: str, ctx: Any = None, edit: Any = None, dtype: Any = None) -> None:
        train_lib._compiled_steps.cache_clear()
        with ctx or contextlib.nullcontext():
            model = build_roc(shared, image=False, dtype=dtype)[0]
            if edit is not None:
                edit(model)
            js = jax_setup(model, batch, shared.relations_np)
            step = jax_train_step(js)
            t0 = time.perf_counter()
            jax.block_until_ready(step())
        res[label] = {"compile_and_first_step_s": time.perf_counter() - t0}
        fns[label] = step
        if label == "baseline":
            def fwd():
                return js["trainer"].eval_step(js["state"]["params"], js["batch"],
                                               js["rel"])["logits"]

            jax.block_until_ready(fwd())
            fns["forward_only"] = fwd
            res["forward_only"] = {}

    def no_attention_dropout(model: Any) -> None:
        for _, module in nnx.iter_graph(model):
            if isinstance(module, layers.MultiHeadAttention):
                module.dropout.rate = 0.0

    def nnx_dropout() -> Any:
        return patched(layers.Dropout, "__call__", nnx.Dropout.__call__)

    def erfc_gelu() -> Any:
        return patched(layers, "ACTIVATIONS", {**layers.ACTIVATIONS, "gelu": lambda x:
                                               jax.nn.gelu(x, approximate=False)})

    @contextlib.contextmanager
    def before():
        with nnx_dropout(), erfc_gelu():
            yield

    def f32_products(a: Any, b: Any, dims: Any, precision: Any = None, **kw: Any) -> Any:
        kw.pop("preferred_element_type", None)
        return jax.lax.dot_general(a, b, dims, precision=precision,
                                   preferred_element_type=jnp.float32, **kw).astype(a.dtype)

    def f32_accumulation() -> Any:  # every dense layer's product (layers.dense reads it)
        return patched(layers, "dense_dot_general", f32_products)

    selected = args.variants.split(",")
    table = {
        "baseline": {},
        "no_dropout": {"ctx": patched(train_lib, "split_model", split_eval)},
        "no_attention_dropout": {"edit": no_attention_dropout},
        "rbg_dropout": {"ctx": prng_impl("rbg")},
        "nnx_dropout": {"ctx": nnx_dropout()},
        "erfc_gelu": {"ctx": erfc_gelu()},
        "before": {"ctx": before()},
        "generic_kernel_gradient": {"ctx": patched(layers, "dense_dot_general",
                                                   jax.lax.dot_general)},
        "bf16": {"dtype": jnp.bfloat16},
        "bf16_f32_accumulation": {"dtype": jnp.bfloat16, "ctx": f32_accumulation()},
    }
    for label, kw in table.items():
        if label == "baseline" or label in selected:
            make(label, **kw)
    blocks = benchlib.time_interleaved(fns, args.variant_repeats, args.iters,
                                       sync=jax.block_until_ready)
    for label, secs in blocks.items():
        res[label].update(benchlib.rate_summary(secs, BATCH))
        if peak:  # forward only: a third of the training FLOPs
            res[label]["mfu"] = (flops / 3 if label == "forward_only" else flops) * \
                res[label]["ex_per_s"] / peak
    base = res["baseline"]["ex_per_s"]
    for label in res:
        res[label]["vs_baseline"] = res[label]["ex_per_s"] / base
    print("[variants] " + ", ".join(f"{k} {v['ex_per_s']:.2f} ex/s" for k, v in res.items()),
          flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# profile: where the JAX step's time goes, per XLA op, from a jax.profiler trace


def op_category(op_name: str) -> tuple[str, str]:
    """(category, phase) of an HLO instruction from its JAX ``op_name`` metadata."""
    if any(k in op_name for k in ("dropout_keep_mask", "threefry", "_bernoulli", "_uniform",
                                  "random_bits", "rng_bit_generator")):
        cat = "dropout masks (random bits)"
    else:
        last = op_name.rsplit("/", 1)[-1]
        cat = {"dot_general": "matmul (dot_general)", "erfc": "gelu (erf)", "erf": "gelu (erf)",
               "exp": "softmax exp", "select_n": "select (dropout apply, masks)",
               "transpose": "transpose/copy", "copy": "transpose/copy"}.get(last, f"other: {last}")
    phase = ("backward" if "transpose(jvp" in op_name else "forward" if "jvp(" in op_name
             else "optimizer and rest")
    return cat, phase


def profile_step(step: Any, jit_fn: Any, args_: tuple, out_txt: Path, title: str,
                 steps: int = 2) -> dict[str, Any]:
    """Traces ``steps`` calls of ``step`` with ``jax.profiler``; sums the XLA ops' durations by
    category (dot, random bits, ...) and phase using the compiled HLO's ``op_name`` metadata;
    writes a text summary to ``out_txt``. Op times are summed over the XLA worker threads."""
    import collections
    import re
    import shutil

    import jax

    hlo = jit_fn.lower(*args_).compile().as_text()  # the cached executable, no new compile
    names = dict(re.findall(r'^\s*%?([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo,
                            flags=re.M))
    jax.block_until_ready(step())
    tmp = Path(tempfile.mkdtemp(prefix="roc_prof_"))
    jax.profiler.start_trace(str(tmp))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(str(next(tmp.rglob("*.xplane.pb"))))
    shutil.rmtree(tmp, ignore_errors=True)
    by_cat: collections.Counter = collections.Counter()
    by_phase: collections.Counter = collections.Counter()
    by_op: collections.Counter = collections.Counter()
    total = 0
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for e in line.events:
                if e.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    continue  # wrappers and waits, not ops
                cat, phase = op_category(names.get(e.name.removeprefix("end: "), "?"))
                d = e.duration_ns / steps
                by_cat[cat] += d
                by_phase[phase] += d
                by_op[(e.name, names.get(e.name, "?"))] += d
                total += d
    res = {"wall_s_per_step": wall, "op_s_per_step_summed_over_threads": total / 1e9,
           "by_category": {k: round(v / total, 4) for k, v in by_cat.most_common()},
           "by_phase": {k: round(v / total, 4) for k, v in by_phase.most_common()}}
    lines = [f"{title}, jax.profiler trace of "
             f"{steps} steps; wall {wall:.2f} s/step; XLA op time summed over threads "
             f"{total / 1e9:.2f} s/step", "", "share of op time by category:"]
    lines += [f"  {v / total:6.1%}  {k}" for k, v in by_cat.most_common()]
    lines += ["", "by phase:"] + [f"  {v / total:6.1%}  {k}" for k, v in by_phase.most_common()]
    lines += ["", "top 25 ops (name, share, op_name):"]
    lines += [f"  {v / total:6.1%}  {n:32s} {o[:110]}" for (n, o), v in by_op.most_common(25)]
    out_txt.parent.mkdir(parents=True, exist_ok=True)
    out_txt.write_text("\n".join(lines) + "\n")
    res["summary_file"] = str(out_txt.relative_to(ROOT)) if out_txt.is_relative_to(ROOT) \
        else str(out_txt)
    print(f"[profile] {wall:.2f} s/step; " + ", ".join(
        f"{k} {v:.0%}" for k, v in list(res["by_category"].items())[:5]), flush=True)
    return res


def profile_train(shared: Shared, image_size: int, out_txt: Path) -> dict[str, Any]:
    """``profile_step`` of the train step: text only (``image_size`` 0) or with images."""
    model = build_roc(shared, image=bool(image_size))[0]
    batch = synthetic_batch(BATCH, LENGTH, image_size=image_size)
    kind = f"multimodal (DINOv2-S/14 at {image_size} px)" if image_size else "text"
    title = f"JAX {kind} train step (minilm-l6, batch {BATCH} x {LENGTH})"
    js = jax_setup(model, batch, shared.relations_np)
    cells = {type(c.cell_contents).__name__: c.cell_contents
             for c in js["trainer"].train_step.__closure__}
    jit_train, rest = cells["PjitFunction"], cells["State"]
    step = jax_train_step(js)
    import jax

    jax.block_until_ready(step())  # compile
    return profile_step(step, jit_train, (js["state"], rest, js["batch"], js["rel"]),
                        out_txt, title)


# ---------------------------------------------------------------------------------------------
# compilations per epoch


@contextlib.contextmanager
def compile_listener():
    """Collects the durations of XLA backend compiles (every jitted computation) meanwhile."""
    import jax

    events: list[tuple[str, float]] = []

    def on_duration(event: str, duration: float, **kw: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            events.append((str(kw.get("fun_name", "?")), duration))

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)


def signature(batch: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def compile_epoch(shared: Shared) -> dict[str, Any]:
    import jax

    from roc_jax import parallel, train_lib
    from roc_jax.data import pipeline

    config = mnre_config(use_images=False)
    t0 = time.perf_counter()
    sources = train_lib.load_sources(config, ["train", "val"])
    load_s = time.perf_counter() - t0
    model, _, _ = build_roc(shared, image=False)
    pcfg = train_lib.pipeline_config(config, None)
    it = pipeline.make_train_iterator(sources["train"], shared.tokenizer, pcfg, seed=config.seed,
                                      batch_size=config.train.batch_size)
    train_sigs: dict[tuple, dict] = {}
    counts: dict[tuple, int] = {}
    for _ in range(it.steps_per_epoch):
        b = next(it)
        sig = signature(b)
        counts[sig] = counts.get(sig, 0) + 1
        train_sigs.setdefault(sig, b)
    it.close()
    evals = pipeline.make_eval_batches(sources["val"], shared.tokenizer, pcfg,
                                       config.train.eval_batch_size)
    eval_sigs: dict[tuple, dict] = {}
    for b in evals:
        eval_sigs.setdefault(signature(b), b)
    mesh = parallel.make_mesh(jax.devices()[:1])
    rel = parallel.replicate(shared.relations_np, mesh)
    with compile_listener() as events:
        trainer, state = train_lib.make_trainer(model, config.train, it.steps_per_epoch, mesh)
        jax.block_until_ready(state)
        setup_events = list(events)
        del events[:]
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            for b in train_sigs.values():
                state, out = trainer.train_step(state, parallel.shard_batch(b, mesh), rel)
                jax.block_until_ready(out["loss"])
            for b in eval_sigs.values():
                jax.block_until_ready(trainer.eval_step(state["params"],
                                                        parallel.shard_batch(b, mesh), rel))
        wall = time.perf_counter() - t0
    jit_train, jit_eval, _, _ = train_lib._compiled_steps(
        *train_lib.split_model(model)[:2], train_lib.OptSpec.from_config(config.train,
                                                                         it.steps_per_epoch), mesh)
    lengths = {dict((k, s) for k, s, _ in sig)["input_ids"][1]: n for sig, n in counts.items()}
    res = {
        "method": "every batch of one training epoch drawn from the pipeline and its shape "
                  "signature recorded; the jitted train step run once per distinct signature and "
                  "the eval step once per distinct val signature",
        "train_batches_in_epoch": int(it.steps_per_epoch),
        "train_signatures": len(train_sigs),
        "batches_per_length": {str(k): v for k, v in sorted(lengths.items())},
        "eval_batches": len(evals), "eval_signatures": len(eval_sigs),
        "buckets": list(pcfg.lengths),
        # Every XLA compile while the epoch's batches went through the steps (any jitted
        # function, not only the steps), and the one-off ones of building the trainer.
        "xla_backend_compiles": len(events),
        "xla_backend_compile_s": float(sum(d for _, d in events)),
        "xla_compiles_by_function": [(n, round(d, 2)) for n, d in events],
        "setup_xla_compiles": len(setup_events),
        "setup_xla_compile_s": float(sum(d for _, d in setup_events)),
        "setup_compiles_by_function": [(n, round(d, 2)) for n, d in setup_events],
        "train_step_cache_size": int(jit_train._cache_size()),
        "eval_step_cache_size": int(jit_eval._cache_size()),
        "wall_s_first_calls": wall,
        "load_sources_s": load_s,
    }
    res["compiles_per_epoch"] = res["xla_backend_compiles"]
    res["limit"] = len(pcfg.lengths) + len(eval_sigs)
    print(f"[compile] {res['xla_backend_compiles']} XLA compiles ({res['xla_backend_compile_s']:.1f}"
          f" s), train cache {res['train_step_cache_size']}, eval cache "
          f"{res['eval_step_cache_size']}, buckets {res['buckets']}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# retrieval from the cache vs re-encoding the descriptions


def retrieval(shared: Shared, args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from roc_jax import parallel
    from roc_jax.labels import cache as cache_lib
    from roc_jax.train_lib import make_trainer

    model, _, _ = build_roc(shared, image=False)
    mesh = parallel.make_mesh(jax.devices()[:1])
    trainer, state = make_trainer(model, TRAIN_CFG, total_steps=1000, mesh=mesh)
    params = state["params"]
    encode = cache_lib.text_encode_fn(shared.desc_encoder, shared.tokenizer)
    texts = [t for row in shared.cache.texts for t in row]
    rel_cached = parallel.replicate(shared.relations_np, mesh)
    res: dict[str, Any] = {"descriptions": len(texts), "encoder": "cache.text_encode_fn "
                           "(minilm-l6, tokenization + [64, 64] jitted batches, mean pooling)"}
    for label, bs in (("eval", 64), ("predict", 8)):
        batch = parallel.shard_batch(synthetic_batch(bs, LENGTH, seed=3), mesh)

        def cached(batch=batch):
            return trainer.eval_step(params, batch, rel_cached)["pred"]

        def reencode(batch=batch):
            emb, mask = cache_lib._encode_ragged(shared.cache.texts, encode)
            rel = parallel.replicate({"embeddings": emb, "mask": mask}, mesh)
            return trainer.eval_step(params, batch, rel)["pred"]

        def encode_only():
            return cache_lib._encode_ragged(shared.cache.texts, encode)[0]

        jax.block_until_ready(cached())
        jax.block_until_ready(reencode())
        blocks = benchlib.time_interleaved(
            {"cached": cached, "reencode": reencode, "encode_only": encode_only},
            args.repeats, max(1, args.iters // 2), sync=jax.block_until_ready)
        c = benchlib.rate_summary(blocks["cached"], bs)
        r = benchlib.rate_summary(blocks["reencode"], bs)
        # Why the ratio is what it is: re-encoding = encoding the descriptions + the cached eval
        # batch, so the ratio is about 1 + t(encode) / t(eval batch), whatever the cache does.
        t_batch = statistics.median(blocks["cached"])
        t_encode = statistics.median(blocks["encode_only"])
        res[label] = {"batch": bs, "cached": c, "reencode": r,
                      "ratio": c["ex_per_s"] / r["ex_per_s"],
                      "s_encode_descriptions": t_encode, "s_eval_batch_cached": t_batch,
                      "ratio_bound_from_parts": 1 + t_encode / t_batch}
        print(f"[retrieval/{label}] cached {c['ex_per_s']:.1f} ex/s, re-encode "
              f"{r['ex_per_s']:.1f} ex/s, ratio {res[label]['ratio']:.2f}; encoding the "
              f"descriptions {t_encode:.2f} s against {t_batch:.2f} s per cached batch",
              flush=True)
    # Retrieval alone (pair vectors given): cache.top_k_relations over the cached embeddings vs
    # re-encoding the descriptions into a fresh cache first. What predict pays per batch of
    # already-encoded queries.
    rng = np.random.default_rng(5)
    pairs = rng.standard_normal((64, shared.cache.dim)).astype(np.float32)

    def top_cached():
        return cache_lib.top_k_relations(shared.cache, pairs, k=5)

    def top_reencode():
        fresh = cache_lib.encode_descriptions(shared.descriptions, shared.names, encode,
                                              shared.cache.fingerprint)
        return cache_lib.top_k_relations(fresh, pairs, k=5)

    top_cached()
    top_reencode()
    blocks = benchlib.time_interleaved({"cached": top_cached, "reencode": top_reencode},
                                       args.repeats, max(1, args.iters // 2))
    c = benchlib.rate_summary(blocks["cached"], len(pairs))
    r = benchlib.rate_summary(blocks["reencode"], len(pairs))
    res["scoring_only"] = {"batch": len(pairs), "what": "cache.top_k_relations(k=5) on given "
                           "pair vectors", "cached": c, "reencode": r,
                           "ratio": c["ex_per_s"] / r["ex_per_s"]}
    print(f"[retrieval/scoring_only] cached {c['ex_per_s']:.0f} ex/s, re-encode "
          f"{r['ex_per_s']:.1f} ex/s, ratio {res['scoring_only']['ratio']:.0f}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# peak memory of a short training run (subprocess)


FLAG_SETS = {
    "default": "",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "no_multi_thread_eigen": "--xla_cpu_multi_thread_eigen=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
}


def jax_text_child(args: argparse.Namespace) -> None:
    """The JAX text train step alone (for the XLA_FLAGS sweep): prints one JSON line."""
    import jax

    shared = shared_pieces()
    model = build_roc(shared, image=False)[0]
    step = jax_train_step(jax_setup(model, synthetic_batch(BATCH, LENGTH), shared.relations_np))
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    compile_s = time.perf_counter() - t0
    blocks = benchlib.time_interleaved({"jax": step}, args.repeats, args.iters,
                                       sync=jax.block_until_ready)
    print(json.dumps({**benchlib.rate_summary(blocks["jax"], BATCH),
                      "compile_and_first_step_s": compile_s,
                      "load_average": os.getloadavg()}), flush=True)


def flags_sweep(args: argparse.Namespace) -> dict[str, Any]:
    """The JAX text step in a fresh process per ``XLA_FLAGS`` setting (flags are read at start),
    the default first and last to bracket the drift of the machine's load."""
    res: dict[str, Any] = {}
    order = list(FLAG_SETS) + ["default_again"]
    for label in order:
        flags = FLAG_SETS.get(label, "")
        env = {**os.environ, "XLA_FLAGS": flags}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--jax-text-child",
               "--repeats", str(args.variant_repeats), "--iters", str(args.iters)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), env=env,
                              timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            res[label] = {"xla_flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
        else:
            res[label] = {"xla_flags": flags, **json.loads(lines[-1])}
        shown = res[label].get("ex_per_s", res[label].get("error"))
        print(f"[flags] {label}: {shown}", flush=True)
    return res


def child_json(flag: str, args: list[str], env: dict[str, str], timeout: int) -> dict[str, Any]:
    """Runs this script with ``flag`` (a ``--*-child`` mode) in a fresh process under ``env``
    added to this one's environment; returns the JSON line it prints last."""
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT), timeout=timeout,
                          env={**os.environ, **env})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{flag} failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def text_pair_child(args: argparse.Namespace) -> None:
    """The ``text`` comparison (JAX and PyTorch processes, alternating) alone: one JSON line."""
    res = compare("text", 0, args, None)
    res["host_memory"] = host_memory.status
    res["load_average"] = os.getloadavg()
    print(json.dumps(res, default=float), flush=True)


def malloc_ab(args: argparse.Namespace) -> dict[str, Any]:
    """The text comparison (``compare``: a JAX and a PyTorch process per ``--rounds``) under
    each of ``MALLOC_SETTINGS``, the settings alternating, twice, to bracket load drift. Both
    frameworks' processes run under the setting."""
    runs: list[dict[str, Any]] = []
    child_args = ["--repeats", str(args.repeats), "--iters", str(args.iters),
                  "--warmup", str(args.warmup), "--matmul", str(args.matmul),
                  "--rounds", str(args.rounds)]
    for i, label in enumerate(list(MALLOC_SETTINGS) * 2):
        r = child_json("--text-pair-child", child_args, MALLOC_SETTINGS[label], timeout=1200)
        run = {"round": i, "setting": label, "env": MALLOC_SETTINGS[label],
               "host_memory": r["host_memory"], "ratio_vs_torch": r["ratio_vs_torch"],
               "mfu": r.get("mfu"), "load_average": r["load_average"]}
        for side in ("jax", "torch"):
            run[side] = {k: r[side][k] for k in ("ex_per_s", "minor_faults_per_step",
                                                 "sys_s_per_step", "s_per_call_blocks")}
        runs.append(run)
        print(f"[malloc] {label}: jax {run['jax']['ex_per_s']:.2f} ex/s "
              f"({run['jax']['minor_faults_per_step']:.0f} faults/step), torch "
              f"{run['torch']['ex_per_s']:.2f} ({run['torch']['minor_faults_per_step']:.0f}), "
              f"ratio {run['ratio_vs_torch']:.2f}", flush=True)
    res: dict[str, Any] = {"runs": runs}
    # Per setting, the mean over its processes of: (key in the result, path in a run).
    means = {"jax_ex_per_s": ("jax", "ex_per_s"), "torch_ex_per_s": ("torch", "ex_per_s"),
             "ratio_vs_torch": ("ratio_vs_torch",), "mfu": ("mfu",),
             "jax_minor_faults_per_step": ("jax", "minor_faults_per_step"),
             "torch_minor_faults_per_step": ("torch", "minor_faults_per_step"),
             "jax_sys_s_per_step": ("jax", "sys_s_per_step")}
    for label in MALLOC_SETTINGS:
        sel = [r for r in runs if r["setting"] == label]
        res[label] = {key: statistics.mean(functools.reduce(dict.__getitem__, path, r)
                                           for r in sel) for key, path in means.items()}
    return res


def memory_child(steps: int) -> None:
    """Runs ``train_and_evaluate`` for ``steps`` steps; prints one JSON line with the peak RSS and
    the examples/s the training loop logged (every 10 steps)."""
    from roc_jax import train_lib

    config = mnre_config(use_images=False)
    config.train.max_steps = steps
    config.train.progress_bar = False
    config.train.log_every = 10
    config.train.checkpoint_every = 10**9
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        out = train_lib.train_and_evaluate(config, workdir)
        rates = [json.loads(line)["train/examples_per_sec"]
                 for f in sorted(Path(workdir).rglob("*.jsonl")) for line in f.open()
                 if "train/examples_per_sec" in line]
    print(json.dumps({"peak_rss_gb": benchlib.peak_rss_gb(), "ru_maxrss_gb":
                      benchlib.ru_maxrss_gb(), "steps": out["step"],
                      "wall_s": time.perf_counter() - t0, "host_memory": host_memory.status,
                      "examples_per_s_every_10_steps": [round(r, 2) for r in rates]}),
          flush=True)


def memory(args: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of a ``--memory-steps`` training run under each of ``MALLOC_SETTINGS`` (what each
    costs in memory, and gains in examples/s on real batches: the median of the logged rates
    after the first window, which holds the first compilation). The headline is ``huge_pages``,
    the entry points' setting."""
    res: dict[str, Any] = {}
    for label, setting in MALLOC_SETTINGS.items():
        r = child_json("--memory-child", ["--memory-steps", str(args.memory_steps)],
                       {"ROC_MNRE_DIR": str(mnre_dir()), **setting}, timeout=1800)
        rates = r["examples_per_s_every_10_steps"][1:]
        r["median_examples_per_s_after_first_window"] = statistics.median(rates) if rates else None
        res[label] = r
        print(f"[memory] {label}: peak RSS {r['peak_rss_gb']:.2f} GB over {r['steps']} steps, "
              f"{r['median_examples_per_s_after_first_window']} ex/s", flush=True)
    # The headline: what `python train.py` runs with (it restarts itself with huge pages).
    res["peak_rss_gb"] = res["huge_pages"]["peak_rss_gb"]
    res["steps"] = res["huge_pages"]["steps"]
    res["what"] = ("train_lib.train_and_evaluate, configs/mnre.py:offline, text only (minilm-l6),"
                   " raw MNRE train/val, batch 32, then one checkpoint; peak RSS (VmHWM) of that "
                   "process (ru_maxrss_gb: Linux carries the parent's peak into it over fork+exec);"
                   " under each of MALLOC_SETTINGS; the headline peak is huge_pages'")
    return res


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks per side")
    ap.add_argument("--iters", type=int, default=1, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--mm-repeats", type=int, default=3, help="timed blocks, multimodal")
    ap.add_argument("--variant-repeats", type=int, default=3, help="timed blocks, variants")
    ap.add_argument("--variants", default="no_dropout,no_attention_dropout,rbg_dropout,"
                    "nnx_dropout,erfc_gelu,before,generic_kernel_gradient,bf16,"
                    "bf16_f32_accumulation",
                    help="which prototyped changes to time next to the baseline")
    ap.add_argument("--matmul", type=int, default=2048)
    ap.add_argument("--memory-steps", type=int, default=200)
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jax-text-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--text-pair-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=tuple(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3,
                    help="text/multimodal: alternating JAX and PyTorch processes per framework")
    ap.add_argument("--keep", action="store_true",
                    help="keep the sections of an existing --out file that this run does not "
                         "measure (each section says when and under which load it was measured)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_steps)
        return
    if args.jax_text_child:
        jax_text_child(args)
        return
    if args.text_pair_child:
        text_pair_child(args)
        return
    if args.side_child:
        side_child(args)
        return
    # Like train.py: glibc's mapped blocks on 2 MiB pages (roc_jax.host_memory), so the headline
    # figures are what the entry points get; the children of malloc/memory set their own.
    host_memory.restart_with_huge_pages()
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS) - set(EXTRA_PARTS))
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; known: {PARTS + EXTRA_PARTS}")

    import jax
    import torch

    torch.set_num_threads(os.cpu_count())
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "train_step (CPU)", "setting": vars(args),
                              "machine": benchlib.machine(), "jax_devices":
                              [str(d) for d in jax.devices()],
                              "host_memory": host_memory.status,
                              "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    peak = None
    if "matmul" in parts:
        result["matmul"] = benchlib.matmul_flops(args.matmul)
        peak = result["matmul"]["flops_per_s"]
        print(f"[matmul] {peak / 1e9:.1f} GFLOP/s float32 ({args.matmul}^3)", flush=True)
    shared = shared_pieces()
    r, k = shared.relations_np["mask"].shape

    def stamp(part: str) -> None:
        result[part]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result[part]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]

    if {"text", "variants", "profile"} & set(parts):
        tcfg = build_roc(shared, image=False)[1]
        text_flops = flops_per_example(tcfg, LENGTH, BATCH, (r, k))
        batch = synthetic_batch(BATCH, LENGTH)
    if "text" in parts:
        result["text"] = compare("text", 0, args, peak, MALLOC_SETTINGS["glibc_default"])
        stamp("text")
    if "multimodal" in parts:
        result["multimodal"] = compare("multimodal", args.image_size, args, peak,
                                       MALLOC_SETTINGS["glibc_default"])
        result["multimodal"]["image_size"] = args.image_size
        stamp("multimodal")
    if "variants" in parts:
        result["variants"] = variants(shared, batch, args, text_flops, peak)
        stamp("variants")
    if "profile" in parts:
        profiles = ROOT / "benchmarks" / "profiles"
        result["profile"] = profile_train(shared, 0, profiles / "text_train_step.txt")
        result["profile"]["multimodal"] = profile_train(shared, args.image_size,
                                                        profiles / "multimodal_train_step.txt")
        stamp("profile")
    later_parts = {"compile": lambda: compile_epoch(shared),
                   "retrieval": lambda: retrieval(shared, args), "memory": lambda: memory(args),
                   "flags": lambda: flags_sweep(args), "malloc": lambda: malloc_ab(args),
                   "torch_env": lambda: torch_env_ab(args), "order": lambda: order_effect(args)}
    for part, run in later_parts.items():
        if part in parts:
            result[part] = run()
            stamp(part)
    out = Path(args.out)
    if args.keep and out.exists():
        old = json.loads(out.read_text())
        for part in PARTS + EXTRA_PARTS:
            if part not in result and part in old:
                # The kept figures were measured on the earlier file's machine, say which.
                result[part] = {"machine": old.get("machine"), **old[part],
                                "kept_from_earlier_run": True}
    result["summary"] = make_summary(result)
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result["summary"], indent=1, default=float), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out}")
    for sec in ("text", "multimodal"):
        for side in ("jax", "torch"):
            if sec in parts:
                assert math.isfinite(result[sec][side]["final_loss"]), f"non-finite {sec} {side}"


def make_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of whatever sections ``result`` holds, and the targets' verdicts."""
    summary: dict[str, Any] = {}
    if "text" in result:
        t = result["text"]
        summary.update(jax_ex_per_s=t["jax"]["ex_per_s"], torch_ex_per_s=t["torch"]["ex_per_s"],
                       ratio_vs_torch=t["ratio_vs_torch"], mfu=t.get("mfu"),
                       torch_mfu=t.get("torch_mfu"))
        if "jax_full" in t:
            summary.update(jax_full_ex_per_s=t["jax_full"]["ex_per_s"],
                           torch_pruned_ex_per_s=t["torch_pruned"]["ex_per_s"],
                           ratio_vs_torch_pruned=t["ratio_vs_torch_pruned"],
                           ratio_full_vs_torch=t["ratio_full_vs_torch"])
    if "matmul" in result:
        summary["matmul_gflops_f32"] = result["matmul"]["flops_per_s"] / 1e9
    if "multimodal" in result:
        m = result["multimodal"]
        summary.update(mm_image_size=m["image_size"], mm_jax_ex_per_s=m["jax"]["ex_per_s"],
                       mm_torch_ex_per_s=m["torch"]["ex_per_s"],
                       mm_ratio_vs_torch=m["ratio_vs_torch"], mm_mfu=m.get("mfu"))
        if "jax_full" in m:
            summary.update(mm_ratio_vs_torch_pruned=m["ratio_vs_torch_pruned"],
                           mm_ratio_full_vs_torch=m["ratio_full_vs_torch"])
    if "compile" in result:
        c = result["compile"]
        summary.update(compiles_per_epoch=c["compiles_per_epoch"], compile_limit=c["limit"],
                       buckets=c["buckets"], eval_shapes=c["eval_signatures"],
                       compile_s=c["xla_backend_compile_s"])
    if "retrieval" in result:
        summary["cache_vs_reencode_ratio"] = result["retrieval"]["eval"]["ratio"]
        summary["cache_vs_reencode_ratio_predict_batch8"] = result["retrieval"]["predict"]["ratio"]
        summary["cache_vs_reencode_ratio_scoring_only"] = (
            result["retrieval"]["scoring_only"]["ratio"])
    if "memory" in result:
        summary["peak_rss_gb"] = result["memory"]["peak_rss_gb"]
        for label in MALLOC_SETTINGS:
            if label in result["memory"]:
                summary[f"peak_rss_gb_{label}"] = result["memory"][label]["peak_rss_gb"]
    if "malloc" in result:
        summary["malloc_ratio_vs_torch"] = {k: result["malloc"][k]["ratio_vs_torch"]
                                            for k in MALLOC_SETTINGS if k in result["malloc"]}
    if "variants" in result:
        summary["variants_ex_per_s"] = {k: v["ex_per_s"] for k, v in result["variants"].items()
                                        if isinstance(v, dict) and "ex_per_s" in v}
    checks = {
        "ratio_vs_torch": ("ratio_vs_torch", lambda v: v >= TARGETS["ratio_vs_torch"]),
        "mfu": ("mfu", lambda v: v >= TARGETS["mfu"]),
        "cache_vs_reencode_ratio": ("cache_vs_reencode_ratio",
                                    lambda v: v >= TARGETS["cache_vs_reencode_ratio"]),
        "peak_rss_gb": ("peak_rss_gb", lambda v: v < TARGETS["peak_rss_gb"]),
    }
    summary["targets"] = TARGETS
    summary["target_met"] = {name: bool(ok(summary[key])) for name, (key, ok) in checks.items()
                             if summary.get(key) is not None}
    if "compiles_per_epoch" in summary:
        summary["target_met"]["compiles_per_epoch"] = (summary["compiles_per_epoch"]
                                                       <= summary["compile_limit"])
    summary["load_average_start"] = result["machine"]["load_average"]
    summary["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return summary


if __name__ == "__main__":
    main()
