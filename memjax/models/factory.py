"""The model a config describes, its parameters, analytic FLOPs and diagnostics.

The decoder (memjax.models.lm) is the model unless the config enables a wrapper (memjax.models.registry),
which is then built around it and answers for the whole model's FLOPs and diagnostics.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from memjax.models import registry
from memjax.models.lm import DecoderLM


def make_model(model_cfg, vocab_size: int, rngs: nnx.Rngs) -> nnx.Module:
    """The model a config describes: the decoder, or the enabled wrapper around it."""
    wrapper = registry.active_wrapper(model_cfg)
    if wrapper is not None:
        return wrapper(model_cfg, vocab_size, rngs=rngs)
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


def abstract_model(model_cfg, vocab_size: int) -> nnx.Module:
    """The model with ShapeDtypeStruct parameters (their metadata included: logical axes, decay)."""
    return nnx.eval_shape(lambda: make_model(model_cfg, vocab_size, nnx.Rngs(params=0)))


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def count_matmul_params(module, state_axes) -> int:
    """Parameters of `module` that multiply every token: matrices, less those with one of `state_axes`
    (registry.state_axes: lookup tables, initial states, persistent tokens), whose blocks count their work."""
    return sum(
        int(np.prod(x.shape))
        for _, x in nnx.to_flat_state(nnx.state(module, nnx.Param))
        if len(x.shape) >= 2 and not state_axes.intersection(x.get_metadata().get("logical_axes") or ())
    )


def flops_per_token(model_cfg, vocab_size: int, seq_len: int) -> float:
    """Analytic training FLOPs per token: 6 x matmul parameters + each block's own term (a wrapper: its
    own count of the decoder's passes)."""
    wrapper = registry.active_wrapper(model_cfg)
    if wrapper is not None:
        return wrapper.flops_per_token(model_cfg, vocab_size, seq_len)
    model = abstract_model(model_cfg, vocab_size)
    matmul_params = count_matmul_params(model, registry.state_axes(model_cfg))
    if not model_cfg.tie_embeddings:
        matmul_params -= vocab_size * model_cfg.d_model  # the input embedding is a lookup, not a matmul
    blocks = registry.load()
    extra = sum(blocks[name].flops_per_token(model_cfg, seq_len) for name in registry.block_names(model_cfg))
    return 6.0 * matmul_params + extra


def eval_metrics(model_cfg, graphdef, params, batches) -> dict[str, float]:
    """Every block family's `eval_metrics` on evaluation batches, each distinct hook once; with a wrapper,
    the wrapper's (it runs the decoder's blocks itself, not through their diagnostics)."""
    wrapper = registry.active_wrapper(model_cfg)
    if wrapper is not None:
        return wrapper.eval_metrics(graphdef, params, batches)
    out = {}
    for family_metrics in dict.fromkeys(cls.eval_metrics for cls in registry.blocks_in_use(model_cfg)):
        out.update(family_metrics(graphdef, params, batches))
    return out
