"""The fused chunk scan as Pallas GPU (Triton) kernels.

Triton grid programs run in no fixed order and keep nothing between them, so the grid is (batch x heads)
alone and each program loops over its sequence's remat groups and their chunks, carrying the memory
state as loop values (on chip). Blocks are a whole sequence-head ([N, C, I] and so on); each chunk is
loaded as it is reached. The same per-group bodies as the TPU kernels (`body`); the backward's
chunk-start states of the group being differentiated go through a global-memory workspace (Triton has
no scratch), ordered by barriers.

Triton needs power-of-two loads of at least 16 rows for its matmuls, and lowers no erf (exact GELU):
`api.supported` checks both.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from memjax.kernels.neural_memory import body, reference


def _sequence_spec(x):
    """One sequence-head's whole [N, ...] (or [in, out]) slice of a [BH, ...] array."""
    return pl.BlockSpec((pl.squeezed, *x.shape[1:]), lambda b: (b,) + (0,) * (x.ndim - 1))


def _specs(tree):
    return jax.tree_util.tree_map(_sequence_spec, tree)


def _coef_spec(coef):
    """One sequence-head's coefficient rows of an [N, BH, C + 2, K + 2] array."""
    return pl.BlockSpec((coef.shape[0], pl.squeezed, *coef.shape[2:]), lambda b: (0, b, 0, 0))


def _params():
    return pltriton.CompilerParams(num_warps=4, num_stages=1)


@functools.partial(jax.jit, static_argnames=("spec", "group", "interpret"))
def forward(spec, group: int, state, momentum, xs, coef, *, interpret=False) -> tuple:
    """As pallas_tpu.forward (same arguments and results)."""
    bh, n = xs["q"].shape[:2]
    groups = n // group
    dtype = xs["q"].dtype
    compute = reference.compute_dtype(dtype)
    residual = lambda s: jax.ShapeDtypeStruct((bh, groups, *s.shape[1:]), compute)
    out_shape = (
        jax.ShapeDtypeStruct((bh, n, spec.chunk, xs["v"].shape[-1]), dtype),
        jax.ShapeDtypeStruct((bh, n, 1, 1), dtype),
        [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in state],
        [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in momentum],
        [residual(s) for s in state],
        [residual(m) for m in momentum],
    )

    def kernel(state0, momentum0, xs, coef, y, loss, state_out, momentum_out, state_res, momentum_res):
        refs = {"xs": xs, "coef": coef, "y": y, "loss": loss}

        def one_group(g, carry):
            body.store([state_res, momentum_res], g, carry)
            return body.forward_group(spec, group, refs, g * group, carry)

        start = tuple([ref[...].astype(compute) for ref in refs] for refs in (state0, momentum0))
        end = jax.lax.fori_loop(0, groups, one_group, start)
        body.store(state_out + momentum_out, ..., end[0] + end[1])

    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh,),
        in_specs=(_specs(state), _specs(momentum), _specs(xs), _coef_spec(coef)),
        out_specs=_specs(out_shape), compiler_params=_params(), interpret=interpret, name="neural_memory_forward",
    )(state, momentum, xs, coef)


@functools.partial(jax.jit, static_argnames=("spec", "group", "interpret"))
def backward(spec, group: int, state_res, momentum_res, xs, coef, dy, dloss, d_state, d_momentum, *,
             interpret=False) -> tuple[list[jax.Array], list[jax.Array], dict[str, jax.Array], Any]:
    """As pallas_tpu.backward (same arguments and results)."""
    bh, n = xs["q"].shape[:2]
    groups = n // group
    like = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    compute = state_res[0].dtype  # residuals: in the compute dtype
    out_shape = (
        [like(x) for x in d_state + d_momentum],
        {name: like(x) for name, x in xs.items()},
        like(coef),
        # workspace: the chunk-start states of the group being differentiated (discarded)
        [jax.ShapeDtypeStruct((bh, group, *r.shape[2:]), compute) for r in state_res + momentum_res],
    )
    maps = len(state_res)
    barrier = (lambda: None) if interpret else pltriton.debug_barrier

    def kernel(state_res, momentum_res, xs, coef, dy, dloss, d_state_end, d_momentum_end,
               d_start_refs, d_xs, d_coef, workspace):
        refs = {"xs": xs, "coef": coef, "dy": dy, "dloss": dloss, "d_xs": d_xs, "d_coef": d_coef}
        starts = (workspace[:maps], workspace[maps:])

        def one_group(i, d_carry):
            g = groups - 1 - i
            start = ([ref[g] for ref in state_res], [ref[g] for ref in momentum_res])
            return body.backward_group(spec, group, refs, g * group, start, d_carry, starts, barrier)

        d_end = tuple([ref[...].astype(compute) for ref in refs] for refs in (d_state_end, d_momentum_end))
        d_start = jax.lax.fori_loop(0, groups, one_group, d_end)
        body.store(d_start_refs, ..., d_start[0] + d_start[1])

    args = (state_res, momentum_res, xs, coef, dy, dloss, d_state, d_momentum)
    in_specs = (_specs(state_res), _specs(momentum_res), _specs(xs), _coef_spec(coef), _specs(dy),
                _specs(dloss), _specs(d_state), _specs(d_momentum))
    out_specs = (_specs(out_shape[0]), _specs(out_shape[1]), _coef_spec(coef), _specs(out_shape[3]))
    d_start, d_xs, d_coef, _ = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh,), in_specs=in_specs, out_specs=out_specs,
        compiler_params=_params(), interpret=interpret, name="neural_memory_backward",
    )(*args)
    return d_start[:maps], d_start[maps:], d_xs, d_coef
