"""Dropout whose masks are cheap on a CPU: an unrolled threefry, 16 random bits per element.

Why not ``flax.nnx.Dropout``: it calls ``jax.random.bernoulli``, which on a CPU lowers threefry
as a rolled loop (five passes that each write and read two uint32 arrays of the mask's size),
computes a full threefry block per element and keeps 32 bits of its 64, converts them to a float
uniform, and divides by ``keep``. That was 8 % of the MiniLM train step. Here one threefry block
(64 bits) decides four elements, its 20 rounds are unrolled into one fused kernel, the compare is
on integers and the scale is a multiply. The masks follow the same key discipline (one key per
call from the module's ``dropout`` stream), so runs are as reproducible as before, but they are
different masks from ``nnx.Dropout``'s for the same key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x: Array, d: int) -> Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry2x32(k1: Array, k2: Array, x1: Array, x2: Array) -> tuple[Array, Array]:
    """The Threefry-2x32 block cipher (20 rounds), unrolled: ``(k1, k2)`` uint32 scalars,
    ``x1, x2 [...]`` uint32 counters -> two ``[...]`` uint32 words.

    The same function as JAX's ``threefry2x32_p`` (tested bit for bit against it), written out
    so that XLA:CPU fuses it instead of running JAX's CPU lowering's rolled loop.
    """
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = _rotl(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def random_uint16(key: Array, n: int) -> Array:
    """``[n]`` uniform 16-bit integers (as uint32) from one threefry block per four of them: the
    block of counter ``i`` gives elements ``i``, ``i + b``, ``i + 2b``, ``i + 3b`` (``b`` blocks),
    as a concatenation, which XLA fuses with the rounds (a stack on a last axis of 4 was slower).
    """
    data = jax.random.key_data(key).reshape(-1)
    if data.shape != (2,):  # another PRNG implementation: its own bits, 32 per element
        return jax.random.bits(key, (n,), jnp.uint32) >> np.uint32(16)
    blocks = -(-n // 4)
    w1, w2 = threefry2x32(data[0], data[1], jnp.zeros((blocks,), jnp.uint32),
                          jax.lax.iota(jnp.uint32, blocks))
    return jnp.concatenate([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16])[:n]


def keep_mask(key: Array, shape: tuple[int, ...], keep: float) -> Array:
    """Bernoulli(``keep``) boolean mask of ``shape``: 16 random bits per element compared with
    ``round(keep * 2^16)``, so the keep probability is exact to 2^-17 (0.9 -> 0.899994)."""
    threshold = np.uint32(min(round(keep * 65536), 65536))
    with jax.named_scope("dropout_keep_mask"):  # names the ops in profiles
        return random_uint16(key, int(np.prod(shape))).reshape(shape) < threshold


class Dropout(nnx.Dropout):
    """``nnx.Dropout`` (same state, modes and ``dropout`` rng stream) with ``keep_mask``'s masks
    and a multiply by ``1 / keep``: ``__call__(x [...], deterministic=None, rngs=None) -> [...]``.

    ``nnx.Dropout``'s ``broadcast_dims`` are not supported (no layer here uses them).
    """

    def __call__(self, inputs: Array, *, deterministic: bool | None = None,
                 rngs: nnx.Rngs | nnx.RngStream | Array | None = None) -> Array:
        if self.broadcast_dims:
            raise ValueError("roc_jax Dropout does not support broadcast_dims")
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic is None:
            raise ValueError("Dropout needs `deterministic`: call model.train() or model.eval()")
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:  # no NaN gradients from 0 * inf
            return jnp.zeros_like(inputs)
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            key = rngs[self.rng_collection]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        elif isinstance(rngs, jax.Array):
            key = rngs
        else:
            raise TypeError(f"rngs must be Rngs, RngStream or a key, got {type(rngs).__name__}")
        keep = 1.0 - self.rate
        mask = keep_mask(key, inputs.shape, keep)
        return jnp.where(mask, inputs * (1.0 / keep), jnp.zeros_like(inputs))
