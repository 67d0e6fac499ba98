"""Building blocks shared by the BERT and ViT encoders.

Parameters are always float32 (``param_dtype``); ``dtype`` is the compute dtype (float32 or
bfloat16). Softmax and layer-norm statistics are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from roc_jax.models.dropout import Dropout

Array = jax.Array


def quick_gelu(x: Array) -> Array:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)``."""
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_exact(x: Array) -> Array:
    # transformers' GELUActivation: x/2 (1 + erf(x / sqrt 2)). jax.nn.gelu(approximate=False) is
    # the erfc form, which XLA:CPU lowers to exp and selects: 3x slower forward than erf (a
    # clamped rational polynomial) on [32, 64, 1536], and 4 % of the MiniLM train step.
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


# Hugging Face ``hidden_act`` names -> functions (the same formulas as transformers' ACT2FN).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation function for a Hugging Face ``hidden_act`` name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act={name!r} is not supported; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(in_f: int, out_f: int, *, dtype, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    """``nnx.Linear`` with float32 parameters, a BERT-style N(0, 0.02) kernel init and
    ``dense_dot_general`` as its product."""
    return nnx.Linear(
        in_f,
        out_f,
        use_bias=bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(0.02),
        dot_general=dense_dot_general,
        rngs=rngs,
    )


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None, out_sharding=None) -> Array:
    """``jax.lax.dot_general`` for ``nnx.Linear``: on a CPU, ``x [..., K] . kernel [K, N]`` goes
    through ``_dense_product``, whose kernel gradient XLA:CPU runs on its fast matmul path.

    Why: the kernel gradient ``x^T g`` contracts the leading (batch x length) axis of both
    operands. XLA:CPU hands a product to its fast (YNNPACK) kernels only when the left operand is
    contracted on its last axis, so it computed every kernel gradient with its slower generic dot
    after transposing the gradient ``g`` (``[M, N] -> [N, M]``, also for ``N = 1536``). Here the
    smaller of ``x`` and ``g`` is transposed explicitly and the product is an ordinary one: the
    MiniLM text train step went from 24.8 to 28.6 examples/s (docs/performance.md; the
    ``generic_kernel_gradient`` variant of ``benchmarks/results/train_step.json``).
    Any other product (other dimension numbers, a precision or result type, a sharded result),
    and every product on a GPU or TPU, is ``jax.lax.dot_general`` itself. Being a
    ``jax.custom_vjp``, the CPU form has reverse-mode derivatives only: ``jax.jvp`` and
    ``jax.jacfwd`` through a dense layer on a CPU raise (nothing in roc_jax uses them).
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (jax.default_backend() == "cpu" and rhs.ndim == 2
            and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
            and not lhs_batch and not rhs_batch and precision is None
            and preferred_element_type is None and out_sharding is None
            and lhs.dtype == rhs.dtype):
        return _dense_product(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)


@jax.custom_vjp
def _dense_product(x: Array, kernel: Array) -> Array:
    """``x [..., K] . kernel [K, N] -> [..., N]``; the gradients are the usual ones, computed as
    ``_dense_product_bwd`` says."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _dense_product_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return _dense_product(x, kernel), (x, kernel)


def _dense_product_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    """``dx = g . kernel^T`` (already a fast product); ``dkernel = x^T g`` over the ``M`` rows of
    ``x [M, K]`` and ``g [M, N]``, written as a product contracting its left operand's last axis:
    ``transpose(x) [K, M] . g`` when ``K <= N``, else ``transpose(transpose(g) [N, M] . x)``
    (transposing ``[M, K]`` with ``K = 1536`` cost more than it saved). The optimization
    barriers keep XLA from folding the transposes back into the product's dimension numbers;
    ``tests/test_layers.py::test_dense_layer_gradients_compile_to_last_axis_products`` checks
    the compiled result (unlike ``gradient_barrier``'s case, where a barrier did not help)."""
    x, kernel = res
    k, n = kernel.shape
    x2, g2 = x.reshape(-1, k), g.reshape(-1, n)
    dx = jax.lax.dot_general(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    if k <= n:
        dkernel = jax.lax.optimization_barrier(x2.T) @ g2
    else:
        dkernel = jax.lax.optimization_barrier(jax.lax.optimization_barrier(g2.T) @ x2).T
    return dx, dkernel


_dense_product.defvjp(_dense_product_fwd, _dense_product_bwd)


def layer_norm(dim: int, eps: float, *, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """``nnx.LayerNorm`` with float32 parameters and two-pass (stable) variance, like PyTorch."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        rngs=rngs,
    )


@jax.custom_vjp
def gradient_barrier(x: Array) -> Array:
    """The identity; in the backward pass, the gradient reaching ``x`` is materialized.

    Why: in a pre-LN encoder (the ViTs) the residual stream's gradient is an element-wise sum over
    all the layers above, and XLA:CPU fuses that sum into each consumer instead of writing it
    once, recomputing it per consumer: about 2 of the multimodal train step's 6.8 s went to 24
    such fusions, growing with depth (``benchmarks/profiles/multimodal_train_step-before.txt``).
    An optimization barrier does not survive XLA:CPU's pipeline, so the gradient passes through a
    conditional, whose operand is a buffer. Its predicate is "the gradient's first element is
    finite"; when it is not, the whole gradient becomes NaN (the step is non-finite either way,
    and the trainer stops on it). CPU only: on a GPU a conditional costs a device-to-host copy of
    its predicate, so there (and on TPUs) this is the identity in both passes.
    """
    return x


def _barrier_fwd(x: Array) -> tuple[Array, None]:
    return x, None


def _barrier_bwd(_: None, g: Array) -> tuple[Array]:
    if jax.default_backend() != "cpu":  # static, at trace time
        return (g,)
    finite = jnp.isfinite(g.reshape(-1)[0])
    return (jax.lax.cond(finite, lambda v: v, lambda v: jnp.full_like(v, jnp.nan), g),)


gradient_barrier.defvjp(_barrier_fwd, _barrier_bwd)


# ``attention_impl`` values. "einsum": two einsums around a float32 softmax, with dropout on the
# probabilities (the reference). "fused": ``jax.nn.dot_product_attention``; on a GPU with bf16/fp16
# compute it is asked for cuDNN's flash-attention kernel explicitly (``implementation=None`` means
# plain XLA in jax 0.10), elsewhere its XLA implementation. The fused kernel has no dropout on the
# attention probabilities, so "fused" refuses to train with ``attention_probs_dropout_prob > 0``.
ATTENTION_IMPLS = ("einsum", "fused")


def fused_attention_backend(dtype, head_dim: int, length: int, num_queries: int | None = None
                            ) -> str:
    """The ``implementation`` that ``attention_impl="fused"`` passes to dot_product_attention.

    ``"cudnn"`` when the default backend is a GPU, the compute dtype is bf16/fp16 (cuDNN's flash
    attention has no float32 kernel), the head dim is a multiple of 8 up to 128 and the key length
    and query count (``num_queries``, default ``length``) are even (cuDNN's condition for training
    with a bias, which is how the key mask reaches it); otherwise ``"xla"``. The rule is static,
    so one config always compiles the same kernel.
    """
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if (jax.default_backend() == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128
            and length % 2 == 0 and (length if num_queries is None else num_queries) % 2 == 0):
        return "cudnn"
    return "xla"


def take_positions(x: Array, positions: Array) -> Array:
    """``x [B, L, D]``, ``positions [B, Q]`` int -> ``[B, Q, D]``: the rows of each sequence."""
    return jnp.take_along_axis(x, positions[..., None].astype(jnp.int32), axis=1)


class MultiHeadAttention(nnx.Module):
    """Self-attention with separate query/key/value/output projections (the HF layout).

    ``__call__(x [B, L, D], mask [B, L] bool | None) -> [B, L, D]``. The mask marks the keys that
    may be attended to (any pattern, not only right padding); masked logits are the float32
    minimum (transformers adds it: the same values), so a padded query still yields finite
    values. A query whose keys are all masked attends uniformly to every key in both
    implementations.

    ``attention_impl`` picks the kernel (see ``ATTENTION_IMPLS``); "einsum" is the default and
    the reference. "fused" raises ``ValueError`` when called in training mode with a nonzero
    attention dropout, since the fused kernel cannot drop attention probabilities: set
    ``attention_probs_dropout_prob=0`` (a change of the recipe, so it is the user's to make) or
    use "einsum". In evaluation mode (``model.eval()``) the dropout is inactive and "fused" runs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        dropout: float = 0.0,
        dtype=jnp.float32,
        attention_impl: str = "einsum",
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of num_heads {num_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r}, expected one of {ATTENTION_IMPLS}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.query = dense(dim, dim, dtype=dtype, rngs=rngs)
        self.key = dense(dim, dim, dtype=dtype, rngs=rngs)
        self.value = dense(dim, dim, dtype=dtype, rngs=rngs)
        self.out = dense(dim, dim, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(dropout, rngs=rngs)

    def __call__(self, x: Array, mask: Array | None = None, queries: Array | None = None) -> Array:
        """``x [B, L, D] -> [B, L, D]``, or ``[B, Q, D]`` for the positions ``queries [B, Q]``.

        With ``queries`` only those positions are projected to queries and attended from; keys
        and values still come from every position, so row ``j`` of the result equals row
        ``queries[:, j]`` of the full result (the head reads two positions of the last layer).
        """
        b, length, _ = x.shape
        xq = x if queries is None else take_positions(x, queries)
        heads = (self.num_heads, self.head_dim)
        # Scaling q (not the logits) keeps the [B, H, Q, L] tensor's producer a single einsum.
        q = self.query(xq).reshape(*xq.shape[:2], *heads) * jnp.asarray(self.head_dim**-0.5,
                                                                         self.dtype)
        k = self.key(x).reshape(b, length, *heads)
        v = self.value(x).reshape(b, length, *heads)
        if self.attention_impl == "fused":
            return self.out(self._fused(q, k, v, mask).reshape(*xq.shape[:2], -1))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if mask is not None:
            # A select, not transformers' added bias (the same values: |logit| is far below the
            # spacing of floats near finfo.min). XLA:CPU fused ``logits + bias``, the softmax and
            # both products into one YNNPACK fusion that allocates its [B, H, Q, L] temporaries
            # on every call and hands them back to the kernel (about 27,000 page faults per
            # MiniLM forward at batch 32 x 64); with the select, XLA keeps them in its buffers.
            logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        probs = self.dropout(probs)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(*xq.shape[:2], -1)
        return self.out(ctx)

    def _fused(self, q: Array, k: Array, v: Array, mask: Array | None) -> Array:
        """``jax.nn.dot_product_attention``: q ``[B, Q, N, H]`` (already scaled), k and v
        ``[B, L, N, H]``."""
        if self.dropout.rate > 0 and not self.dropout.deterministic:
            raise ValueError(
                f"attention_impl='fused' cannot apply attention dropout "
                f"(rate {self.dropout.rate}) in training: the fused kernel has no dropout on the "
                f"attention probabilities. Set attention_probs_dropout_prob=0 in the encoder "
                f"config, or use attention_impl='einsum'."
            )
        b, num_q, length = q.shape[0], q.shape[1], k.shape[1]
        impl = fused_attention_backend(self.dtype, self.head_dim, length, num_q)
        if mask is not None:
            # [B, 1, 1, S] broadcasts over heads and queries for XLA; cuDNN turns the mask into an
            # additive bias and checks that bias has the full [.., T, S] extent. A general boolean
            # mask (not key_value_seq_lengths) because the fusion layers mask [text | image]
            # tokens, which is not right padding.
            mask = mask.astype(bool)[:, None, None, :]
            if impl == "cudnn":
                mask = jnp.broadcast_to(mask, (b, 1, num_q, length))
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=impl)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch's a=-0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` matrix of ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``.

    Built in float64 numpy at trace time (sizes are static), so resizing is two small matmuls.
    """
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)  # [out, 4]
    mat = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(mat, (np.arange(out_size), idx), w[:, tap])
    return mat


def resize_grid(grid: Array, out_hw: tuple[int, int]) -> Array:
    """Bicubic resize of a ``[h, w, D]`` grid to ``[H, W, D]``, matching PyTorch (float32)."""
    h, w, _ = grid.shape
    if (h, w) == tuple(out_hw):
        return grid
    mh = jnp.asarray(bicubic_matrix(h, out_hw[0]), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(w, out_hw[1]), jnp.float32)
    grid = grid.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    return jnp.einsum("Hh,Ww,hwd->HWd", mh, mw, grid, precision=hp)
