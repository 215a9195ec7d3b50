"""Transformer blocks: pre-norm causal self-attention (full or sliding-window) + pre-norm SwiGLU.

The carried state is a KV cache used for decoding: `{"k", "v": [B, S, H, K], "index": int32}`. With
`state=None` the block attends within the given sequence only (training on packed rows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.models import layers
from memjax.models.registry import Block, register


class AttentionLayer(Block):
    def __init__(self, cfg, layer_index: int, *, shared=None, rngs: nnx.Rngs):
        d, h = cfg.d_model, cfg.num_heads
        k = d // h
        dtype = jnp.dtype(cfg.dtype)
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.window = self.window_of(cfg)
        self.rope_base = cfg.rope_base
        self.attn_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.qkv = layers.Dense((d,), (3, h, k), ("embed", "qkv", "heads", "head_dim"), std=cfg.init_std, dtype=dtype, rngs=rngs)
        self.out = layers.Dense((h, k), (d,), ("heads", "head_dim", "embed"), std=out_std, dtype=dtype, rngs=rngs)
        self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        d_ff = layers.swiglu_width(d, cfg.d_ff)
        self.mlp = layers.SwiGLU(d, d_ff, std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)
        self.num_heads, self.head_dim = h, k

    @classmethod
    def window_of(cls, cfg) -> int:
        return 0

    def init_state(self, batch_size: int, max_len: int, dtype):
        shape = (batch_size, max_len, self.num_heads, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}

    def __call__(self, x_BxTxD, state=None):
        batch, seq = x_BxTxD.shape[:2]
        q_BxTxHxK, k_BxTxHxK, v_BxTxHxK = jnp.unstack(self.qkv(self.attn_norm(x_BxTxD)), axis=2)
        start = jnp.zeros((), jnp.int32) if state is None else state["index"]
        q_pos_BxT = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        q_BxTxHxK = layers.rope(q_BxTxHxK, q_pos_BxT, self.rope_base)
        k_BxTxHxK = layers.rope(k_BxTxHxK, q_pos_BxT, self.rope_base)
        if state is None and 0 < self.window < seq:
            y_BxTxHxK = layers.local_attend(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, self.window)
        elif state is None:
            mask_BxTxT = layers.attention_mask(q_pos_BxT, q_pos_BxT, self.window)
            y_BxTxHxK = layers.attend(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, mask_BxTxT)
        else:
            cache_k = jax.lax.dynamic_update_slice_in_dim(state["k"], k_BxTxHxK.astype(state["k"].dtype), start, axis=1)
            cache_v = jax.lax.dynamic_update_slice_in_dim(state["v"], v_BxTxHxK.astype(state["v"].dtype), start, axis=1)
            k_pos_BxS = jnp.broadcast_to(jnp.arange(cache_k.shape[1], dtype=jnp.int32), (batch, cache_k.shape[1]))
            mask_BxTxS = layers.attention_mask(q_pos_BxT, k_pos_BxS, self.window, k_pos_BxS < start + seq)
            y_BxTxHxK = layers.attend(q_BxTxHxK, cache_k.astype(q_BxTxHxK.dtype), cache_v.astype(q_BxTxHxK.dtype), mask_BxTxS)
            state = {"k": cache_k, "v": cache_v, "index": start + seq}
        x_BxTxD = x_BxTxD + self.out(y_BxTxHxK)
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return x_BxTxD, state

    @classmethod
    def flops_per_token(cls, model_cfg, seq_len: int) -> float:
        # QK^T and PV, forward (4 H K T_eff) + backward (2x): 12 H K T_eff, H K = d_model.
        window = cls.window_of(model_cfg)
        effective = min(window, seq_len) if window else seq_len
        return 12.0 * model_cfg.d_model * effective


@register("attention")
class FullAttention(AttentionLayer):
    """Full causal self-attention."""


@register("swa")
class SlidingWindowAttention(AttentionLayer):
    """Causal self-attention over the last `model.swa.window` tokens (the query included)."""

    defaults = {"window": 128}

    @classmethod
    def window_of(cls, cfg) -> int:
        return cfg.swa.window

    @classmethod
    def validate(cls, cfg, require) -> None:
        window = cfg.model.swa.window
        require(window > 0, "model.swa.window", f"must be positive, got {window}")
        require(
            window <= cfg.train.seq_len,
            "model.swa.window",
            f"window {window} exceeds train.seq_len={cfg.train.seq_len}; use block 'attention' for full attention",
        )
