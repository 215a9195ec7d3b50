"""The sublayers blocks are built from: one causal self-attention and one feed-forward.

`Attention` is the attention every block that attends uses: q/k/v/o projections, RoPE, a causal mask
(optionally sliding-window), learned persistent key/value pairs visible to every query, and the
decode-time KV cache. Its computation lives in functions of the projections (`project`, `attend`,
`self_attention`, `write_kv`), because the plain transformer blocks (memjax.models.attention, and the
pkm block built on them) hold their projections on the block itself, at `blocks/<i>/qkv` and
`blocks/<i>/out` as their checkpoints have them, while the memory blocks hold an `Attention` at
`blocks/<i>/attention`. Both run the same code.

KV cache (the decoding state): `{"k", "v": [B, S, H, K] in the compute dtype, "index": int32}`, the keys
and values of positions 0..index-1 of the sequence, S = the longest sequence to decode (a sliding window
masks the cache; it does not shorten it). Persistent pairs are not cached: they are projected from the
parameters at every call.

`feed_forward` is the SwiGLU FFN of every block that has one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.models import layers


def output_std(model_cfg) -> float:
    """Init std of projections that write into the residual stream: scaled down with depth (GPT-2) so
    the residual's variance does not grow with the number of layers."""
    return model_cfg.init_std / (2 * model_cfg.num_layers) ** 0.5


def attention_projections(model_cfg, *, rngs: nnx.Rngs) -> tuple[layers.Dense, layers.Dense]:
    """The fused q/k/v projection [D -> 3, H, K] and the output projection [H, K -> D]."""
    d, h = model_cfg.d_model, model_cfg.num_heads
    dtype = jnp.dtype(model_cfg.dtype)
    qkv = layers.Dense((d,), (3, h, d // h), ("embed", "qkv", "heads", "head_dim"), std=model_cfg.init_std,
                       dtype=dtype, rngs=rngs)
    out = layers.Dense((h, d // h), (d,), ("heads", "head_dim", "embed"), std=output_std(model_cfg), dtype=dtype,
                       rngs=rngs)
    return qkv, out


def feed_forward(model_cfg, *, rngs: nnx.Rngs) -> layers.SwiGLU:
    d = model_cfg.d_model
    return layers.SwiGLU(d, layers.swiglu_width(d, model_cfg.d_ff), std=model_cfg.init_std,
                         out_std=output_std(model_cfg), dtype=jnp.dtype(model_cfg.dtype), rngs=rngs)


# --- the computation, on projections held anywhere ---------------------------------------------------


def project(qkv: layers.Dense, x_BxTxD, positions_BxT, rope_base: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v [B, T, H, K] of x at these positions, RoPE applied to q and k."""
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.unstack(qkv(x_BxTxD), axis=2)
    return layers.rope(q_BxTxHxK, positions_BxT, rope_base), layers.rope(k_BxTxHxK, positions_BxT, rope_base), v_BxTxHxK


def init_kv_cache(batch_size: int, max_len: int, num_heads: int, head_dim: int, dtype) -> dict:
    shape = (batch_size, max_len, num_heads, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


def write_kv(cache: dict, k_BxTxHxK, v_BxTxHxK, at) -> dict:
    """The cache with k, v written at positions at..at+T-1 (its index untouched: a caller may write
    several runs of keys per token, as MAC does)."""
    def write(buffer, new):
        return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), at, axis=1)

    return {**cache, "k": write(cache["k"], k_BxTxHxK), "v": write(cache["v"], v_BxTxHxK)}


def attend(out: layers.Dense, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS, prefix_kv=None) -> jax.Array:
    """out(softmax attention) over [prefix | given keys], the prefix (persistent pairs [B, P, H, K])
    visible to every query."""
    if prefix_kv is not None:
        pk_BxPxHxK, pv_BxPxHxK = prefix_kv
        k_BxSxHxK = jnp.concatenate([pk_BxPxHxK, k_BxSxHxK], 1)
        v_BxSxHxK = jnp.concatenate([pv_BxPxHxK, v_BxSxHxK], 1)
        visible_BxTxP = jnp.ones((*mask_BxTxS.shape[:2], pk_BxPxHxK.shape[1]), bool)
        mask_BxTxS = jnp.concatenate([visible_BxTxP, mask_BxTxS], axis=-1)
    return out(layers.attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS))


def self_attention(qkv: layers.Dense, out: layers.Dense, x_BxTxD, state=None, *, window: int, rope_base: float,
                   prefix_kv=None) -> tuple[jax.Array, dict | None]:
    """Causal self-attention of x (already normalised) and the new KV cache.

    state None: x is a whole sequence from position 0; a sliding window shorter than it runs blocked
    (`layers.local_attend`, O(T x window), no T x T scores). With a cache (`init_kv_cache` or what a call
    returned) x continues the cached sequence: its keys are written, then every query attends over the
    cache. prefix_kv: keys and values [B, P, H, K] of the persistent pairs (in the compute dtype), or None.
    """
    batch, seq = x_BxTxD.shape[:2]
    start = jnp.zeros((), jnp.int32) if state is None else state["index"]
    q_pos_BxT = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = project(qkv, x_BxTxD, q_pos_BxT, rope_base)
    if state is None and 0 < window < seq:
        pk, pv = (None, None) if prefix_kv is None else prefix_kv
        return out(layers.local_attend(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, window, pk, pv)), None
    if state is None:
        mask_BxTxT = layers.attention_mask(q_pos_BxT, q_pos_BxT, window)
        return attend(out, q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxTxT, prefix_kv), None
    cache = write_kv(state, k_BxTxHxK, v_BxTxHxK, start)
    length = cache["k"].shape[1]
    k_pos_BxS = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask_BxTxS = layers.attention_mask(q_pos_BxT, k_pos_BxS, window, k_pos_BxS < start + seq)
    keys, values = cache["k"].astype(q_BxTxHxK.dtype), cache["v"].astype(q_BxTxHxK.dtype)
    y_BxTxD = attend(out, q_BxTxHxK, keys, values, mask_BxTxS, prefix_kv)
    return y_BxTxD, {**cache, "index": start + seq}


# --- the module --------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """Causal self-attention (sliding-window for window > 0) with `persistent` learned key/value pairs:
    key/value projections (by this layer's W_K, W_V, no RoPE: they have no position) of learned inputs."""

    def __init__(self, model_cfg, *, window: int = 0, persistent: int = 0, rngs: nnx.Rngs):
        self.qkv, self.out = attention_projections(model_cfg, rngs=rngs)
        self.window, self.rope_base = window, model_cfg.rope_base
        self.num_heads, self.head_dim = model_cfg.num_heads, model_cfg.d_model // model_cfg.num_heads
        self.num_persistent = persistent
        if persistent:
            # Inputs, not weights: never decayed.
            self.persistent = layers.param(rngs, (persistent, model_cfg.d_model), 1.0, ("persistent", "embed"),
                                           decay=False)

    def project(self, x_BxTxD, positions_BxT) -> tuple[jax.Array, jax.Array, jax.Array]:
        return project(self.qkv, x_BxTxD, positions_BxT, self.rope_base)

    def persistent_kv(self, batch: int, dtype) -> tuple[jax.Array, jax.Array] | None:
        """Keys and values [B, P, H, K] of the persistent tokens, or None without them."""
        if not self.num_persistent:
            return None
        _, pk_PxHxK, pv_PxHxK = jnp.unstack(self.qkv(self.persistent[...].astype(dtype)), axis=1)
        return (jnp.broadcast_to(pk_PxHxK.astype(dtype), (batch, *pk_PxHxK.shape)),
                jnp.broadcast_to(pv_PxHxK.astype(dtype), (batch, *pv_PxHxK.shape)))

    def attend(self, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS) -> jax.Array:
        """Output-projected attention over [persistent | given keys] under the given mask."""
        prefix = self.persistent_kv(q_BxTxHxK.shape[0], k_BxSxHxK.dtype)
        return attend(self.out, q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS, prefix)

    def init_state(self, batch_size: int, max_len: int, dtype) -> dict:
        return init_kv_cache(batch_size, max_len, self.num_heads, self.head_dim, dtype)

    def __call__(self, x_BxTxD, state=None):
        # q, k and v come out of the projection in its compute dtype: the persistent pairs join them in it.
        prefix_kv = self.persistent_kv(x_BxTxD.shape[0], self.qkv.dtype)
        return self_attention(self.qkv, self.out, x_BxTxD, state, window=self.window, rope_base=self.rope_base,
                              prefix_kv=prefix_kv)
