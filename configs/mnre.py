"""MNRE-2 (Zheng et al., 2021): the paper's setting, and an offline variant.

``--config configs/mnre.py``         bert-base-uncased + CLIP ViT-B/32 from the hub.
``--config configs/mnre.py:offline`` MiniLM-L6 + DINOv2-S/14 from pip-installed weights (no
                                     hub access); the raw data folder comes from ``ROC_DATA_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from roc_jax.config_base import get_base_config


def _data_dir_from_env() -> str:
    value = os.environ.get("ROC_DATA_DIR", "")
    if not value:
        raise ValueError("configs/mnre.py:offline reads the raw MNRE folder from the environment "
                         "variable ROC_DATA_DIR, which is not set: "
                         "ROC_DATA_DIR=/path/to/mnre python train.py ...")
    if not (Path(value) / "mnre_train.txt").exists():
        raise FileNotFoundError(f"ROC_DATA_DIR={value}: mnre_train.txt not found there; point "
                                "ROC_DATA_DIR at the folder holding mnre_train.txt, mnre_val.txt "
                                "and ours_rel2id.json")
    return value


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.data.dataset = "mnre"
    c.data.raw_dir = os.environ.get("ROC_DATA_DIR", "")
    c.data.max_len = 80  # paper
    c.data.image_size = 224  # paper
    c.data.buckets = (32, 48, 64, 80)  # ours: MNRE tweets are short, most fit 48 pieces
    c.model.text_encoder = "bert-base-uncased"  # paper
    c.model.image_encoder = "clip-vit-b32"  # paper (the encoder of MKGformer / MORE baselines)
    c.model.fusion_layers = 2  # ours: the paper does not state the fusion depth
    c.model.proj_dim = 256  # ours
    c.model.temperature_init = 0.07  # ours (CLIP's initial value)
    c.train.batch_size = 32  # paper
    c.train.lr_encoder = 1e-5  # paper
    c.train.lr_head = 1e-3  # paper
    c.num_epochs = 20  # paper
    c.train.warmup_ratio = 0.1  # ours
    c.train.weight_decay = 0.01  # ours
    c.train.grad_clip = 1.0  # ours

    if arg == "offline":
        c.data.raw_dir = _data_dir_from_env()
        c.model.text_encoder = "minilm-l6"
        c.model.image_encoder = "dinov2-s14-offline"
    elif arg not in (None, ""):
        raise ValueError(f"configs/mnre.py: unknown variant ':{arg}' (known: ':offline')")
    return c
