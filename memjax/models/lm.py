"""The decoder language model: embeddings, a stack of registry blocks, final norm, output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax import parallel
from memjax.config import block_names
from memjax.models import layers, registry


class DecoderLM(nnx.Module):
    def __init__(self, model_cfg, vocab_size: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(model_cfg.dtype)
        blocks = registry.load()
        self.embed = layers.Embed(vocab_size, model_cfg.d_model, std=model_cfg.init_std, dtype=dtype, rngs=rngs)
        names = block_names(model_cfg)
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
        return [block.init_carry(batch_size, dtype) if hasattr(block, "init_carry") else None
                for block in self.blocks]

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


def make_model(model_cfg, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    """The model a config describes: the decoder, or a wrapper around it (HMT)."""
    if uses_hmt(model_cfg):
        from memjax.models.hmt import HMT  # lazily: hmt imports this module

        return HMT(model_cfg, vocab_size, rngs=rngs)
    return DecoderLM(model_cfg, vocab_size, rngs=rngs)


def build(model_cfg, vocab_size: int, key) -> tuple[nnx.GraphDef, dict]:
    """The model's graph definition and its parameters as a pure dict of float32 arrays."""
    model = make_model(model_cfg, vocab_size, nnx.Rngs(params=key))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def abstract(model_cfg, vocab_size: int) -> tuple[nnx.GraphDef, dict]:
    """Like `build`, with jax.ShapeDtypeStruct leaves: nothing is allocated."""
    out = {}

    def params_only(key):
        graphdef, params = build(model_cfg, vocab_size, key)
        out["graphdef"] = graphdef
        return params

    shapes = jax.eval_shape(params_only, jax.random.key(0))
    return out["graphdef"], shapes


def uses_hmt(model_cfg) -> bool:
    return "hmt" in model_cfg and model_cfg.hmt.enabled  # configs saved before HMT existed lack the section


def eval_metrics(model_cfg, graphdef, params, batches) -> dict[str, float]:
    """Every block family's `eval_metrics` (see registry) on evaluation batches; HMT's recall statistics
    (its backbone's blocks are run by HMT, segment by segment, not by their own diagnostics)."""
    if uses_hmt(model_cfg):
        from memjax.models import hmt

        return hmt.hmt_metrics(graphdef, params, batches)
    blocks = registry.load()
    families = dict.fromkeys(getattr(blocks[name], "eval_metrics", None) for name in sorted(set(block_names(model_cfg))))
    out = {}
    for family_metrics in filter(None, families):
        out.update(family_metrics(graphdef, params, batches))
    return out


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


# Parameters with one of these logical axes are not multiplied by every token, so 6 x parameters would
# miscount them; their blocks' flops_per_token count their work: lookup tables (a memory's value
# table: rows are read), a neural memory's and LM2's initial state (the start of a recurrence whose
# per-token work the block counts) and persistent tokens (inputs, not weights).
NON_MATMUL_AXES = frozenset({"value_rows", "memory_in", "persistent", "lm2_slots"})


def count_matmul_params(module) -> int:
    """Parameters of `module` that multiply every token: matrices, less the NON_MATMUL_AXES ones."""
    return sum(
        int(np.prod(x.shape))
        for _, x in nnx.to_flat_state(nnx.state(module, nnx.Param))
        if len(x.shape) >= 2 and not NON_MATMUL_AXES.intersection(x.get_metadata().get("logical_axes") or ())
    )


def flops_per_token(model_cfg, vocab_size: int, seq_len: int) -> float:
    """Analytic training FLOPs per token: 6 x matmul parameters + each block's own term (HMT: its own
    count of the backbone's passes per segment)."""
    if uses_hmt(model_cfg):
        from memjax.models import hmt

        return hmt.flops_per_token(model_cfg, vocab_size, seq_len)
    model = nnx.eval_shape(lambda: make_model(model_cfg, vocab_size, nnx.Rngs(params=0)))
    matmul_params = count_matmul_params(model)
    if not model_cfg.tie_embeddings:
        matmul_params -= vocab_size * model_cfg.d_model  # the input embedding is a lookup, not a matmul
    blocks = registry.load()
    extra = sum(blocks[name].flops_per_token(model_cfg, seq_len) for name in block_names(model_cfg))
    return 6.0 * matmul_params + extra
