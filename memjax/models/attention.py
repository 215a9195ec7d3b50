"""Transformer blocks: pre-norm causal self-attention (full or sliding-window) + pre-norm SwiGLU.

Both sublayers are memjax.models.sublayers' (shared with every block that attends). The carried state
is the attention's KV cache, used for decoding (sublayers.init_kv_cache).
With `state=None` the block attends within the given
sequence only (training on packed rows).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memjax.models import layers, sublayers
from memjax.models.registry import Block, register


class AttentionLayer(Block):
    def __init__(self, cfg, layer_index: int, *, shared=None, rngs: nnx.Rngs):
        d = cfg.d_model
        dtype = jnp.dtype(cfg.dtype)
        self.window = self.window_of(cfg)
        self.rope_base = cfg.rope_base
        self.attn_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        # The attention sublayer's projections sit on the block itself (paths qkv/, out/: checkpoints
        # have them there); sublayers.self_attention runs them as it runs every other block's.
        self.qkv, self.out = sublayers.attention_projections(cfg, rngs=rngs)
        self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = sublayers.feed_forward(cfg, rngs=rngs)
        self.num_heads, self.head_dim = cfg.num_heads, d // cfg.num_heads

    @classmethod
    def window_of(cls, cfg) -> int:
        return 0

    def init_state(self, batch_size: int, max_len: int, dtype) -> dict:
        return sublayers.init_kv_cache(batch_size, max_len, self.num_heads, self.head_dim, dtype)

    def __call__(self, x_BxTxD, state=None):
        attended_BxTxD, state = sublayers.self_attention(self.qkv, self.out, self.attn_norm(x_BxTxD), state,
                                                         window=self.window, rope_base=self.rope_base)
        x_BxTxD = x_BxTxD + attended_BxTxD
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
