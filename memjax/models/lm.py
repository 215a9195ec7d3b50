"""The decoder language model: embeddings, a stack of registry blocks, final norm, output head.

memjax.models.factory builds it (or the wrapper a config enables around it) and counts its FLOPs."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memjax import parallel
from memjax.models import layers, registry


class DecoderLM(nnx.Module):
    def __init__(self, model_cfg, vocab_size: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(model_cfg.dtype)
        blocks = registry.load()
        self.embed = layers.Embed(vocab_size, model_cfg.d_model, std=model_cfg.init_std, dtype=dtype, rngs=rngs)
        names = registry.block_names(model_cfg)
        # One shared module per block kind that asks for one (e.g. a value table used by all memory
        # layers): NNX keeps a single parameter however many blocks hold it, and sums its gradients.
        self.shared = nnx.Dict({name: blocks[name].make_shared(model_cfg, rngs=rngs) for name in sorted(set(names))})
        self.blocks = nnx.List(
            [blocks[name](model_cfg, i, shared=self.shared[name], rngs=rngs) for i, name in enumerate(names)]
        )
        self.final_norm = layers.RMSNorm(model_cfg.d_model, eps=model_cfg.norm_eps, dtype=dtype)
        self.head = nnx.data(
            None
            if model_cfg.tie_embeddings
            else layers.Dense(
                (model_cfg.d_model,), (vocab_size,), ("embed", "vocab"), std=model_cfg.init_std, dtype=dtype, rngs=rngs
            )
        )

    def init_states(self, batch_size: int, max_len: int) -> list:
        """Per-block state before the first token of a sequence (for decoding / carried memory)."""
        dtype = self.embed.dtype
        return [block.init_state(batch_size, max_len, dtype) for block in self.blocks]

    def init_carry(self, batch_size: int) -> list:
        """Per-block state carried from one segment of a document to the next (see memjax.segments):
        constant in size, None for a block that sees each segment alone (e.g. attention)."""
        dtype = self.embed.dtype
        return [block.init_carry(batch_size, dtype) for block in self.blocks]

    def __call__(self, ids_BxT, states=None):
        """float32 logits [B, T, V] and the blocks' new states (None in, None out). `states` is either
        `init_states` (decoding) or `init_carry` (segment recurrence) or what a call returned."""
        residual = ("act_batch", "act_length", "act_embed")
        x_BxTxD = parallel.constrain(self.embed(ids_BxT), *residual)
        new_states = []
        for i, block in enumerate(self.blocks):
            x_BxTxD, state = block(x_BxTxD, None if states is None else states[i])
            x_BxTxD = parallel.constrain(x_BxTxD, *residual)
            new_states.append(state)
        x_BxTxD = self.final_norm(x_BxTxD)
        logits_BxTxV = self.embed.attend(x_BxTxD) if self.head is None else self.head(x_BxTxD).astype(jnp.float32)
        logits_BxTxV = parallel.constrain(logits_BxTxV, "act_batch", "act_length", "act_vocab")
        return logits_BxTxV, (None if states is None else new_states)
