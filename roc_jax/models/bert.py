"""A Flax NNX BERT encoder whose parameters map one-to-one onto Hugging Face ``BertModel``.

The name map (HF tensor name -> NNX path) lives in ``roc_jax.models.weights.bert_name_map``; the
parity test against ``transformers.BertModel`` is ``tests/test_bert.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from roc_jax.models.dropout import Dropout
from roc_jax.models.layers import MultiHeadAttention, activation, dense, layer_norm, take_positions

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of a HF BERT ``config.json`` that the encoder uses (defaults: a tiny model)."""

    vocab_size: int = 1000
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 128
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooler: bool = True
    # Ours, not a HF config.json field (from_hf leaves it at the default): the attention kernel,
    # see roc_jax.models.layers.ATTENTION_IMPLS. Set it with dataclasses.replace.
    attention_impl: str = "einsum"

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, source: str = "config.json") -> BertConfig:
        """Builds the config from a HF ``config.json`` dict; rejects non-BERT architectures."""
        model_type = cfg.get("model_type")
        if model_type != "bert":
            raise ValueError(
                f"{source}: model_type={model_type!r}, expected 'bert' "
                f"(architectures={cfg.get('architectures')})"
            )
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type={pos!r}; only 'absolute' is supported"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in cfg:
                kwargs[f.name] = cfg[f.name]
        missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers") if n not in cfg]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}")
        activation(kwargs.get("hidden_act", cls.hidden_act))  # fail early on an unknown activation
        return cls(**kwargs)


class BertEmbeddings(nnx.Module):
    """Word + position + token-type embeddings, layer norm, dropout: ``[B, L] -> [B, L, D]``."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        def embed(n: int) -> nnx.Embed:
            return nnx.Embed(
                n,
                config.hidden_size,
                dtype=dtype,
                param_dtype=jnp.float32,
                embedding_init=nnx.initializers.normal(0.02),
                rngs=rngs,
            )

        self.word_embeddings = embed(config.vocab_size)
        self.position_embeddings = embed(config.max_position_embeddings)
        self.token_type_embeddings = embed(config.type_vocab_size)
        self.layer_norm = layer_norm(
            config.hidden_size, config.layer_norm_eps, dtype=dtype, rngs=rngs
        )
        self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.max_len = config.max_position_embeddings
        self.dtype = dtype

    def __call__(self, input_ids: Array, token_type_ids: Array | None = None) -> Array:
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} > max_position_embeddings {self.max_len}")
        # Only the word embeddings are a gather; it reads the float32 table and casts afterwards,
        # so that its gradient (a scatter-add of B*L rows) accumulates in float32 under bf16.
        # Positions are a slice and segment types a select: their gradients are plain sums.
        types = self.token_type_embeddings.embedding[...]
        if token_type_ids is None:
            # All segment 0: a broadcast row, whose gradient is a sum over tokens.
            token_type = jnp.broadcast_to(types[0], (*input_ids.shape, types.shape[1]))
        else:
            # A select per type (2 in BERT) instead of a gather: the gather's gradient is a
            # scatter-add of B*L rows into those few rows, which a GPU serializes on atomics
            # (103 of 184 ms of a batch-256 bf16 step on an H100, one kernel); a select's
            # gradient is a masked sum.
            tt = token_type_ids[..., None]
            token_type = sum(jnp.where(tt == t, types[t], 0.0) for t in range(types.shape[0]))
        x = (
            jnp.take(self.word_embeddings.embedding[...], input_ids, axis=0).astype(self.dtype)
            + self.position_embeddings.embedding[...][:length].astype(self.dtype)[None]
            + token_type.astype(self.dtype)
        )
        return self.dropout(self.layer_norm(x))


class BertLayer(nnx.Module):
    """A post-LN transformer layer: ``(x [B, L, D], mask [B, L]) -> [B, L, D]``.

    ``x = LN(x + Attn(x)); x = LN(x + FFN(x))`` as in BERT. ``mask`` is 1/True for real tokens.
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.attention = MultiHeadAttention(
            d,
            config.num_attention_heads,
            dropout=config.attention_probs_dropout_prob,
            dtype=dtype,
            attention_impl=config.attention_impl,
            rngs=rngs,
        )
        self.attention_norm = layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.intermediate = dense(d, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.output = dense(config.intermediate_size, d, dtype=dtype, rngs=rngs)
        self.output_norm = layer_norm(d, eps, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.act = activation(config.hidden_act)

    def __call__(self, x: Array, mask: Array | None = None, queries: Array | None = None) -> Array:
        """``queries [B, Q]`` (positions) -> ``[B, Q, D]``: the layer's output at those positions
        alone; they attend to every position, and the rest of the layer (attention output,
        FFN) runs on Q rows instead of L."""
        if mask is not None:
            mask = mask.astype(bool)
        residual = x if queries is None else take_positions(x, queries)
        x = self.attention_norm(residual + self.dropout(self.attention(x, mask, queries)))
        h = self.output(self.act(self.intermediate(x)))
        return self.output_norm(x + self.dropout(h))


class BertPooler(nnx.Module):
    """``tanh(W x[:, 0] + b)``: ``[B, L, D] -> [B, D]`` (HF's pooler_output)."""

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = dense(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, hidden: Array) -> Array:
        return jnp.tanh(self.dense(hidden[:, 0]))


class BertEncoder(nnx.Module):
    """BERT: ``(input_ids [B, L], attention_mask [B, L], token_type_ids [B, L] | None) -> [B, L, D]``.

    Returns HF's ``last_hidden_state``. ``pooler`` (``BertPooler`` or None) is kept so that a
    checkpoint loads without unexpected keys; call ``encoder.pooler(hidden)`` for ``[B, D]``.
    Dropout follows NNX modes: ``encoder.eval()`` / ``encoder.train()``.
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embeddings = BertEmbeddings(config, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [BertLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.pooler = BertPooler(config, dtype=dtype, rngs=rngs) if config.add_pooler else None

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
    ) -> Array:
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        mask = attention_mask.astype(bool)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x
