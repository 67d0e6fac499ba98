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
from transformers.models.bert.modeling_bert import BertLayer


class TorchROC(nn.Module):
    """ROC in PyTorch: ``forward(batch, rel_emb [R, K, Dd], rel_mask [R, K]) -> logits [B, R]``."""

    def __init__(self, text: nn.Module, text_config: Any, vision: nn.Module | None,
                 vision_dim: int | None, description_dim: int, fusion_layers: int = 2,
                 proj_dim: int = 256, temperature_init: float = 0.07,
                 pair_gelu: str = "none"):
        super().__init__()
        # pair_gelu "tanh" matches roc_jax's pair MLP (jax.nn.gelu's default) for the parity check.
        self.text, self.vision, self.pair_gelu = text, vision, pair_gelu
        d = text_config.hidden_size
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
    """AdamW (decoupled weight decay, global-norm clipping 1.0): ``step(batch, rel, mask)``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def step(batch: dict[str, torch.Tensor], rel_emb: torch.Tensor,
             rel_mask: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(rel_emb.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch, rel_emb, rel_mask)
        loss = F.cross_entropy(logits.float(), batch["label"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return step
