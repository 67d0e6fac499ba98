"""ROC and its train step in PyTorch with ``transformers``, the reference for the benchmarks.

It mirrors ``roc_jax.models.roc.ROC`` layer for layer (text tower, optional image tower projected
to the text width plus an image-type vector, BERT fusion layers over the concatenated tokens, pair
vector from the marker states -> Linear -> GELU -> LayerNorm -> projection, relation vectors from
the projected descriptions, cosine / learned temperature, cross-entropy) with AdamW.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TorchROC(nn.Module):
    """ROC in PyTorch: ``forward(batch, rel_emb [R, K, Dd], rel_mask [R, K]) -> logits [B, R]``."""

    def __init__(self, text: nn.Module, text_config: Any, vision: nn.Module | None,
                 vision_dim: int | None, description_dim: int, fusion_layers: int = 2,
                 proj_dim: int = 256, temperature_init: float = 0.07,
                 pair_gelu: str = "none"):
        super().__init__()
        # "tanh" matches roc_jax's pair MLP (jax.nn.gelu's default approximation); "none" (exact)
        # is PyTorch's default. The cost is the same; parity checks need the match.
        self.pair_gelu = pair_gelu
        from transformers.models.bert.modeling_bert import BertLayer

        d = text_config.hidden_size
        self.text = text
        self.vision = vision
        if vision is not None:
            self.image_proj = nn.Linear(vision_dim, d)
            self.image_type = nn.Parameter(torch.zeros(d))
        self.fusion = nn.ModuleList([BertLayer(text_config) for _ in range(fusion_layers)])
        self.pair_mlp = nn.Linear(2 * d, d)
        self.pair_norm = nn.LayerNorm(d)
        self.pair_proj = nn.Linear(d, proj_dim)
        self.rel_proj = nn.Linear(description_dim, proj_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)))

    def forward(self, batch: dict[str, torch.Tensor], rel_emb: torch.Tensor,
                rel_mask: torch.Tensor) -> torch.Tensor:
        amask = batch["attention_mask"]
        x = self.text(input_ids=batch["input_ids"], attention_mask=amask).last_hidden_state
        mask = amask.bool()
        if self.vision is not None:
            img = self.vision(pixel_values=batch["pixel_values"]).last_hidden_state
            img = self.image_proj(img) + self.image_type
            has = batch["has_image"].bool()[:, None].expand(-1, img.shape[1])
            x = torch.cat([x, img.to(x.dtype)], dim=1)
            mask = torch.cat([mask, has], dim=1)
        additive = (~mask)[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        markers = torch.stack([batch["head_index"], batch["tail_index"]], dim=1)  # [B, 2]
        for layer in self.fusion:  # every position of every layer, as the field's code does
            out = layer(x, attention_mask=additive)
            x = out[0] if isinstance(out, tuple) else out
        pair = torch.gather(x, 1, markers[..., None].expand(-1, -1, x.shape[-1])).flatten(1)
        h = self.pair_norm(F.gelu(self.pair_mlp(pair), approximate=self.pair_gelu))
        pair = F.normalize(self.pair_proj(h).float(), dim=-1)
        desc = F.normalize(self.rel_proj(rel_emb).float(), dim=-1)  # [R, K, P]
        m = rel_mask.float()[..., None]
        rel = F.normalize((desc * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)  # [R, P]
        t = self.log_temperature.exp().clamp_min(0.01)
        return pair @ rel.T / t


def make_train_step(model: TorchROC, lr: float = 1e-5, *, bf16: bool = False):
    """AdamW (decoupled weight decay, global-norm clipping 1.0): ``step(batch, rel, mask) -> loss``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def step(batch: dict[str, torch.Tensor], rel_emb: torch.Tensor,
             rel_mask: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        device_type = "cuda" if rel_emb.is_cuda else "cpu"
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch, rel_emb, rel_mask)
        loss = F.cross_entropy(logits.float(), batch["label"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return step


# ---------------------------------------------------------------------------------------------
# Same weights in both frameworks: roc_jax ROC -> TorchROC state dict.


def _jax_param(module: Any, path: tuple) -> Any:
    import numpy as np

    obj = module
    for key in path:
        obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    return np.asarray(obj[...], np.float32)


# transformers >= 5 names DINOv2's attention projections q/k/v/o_proj (4.x: attention.attention.*).
_RENAMES = ((".attention.attention.query.", ".attention.q_proj."),
            (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."),
            (".attention.output.dense.", ".attention.o_proj."))


def _from_name_map(module: Any, name_map: dict, prefix: str, like: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """HF tensors of ``module`` (a roc_jax encoder or layer) through its weights name map.

    Inverts ``roc_jax.models.weights._transform``: linear kernels ``[in, out] -> [out, in]``,
    conv kernels ``[kh, kw, in, out] -> [out, in, kh, kw]``, reshaped tensors to the torch shape.
    """
    import numpy as np

    out = {}
    for hf, (path, kind) in name_map.items():
        name = prefix + hf
        if name not in like:
            for old, new in _RENAMES:  # newer transformers' names of the same tensors
                name = name.replace(old, new)
        if name not in like:
            continue  # e.g. a pooler the torch module was built without
        x = _jax_param(module, path)
        if kind == "linear" and x.ndim == 2:
            x = x.T
        elif kind == "conv" and x.ndim == 4:
            x = x.transpose(3, 2, 0, 1)
        x = np.ascontiguousarray(x).reshape(tuple(like[name].shape))
        out[name] = torch.from_numpy(x.copy())
    return out


def state_dict_from_roc(jax_model: Any, torch_model: TorchROC) -> dict[str, torch.Tensor]:
    """A ``TorchROC`` state dict holding exactly ``jax_model``'s (``roc_jax.models.roc.ROC``)
    parameters, for ``torch_model.load_state_dict(..., strict=True)``.

    Uses the encoders' name maps of ``roc_jax.models.weights`` (the ones the loaders and the parity
    tests use); the fusion layers are BERT layers, mapped through the BERT layer-0 entries.
    """
    import dataclasses

    from roc_jax.models import weights

    like = torch_model.state_dict()
    sd: dict[str, torch.Tensor] = {}
    sd.update(_from_name_map(jax_model.text, weights.bert_name_map(jax_model.text.config),
                             "text.", like))
    if jax_model.vision is not None:
        sd.update(_from_name_map(jax_model.vision, weights.vit_name_map(jax_model.vision.config),
                                 "vision.", like))
    one = weights.bert_name_map(dataclasses.replace(jax_model.text.config, num_hidden_layers=1,
                                                    add_pooler=False))
    layer0 = {hf[len("encoder.layer.0."):]: (path[2:], kind) for hf, (path, kind) in one.items()
              if hf.startswith("encoder.layer.0.")}
    for i, layer in enumerate(jax_model.fusion):
        sd.update(_from_name_map(layer, layer0, f"fusion.{i}.", like))
    heads = {"pair_mlp": "linear", "pair_proj": "linear", "rel_proj": "linear",
             "image_proj": "linear"}
    for name, kind in heads.items():
        mod = getattr(jax_model, name, None)
        if mod is not None and f"{name}.weight" in like:
            sd.update(_from_name_map(mod, {"weight": (("kernel",), kind), "bias": (("bias",), "id")},
                                     f"{name}.", like))
    sd.update(_from_name_map(jax_model.pair_norm, {"weight": (("scale",), "id"),
                                                   "bias": (("bias",), "id")}, "pair_norm.", like))
    for name in ("image_type", "log_temperature"):
        if name in like:
            sd.update(_from_name_map(jax_model, {name: ((name,), "id")}, "", like))
    missing = sorted(set(like) - set(sd))
    # Buffers (position ids, token-type ids) are not parameters; everything else must be there.
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))
               and "mask_token" not in k]
    if missing:
        raise KeyError(f"TorchROC parameters with no roc_jax counterpart: {missing[:10]}")
    return sd
