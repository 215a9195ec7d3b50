"""Shared layers: dense projections, embeddings, RMSNorm, RoPE, SwiGLU and masked attention.

Parameters are float32 `nnx.Param`s carrying `logical_axes` metadata (one name per dimension) that the
sharding rules map onto mesh axes, and `decay=False` metadata where weight decay must never apply
(memjax.optim: otherwise matrices decay, vectors do not). Matmuls run in the compute dtype given at construction.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import parallel


def param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...], *,
          decay: bool = True) -> nnx.Param:
    """A truncated-normal float32 parameter. `decay=False` exempts a 2-D one that is no weight matrix (an
    initial state, persistent tokens) from weight decay (memjax.optim)."""
    assert len(shape) == len(axes), (shape, axes)
    value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape, jnp.float32)
    # Only the exemption is recorded: other parameters keep the metadata they had before the flag existed.
    return nnx.Param(value, logical_axes=axes, **({} if decay else {"decay": False}))


class Dense(nnx.Module):
    """y = x @ W over the trailing input dims; W has shape in_shape + out_shape."""

    def __init__(self, in_shape, out_shape, axes, *, std, dtype, rngs):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.kernel = param(rngs, self.in_shape + self.out_shape, std, tuple(axes))
        self.dtype = dtype

    def __call__(self, x):
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        kernel = self.kernel[...].astype(self.dtype)
        return jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))


class Embed(nnx.Module):
    def __init__(self, vocab_size, d_model, *, std, dtype, rngs):
        self.embedding = param(rngs, (vocab_size, d_model), std, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids_BxT):
        # Gathered whole before the lookup: a gather from a vocab/embed-sharded table cannot produce the
        # batch-sharded rows without replicating them anyway (XLA's "involuntary rematerialization").
        table_VxD = parallel.constrain(self.embedding[...], None, None)
        return jnp.take(table_VxD, ids_BxT, axis=0).astype(self.dtype)

    def attend(self, x_BxTxD) -> jax.Array:
        """Logits against the embedding table (tied output head), in float32."""
        return jnp.einsum("btd,vd->btv", x_BxTxD, self.embedding[...].astype(x_BxTxD.dtype)).astype(jnp.float32)


class RMSNorm(nnx.Module):
    def __init__(self, dim, *, eps, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        return (rms_normalize(x, self.eps) * self.scale[...]).astype(self.dtype)


def rms_normalize(x, eps: float) -> jax.Array:
    """x / RMS(x) over the last axis, in float32 at least whatever the input dtype (bf16 sums of
    squares lose too much)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class SwiGLU(nnx.Module):
    def __init__(self, d_model, d_ff, *, std, out_std, dtype, rngs):
        self.gate = Dense((d_model,), (d_ff,), ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.up = Dense((d_model,), (d_ff,), ("embed", "mlp"), std=std, dtype=dtype, rngs=rngs)
        self.down = Dense((d_ff,), (d_model,), ("mlp", "embed"), std=out_std, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def swiglu_width(d_model: int, d_ff: int) -> int:
    """d_ff, or 8/3 d_model rounded up to a multiple of 64 (same parameters as a 4x GELU MLP)."""
    return d_ff or -(-int(8 * d_model / 3) // 64) * 64


def rope(x_BxTxHxK, positions_BxT, base: float) -> jax.Array:
    """Rotary position embedding (rotate-half form), computed in float32."""
    half = x_BxTxHxK.shape[-1] // 2
    inv_freq_K2 = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTxK2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_K2
    sin, cos = jnp.sin(angle_BxTxK2)[:, :, None, :], jnp.cos(angle_BxTxK2)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxK.dtype)


def attention_mask(q_pos_BxT, k_pos_BxS, window: int, k_valid_BxS=None) -> jax.Array:
    """True where query t may attend key s: causal, and within `window` tokens (itself included)."""
    delta_BxTxS = q_pos_BxT[:, :, None] - k_pos_BxS[:, None, :]
    mask = delta_BxTxS >= 0
    if window > 0:
        mask &= delta_BxTxS < window
    if k_valid_BxS is not None:
        mask &= k_valid_BxS[:, None, :]
    return mask


def attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS) -> jax.Array:
    """Softmax attention with float32 scores. Every query must be allowed at least one key (causal
    self-attention always allows itself)."""
    scale = 1.0 / math.sqrt(q_BxTxHxK.shape[-1])
    scores_BxHxTxS = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK * scale, k_BxSxHxK).astype(jnp.float32)
    scores_BxHxTxS = jnp.where(mask_BxTxS[:, None], scores_BxHxTxS, -1e30)
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    return jnp.einsum("bhts,bshk->bthk", probs_BxHxTxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


def local_attend(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, window: int, prefix_k_BxPxHxK=None,
                 prefix_v_BxPxHxK=None) -> jax.Array:
    """Causal sliding-window self-attention (key s visible to query t when 0 <= t - s < window) in
    O(T x window): queries in blocks of `window` attend to their own block and the previous one, so
    nothing of size T x T is formed. Optional prefix keys/values (persistent tokens) are visible to
    every query. Equals `attend` with `attention_mask(pos, pos, window)` (and the prefix)."""
    batch, t, h, k = q_BxTxHxK.shape
    w = window
    n = -(-t // w)
    pad = [(0, 0), (0, n * w - t), (0, 0), (0, 0)]
    blocks = [jnp.pad(x, pad).reshape(batch, n, w, h, k) for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxK)]
    q_BxNxWxHxK, k_blocks, v_blocks = blocks
    previous = lambda x: jnp.pad(x, [(0, 0), (1, 0), (0, 0), (0, 0), (0, 0)])[:, :-1]  # block i-1 (zeros for 0)
    k_BxNx2WxHxK = jnp.concatenate([previous(k_blocks), k_blocks], axis=2)
    v_BxNx2WxHxK = jnp.concatenate([previous(v_blocks), v_blocks], axis=2)
    t_W = jnp.arange(w)[:, None] + w  # query and key positions relative to the previous block's start
    s_2W = jnp.arange(2 * w)[None, :]
    block_ok_Nx1x2W = (jnp.arange(n)[:, None, None] > 0) | (s_2W >= w)[None]  # block 0 has no previous one
    mask_NxWx2W = ((t_W - s_2W >= 0) & (t_W - s_2W < w))[None] & block_ok_Nx1x2W
    if prefix_k_BxPxHxK is not None:
        p = prefix_k_BxPxHxK.shape[1]
        tile = lambda x: jnp.broadcast_to(x[:, None], (batch, n, p, h, k)).astype(k_BxNx2WxHxK.dtype)
        k_BxNx2WxHxK = jnp.concatenate([tile(prefix_k_BxPxHxK), k_BxNx2WxHxK], axis=2)
        v_BxNx2WxHxK = jnp.concatenate([tile(prefix_v_BxPxHxK), v_BxNx2WxHxK], axis=2)
        mask_NxWx2W = jnp.concatenate([jnp.ones((n, w, p), bool), mask_NxWx2W], axis=-1)
    fold = lambda x: x.reshape(batch * n, *x.shape[2:])
    mask = jnp.broadcast_to(mask_NxWx2W[None], (batch, *mask_NxWx2W.shape))
    y = attend(fold(q_BxNxWxHxK), fold(k_BxNx2WxHxK), fold(v_BxNx2WxHxK), fold(mask))
    return y.reshape(batch, n * w, h, k)[:, :t]
