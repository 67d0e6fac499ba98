"""MORE (multimodal object-entity relation extraction): the tail is an object in the image.

The tail vector pools the fused image-patch states inside the object's box (``tail_box``), so the
image tower is always on.
"""

from __future__ import annotations

import os

import ml_collections

from roc_jax.config_base import get_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.data.dataset = "more"
    c.data.raw_dir = os.environ.get("ROC_MORE_DIR", "")
    c.data.use_images = True
    c.data.eval_split = "valid"  # MORE's file names: txt/{train,valid,test}.txt
    c.data.max_len = 80  # ours
    c.model.text_encoder = "bert-base-uncased"
    c.model.image_encoder = "clip-vit-b32"
    c.train.batch_size = 32
    c.num_epochs = 20
    if arg == "offline":
        c.model.text_encoder = "minilm-l6"
        c.model.image_encoder = "dinov2-s14-offline"
    elif arg not in (None, ""):
        raise ValueError(f"configs/more.py: unknown variant ':{arg}' (known: ':offline')")
    return c
