"""One Flax NNX ViT for three Hugging Face checkpoint families.

- ``clip``: the CLIP vision tower (``CLIPVisionModel``): class embedding, pre-layernorm, pre-LN
  layers with quick-GELU, patch conv without bias. ``__call__`` returns HF's ``last_hidden_state``,
  which for CLIP is the encoder output *before* ``post_layernorm`` (HF applies that norm only to the
  pooled class token: ``ViT.pooled``).
- ``vit``: ``ViTModel`` (google/vit-*): pre-LN layers, final ``layernorm``, optional tanh pooler.
- ``dinov2``: ``Dinov2Model``: pre-LN layers with layer scale, patch 14, final ``layernorm``.

All take NHWC ``pixel_values [B, H, W, 3]`` and return every token, class token first,
``[B, 1 + N, D]``. Images whose size differs from ``config.image_size`` get the patch position
embeddings resized with PyTorch's bicubic kernel (``align_corners=False``), as HF does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from roc_jax.models.dropout import Dropout
from roc_jax.models.layers import (
    MultiHeadAttention,
    activation,
    dense,
    gradient_barrier,
    layer_norm,
    resize_grid,
)

Array = jax.Array

VARIANTS = ("clip", "vit", "dinov2")

# Per-variant defaults of the HF config classes, used when a config.json leaves a field out.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, qkv_bias=True),
    "vit": dict(patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12, qkv_bias=True),
    "dinov2": dict(patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True),
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT hyper-parameters (defaults: a tiny DINOv2-like model)."""

    variant: str = "dinov2"
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    add_pooler: bool = False
    # Ours, not a HF config.json field (from_hf leaves it at the default): the attention kernel,
    # see roc_jax.models.layers.ATTENTION_IMPLS. Set it with dataclasses.replace.
    attention_impl: str = "einsum"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}, expected one of {VARIANTS}")
        activation(self.hidden_act)

    @property
    def grid(self) -> int:
        """Patches per side of the pretrained position-embedding grid."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json") -> ViTConfig:
        """Builds the config from a HF ``config.json`` dict (CLIP, CLIP-vision, ViT or DINOv2)."""
        model_type = cfg.get("model_type")
        if model_type == "clip":
            if "vision_config" not in cfg:
                raise ValueError(f"{source}: CLIP config without 'vision_config'")
            cfg, variant = dict(cfg["vision_config"]), "clip"
        elif model_type == "clip_vision_model":
            variant = "clip"
        elif model_type in ("vit", "dinov2"):
            variant = model_type
        else:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not a supported image encoder "
                f"(expected 'clip', 'clip_vision_model', 'vit' or 'dinov2'; "
                f"architectures={cfg.get('architectures')})"
            )
        if variant == "dinov2" and cfg.get("use_swiglu_ffn", False):
            raise ValueError(f"{source}: use_swiglu_ffn=True (DINOv2 giant) is not supported")
        if cfg.get("num_channels", 3) != 3:
            raise ValueError(f"{source}: num_channels={cfg['num_channels']}, expected 3")
        merged: dict[str, Any] = dict(
            image_size=224, hidden_size=768, num_hidden_layers=12, num_attention_heads=12
        )
        merged.update(_DEFAULTS[variant])
        names = {f.name for f in dataclasses.fields(cls)}
        merged.update({k: v for k, v in cfg.items() if k in names})
        if variant == "dinov2":
            merged["intermediate_size"] = int(merged["hidden_size"] * cfg.get("mlp_ratio", 4))
        elif "intermediate_size" not in cfg:
            merged["intermediate_size"] = 4 * merged["hidden_size"]
        if variant == "clip":
            merged["attention_probs_dropout_prob"] = cfg.get("attention_dropout", 0.0)
            merged["hidden_dropout_prob"] = 0.0
        merged["variant"] = variant
        return cls(**merged)


class ViTLayer(nnx.Module):
    """Pre-LN layer: ``x += ls1 * Attn(LN(x)); x += ls2 * MLP(LN(x))``; ``[B, T, D] -> [B, T, D]``.

    ``layer_scale1/2`` exist only for DINOv2.
    """

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm1 = layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.attention = MultiHeadAttention(
            d,
            config.num_attention_heads,
            dropout=config.attention_probs_dropout_prob,
            dtype=dtype,
            attention_impl=config.attention_impl,
            rngs=rngs,
        )
        self.norm2 = layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.fc1 = dense(d, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = dense(config.intermediate_size, d, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.act = activation(config.hidden_act)
        if config.variant == "dinov2":
            init = jnp.full((d,), config.layerscale_value, jnp.float32)
            self.layer_scale1 = nnx.Param(init)
            self.layer_scale2 = nnx.Param(init)
        else:
            self.layer_scale1 = self.layer_scale2 = None
        self.dtype = dtype

    def _scale(self, h: Array, ls: nnx.Param | None) -> Array:
        return h if ls is None else h * ls[...].astype(self.dtype)

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        h = self.attention(self.norm1(x), mask)
        x = x + self._scale(self.dropout(h), self.layer_scale1)
        h = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + self._scale(self.dropout(h), self.layer_scale2)


class ViT(nnx.Module):
    """ViT encoder: ``pixel_values [B, H, W, 3] -> tokens [B, 1 + (H//P)*(W//P), D]``.

    Sub-modules: ``patch_embed`` (conv), ``cls_token [D]``, ``pos_embed [1 + grid**2, D]``,
    ``pre_norm`` (CLIP only), ``layers`` (``nnx.List`` of ``ViTLayer``), ``final_norm``,
    ``pooler`` (ViT only, when the checkpoint has one).
    """

    def __init__(self, config: ViTConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = config.hidden_size
        self.config = config
        self.dtype = dtype
        p = config.patch_size
        self.patch_embed = nnx.Conv(
            config.num_channels,
            d,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=config.variant != "clip",
            dtype=dtype,
            param_dtype=jnp.float32,
            rngs=rngs,
        )
        key = rngs.params()
        k1, k2 = jax.random.split(key)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(k1, (d,), jnp.float32))
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(k2, (1 + config.grid**2, d), jnp.float32)
        )
        eps = config.layer_norm_eps
        self.pre_norm = (
            layer_norm(d, eps, dtype=dtype, rngs=rngs) if config.variant == "clip" else None
        )
        self.layers = nnx.List(
            [ViTLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.final_norm = layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.pooler = (
            dense(d, d, dtype=dtype, rngs=rngs)
            if config.add_pooler and config.variant == "vit"
            else None
        )
        self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)

    def position_embeddings(self, grid_hw: tuple[int, int]) -> Array:
        """``[1 + gh * gw, D]`` float32: the class position plus the (resized) patch grid."""
        pos = self.pos_embed[...]
        g = self.config.grid
        patches = resize_grid(pos[1:].reshape(g, g, -1), grid_hw).reshape(-1, pos.shape[-1])
        return jnp.concatenate([pos[:1], patches], axis=0)

    def __call__(self, pixel_values: Array) -> Array:
        if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be NHWC [B, H, W, {self.config.num_channels}], "
                f"got shape {pixel_values.shape}"
            )
        b = pixel_values.shape[0]
        x = self.patch_embed(pixel_values.astype(self.dtype))  # [B, gh, gw, D]
        gh, gw, d = x.shape[1:]
        x = x.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d))
        x = jnp.concatenate([cls, x], axis=1)
        x = x + self.position_embeddings((gh, gw)).astype(self.dtype)[None]
        x = self.dropout(x)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for layer in self.layers:
            x = gradient_barrier(layer(x))  # see gradient_barrier: a pre-LN residual stream
        if self.config.variant == "clip":
            return x  # HF CLIP's last_hidden_state is not post-normed (see module docstring)
        return self.final_norm(x)

    def pooled(self, tokens: Array) -> Array:
        """``[B, 1 + N, D] -> [B, D]``: HF's ``pooler_output`` for the variant.

        CLIP: ``post_layernorm(tokens[:, 0])``; ViT with pooler: ``tanh(W tokens[:, 0])``;
        otherwise the class token.
        """
        cls = tokens[:, 0]
        if self.config.variant == "clip":
            return self.final_norm(cls)
        if self.pooler is not None:
            return jnp.tanh(self.pooler(cls))
        return cls
