"""Defaults shared by every experiment config under ``configs/`` (ml_collections ``ConfigDict``).

In the package (not in ``configs/``) so that config files, which config_flags loads by path from
any working directory, can import it.

Entry points load a config with ``--config configs/<name>.py[:variant]`` and override any field
with ``--config.section.key=value``; an unknown key is an error (the dict is locked).
"""

from __future__ import annotations

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Top level (not under train) so that `--config.num_epochs=1` works as in the README.
    c.num_epochs = 20
    # Multi-process runs (TPU pod slices, multi-node GPU, local trials): docs/multihost.md.
    # Joining is on with `enabled`, or when JAX_COORDINATOR_ADDRESS is in the environment; the
    # empty / -1 fields come from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID,
    # else from jax's auto-detection (Cloud TPU, SLURM, Open MPI).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""  # 'host:port' of process 0
    c.distributed.num_processes = -1
    c.distributed.process_id = -1

    # --- data -------------------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.dataset = "mnre"  # 'mnre' | 'more'
    c.data.raw_dir = ""  # the raw dataset folder (dict-per-line files + img_org/)
    # Where the TFDS dataset is built once and read with tfds.data_source; independent of the
    # workdir so that several runs share one build. '' -> ~/tensorflow_datasets.
    c.data.tfds_dir = ""
    c.data.source = "tfds"  # 'tfds' (build once, tfds.data_source) | 'raw' (the readers directly)
    c.data.entity_types = "spacy"  # NER type words in the markers; 'none' for the ablation
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.use_images = True
    c.data.image_size = 224
    c.data.max_len = 80
    # Sequence-length buckets: one compiled step per bucket shape.
    c.data.buckets = (32, 48, 64, 80)
    c.data.marker_style = "typed"  # typed entity markers: '@ * person * ... @', '# ^ loc ^ ... #'
    c.data.num_workers = 0  # grain worker processes (0: in-process)
    c.data.descriptions = ""  # '' -> the shipped description file of the dataset
    # Protocols (roc_jax.data.subsets): a seeded fraction of the training split (low resource),
    # and relations whose training samples are all removed and which are no candidates in
    # training (zero-shot); evaluation keeps every relation as a candidate.
    c.data.train_fraction = 1.0
    c.data.subset_seed = 0  # the fraction's draw: fixed, so every head and seed share a subset
    c.data.unseen_relations = ()

    # --- model ------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.head = "retrieval"  # 'retrieval' (ROC) | 'classification' (the softmax baseline)
    c.model.text_encoder = "bert-base-uncased"  # preset name or local HF folder
    c.model.image_encoder = "clip-vit-b32"
    c.model.description_encoder = ""  # '' -> the text encoder's preset
    # Random encoders (tests, smoke runs). Must be set explicitly; they are logged loudly.
    c.model.random_init = False
    c.model.text_config = ml_collections.ConfigDict()  # BertConfig fields when random_init
    c.model.image_config = ml_collections.ConfigDict()  # ViTConfig fields when random_init
    c.model.train_description_tower = False
    c.model.description_max_len = 32
    c.model.fusion_layers = 2
    c.model.proj_dim = 256
    c.model.temperature_init = 0.07
    c.model.dtype = "float32"  # compute dtype ('bfloat16' on TPU/GPU); parameters stay float32
    # Batches where no row has an image skip the vision tower and fuse the text alone (lax.cond).
    c.model.skip_vision_without_images = True
    # Batches with 1..vision_rows images run the ViT on those rows alone (0: all rows).
    c.model.vision_rows = 4
    # The last fusion layer computes the two entity-marker positions alone (plus the image
    # tokens for object tails): exact, and a tenth fewer FLOPs in the text step. False: all.
    c.model.prune_last_fusion_layer = True

    # --- training ---------------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # global batch; a multiple of the device count
    c.train.eval_batch_size = 64
    c.train.max_steps = -1  # > 0: stop after this many steps (smoke runs, resume tests)
    c.train.lr_encoder = 1e-5  # pretrained text / image encoders
    c.train.lr_head = 1e-3  # new layers: fusion, projections, heads, temperature
    c.train.warmup_ratio = 0.1
    c.train.weight_decay = 0.01
    c.train.grad_clip = 1.0
    # Retrieval head: weight of the InfoNCE loss's other direction (roc_jax.losses.
    # relation_to_pair_xent: each relation retrieves its pairs among the batch's), added to the
    # pair-to-relation loss; 0: one direction. The classification head does not use it unless
    # softmax_relation_to_pair is set: a control, the same column loss over the softmax head's
    # logits; the baseline keeps the plain cross-entropy.
    c.train.relation_to_pair_weight = 0.0
    c.train.softmax_relation_to_pair = False
    c.train.log_every = 50
    c.train.max_steps_in_flight = 2  # bound on queued (dispatched, unfinished) steps; 0: none
    c.train.checkpoint_every = 500  # steps; plus one at every epoch end (with dev metrics)
    c.train.eval_every_epochs = 1
    c.train.progress_bar = True
    return c
