"""The fused chunk scan as Pallas TPU (Mosaic) kernels.

Grid (batch x heads, remat groups): the first axis is "parallel" (sequences and heads are independent;
megacore chips split it over their two cores), the second "arbitrary" (groups run in order, the state is
carried from one to the next in VMEM scratch). Each grid step holds one group of R chunks: blocks are
[R, C, I] for q, [R, K, I] for k and so on, their last two dimensions whole (Mosaic's (8, 128) tiling rule
then holds for any head width and chunk), and the step loops over its chunks (`body.forward_group`).

Forward: writes y, the per-chunk inner loss, the final (state, momentum) and, as the backward's residuals,
the (state, momentum) at the start of every group: one per remat group, as the reference's
jax.checkpoint stores. Backward: the groups in reverse, d(state, momentum) carried in VMEM scratch; each
step recomputes its chunk-start states into VMEM scratch and then runs its chunks' VJPs in reverse
(`body.backward_group`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels.neural_memory import body, reference

# VMEM the kernels ask for at most (v5e/v6e have 128 MiB per core, v7x 64): blocks are double-buffered.
VMEM_CAP = 48 * 2**20


def _chunk_spec(x, group: int, reverse: bool = False):
    """Blocks of one group's chunks of an [BH, N, a, b] array."""
    groups = x.shape[1] // group
    chunk = (lambda g: groups - 1 - g) if reverse else (lambda g: g)
    return pl.BlockSpec((pl.squeezed, group, *x.shape[2:]), lambda b, g: (b, chunk(g), 0, 0))


def _coef_spec(coef, group: int, reverse: bool = False):
    """Blocks of one group's coefficient rows of an [N, BH, C + 2, K + 2] array."""
    groups = coef.shape[0] // group
    chunk = (lambda g: groups - 1 - g) if reverse else (lambda g: g)
    return pl.BlockSpec((group, pl.squeezed, *coef.shape[2:]), lambda b, g: (chunk(g), b, 0, 0))


def _state_spec(x):
    """One sequence-head's [in, out] matrix of an [BH, in, out] array, the same block for every group."""
    return pl.BlockSpec((pl.squeezed, *x.shape[1:]), lambda b, g: (b, 0, 0))


def _residual_spec(x, reverse: bool = False):
    groups = x.shape[1]
    chunk = (lambda g: groups - 1 - g) if reverse else (lambda g: g)
    return pl.BlockSpec((pl.squeezed, pl.squeezed, *x.shape[2:]), lambda b, g: (b, chunk(g), 0, 0))


def _compiler_params(blocks, scratch):
    """Double-buffered blocks plus scratch, with room for the body's temporaries."""
    block_bytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in blocks)
    need = 4 * block_bytes + 2 * sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize for s in scratch)
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                vmem_limit_bytes=int(min(VMEM_CAP, max(32 * 2**20, need))))


def _block_shapes(tree, specs):
    return [jax.ShapeDtypeStruct([d for d in s.block_shape if d is not pl.squeezed and d is not None], x.dtype)
            for x, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(specs))]


@functools.partial(jax.jit, static_argnames=("spec", "group", "interpret"))
def forward(spec, group: int, state, momentum, xs, coef, *, interpret=False) -> tuple:
    """state, momentum: lists of [BH, in, out]; xs: the chunk streams [BH, N, ...] and coef the
    coefficient rows [N, BH, C + 2, K + 2] (reference.kernel_inputs, batch and heads flattened).
    Returns y [BH, N, C, D], loss [BH, N, 1, 1], the final state and momentum, and the residuals: the
    state and momentum at each group's start, lists of [BH, N / group, in, out]."""
    bh, n = xs["q"].shape[:2]
    groups = n // group
    d = xs["v"].shape[-1]
    dtype = xs["q"].dtype
    compute = reference.compute_dtype(dtype)
    residual = lambda s: jax.ShapeDtypeStruct((bh, groups, *s.shape[1:]), compute)
    out_shape = (
        jax.ShapeDtypeStruct((bh, n, spec.chunk, d), dtype),
        jax.ShapeDtypeStruct((bh, n, 1, 1), dtype),
        [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in state],
        [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in momentum],
        [residual(s) for s in state],
        [residual(m) for m in momentum],
    )
    in_specs = (
        [_state_spec(s) for s in state], [_state_spec(m) for m in momentum],
        {name: _chunk_spec(x, group) for name, x in xs.items()},
        _coef_spec(coef, group),
    )
    out_specs = (
        _chunk_spec(out_shape[0], group), _chunk_spec(out_shape[1], group),
        [_state_spec(s) for s in state], [_state_spec(m) for m in momentum],
        [_residual_spec(r) for r in out_shape[4]], [_residual_spec(r) for r in out_shape[5]],
    )
    scratch = [pltpu.VMEM(s.shape[1:], compute) for s in state + momentum]
    maps = len(state)

    def kernel(state0, momentum0, xs, coef, y, loss, state_out, momentum_out, state_res, momentum_res, *carry):
        carry = (list(carry[:maps]), list(carry[maps:]))
        g = pl.program_id(1)

        @pl.when(g == 0)
        def _():
            for dst, src in zip(carry[0] + carry[1], state0 + momentum0):
                dst[...] = src[...].astype(dst.dtype)

        start = tuple([ref[...] for ref in refs] for refs in carry)
        body.store(state_res + momentum_res, ..., start[0] + start[1])
        refs = {"xs": xs, "coef": coef, "y": y, "loss": loss}
        end = body.forward_group(spec, group, refs, 0, start)
        body.store(carry[0] + carry[1], ..., end[0] + end[1])

        @pl.when(g == groups - 1)
        def _():
            body.store(state_out + momentum_out, ..., end[0] + end[1])

    blocks = _block_shapes((state, momentum, xs, coef), in_specs) + _block_shapes(out_shape, out_specs)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh, groups), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, compiler_params=_compiler_params(blocks, scratch), interpret=interpret,
        name="neural_memory_forward",
    )(state, momentum, xs, coef)


@functools.partial(jax.jit, static_argnames=("spec", "group", "interpret"))
def backward(spec, group: int, state_res, momentum_res, xs, coef, dy, dloss, d_state, d_momentum, *,
             interpret=False) -> tuple:
    """Cotangents of `forward`'s inputs (state, momentum, xs, coef) from its residuals and the cotangents
    of y, loss and the final state and momentum."""
    bh, n = xs["q"].shape[:2]
    groups = n // group
    out_shape = (
        [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in d_state],
        [jax.ShapeDtypeStruct(m.shape, m.dtype) for m in d_momentum],
        {name: jax.ShapeDtypeStruct(x.shape, x.dtype) for name, x in xs.items()},
        jax.ShapeDtypeStruct(coef.shape, coef.dtype),
    )
    rev = functools.partial(_chunk_spec, group=group, reverse=True)
    in_specs = (
        [_residual_spec(r, reverse=True) for r in state_res], [_residual_spec(r, reverse=True) for r in momentum_res],
        {name: rev(x) for name, x in xs.items()}, _coef_spec(coef, group, reverse=True), rev(dy), rev(dloss),
        [_state_spec(s) for s in d_state], [_state_spec(m) for m in d_momentum],
    )
    out_specs = (
        [_state_spec(s) for s in out_shape[0]], [_state_spec(m) for m in out_shape[1]],
        {name: rev(x) for name, x in out_shape[2].items()}, _coef_spec(coef, group, reverse=True),
    )
    maps = len(state_res)
    per_map = [r.shape[2:] for r in state_res + momentum_res]  # residuals: in the compute dtype
    compute = state_res[0].dtype
    starts = [pltpu.VMEM((group, *shape), compute) for shape in per_map]  # the group's chunk-start states
    scratch = starts + [pltpu.VMEM(shape, compute) for shape in per_map]  # then d(state, momentum)

    def kernel(state_res, momentum_res, xs, coef, dy, dloss, d_state_end, d_momentum_end,
               d_state0, d_momentum0, d_xs, d_coef, *scratch_refs):
        starts = (list(scratch_refs[:maps]), list(scratch_refs[maps:2 * maps]))
        d_carry = (list(scratch_refs[2 * maps:3 * maps]), list(scratch_refs[3 * maps:]))
        g = pl.program_id(1)

        @pl.when(g == 0)
        def _():
            for dst, src in zip(d_carry[0] + d_carry[1], d_state_end + d_momentum_end):
                dst[...] = src[...].astype(dst.dtype)

        start = tuple([ref[...] for ref in refs] for refs in (state_res, momentum_res))
        d_end = tuple([ref[...] for ref in refs] for refs in d_carry)
        refs = {"xs": xs, "coef": coef, "dy": dy, "dloss": dloss, "d_xs": d_xs, "d_coef": d_coef}
        d_start = body.backward_group(spec, group, refs, 0, start, d_end, starts)
        body.store(d_carry[0] + d_carry[1], ..., d_start[0] + d_start[1])

        @pl.when(g == groups - 1)
        def _():
            body.store(d_state0 + d_momentum0, ..., d_start[0] + d_start[1])

    args = (state_res, momentum_res, xs, coef, dy, dloss, d_state, d_momentum)
    blocks = _block_shapes(args, in_specs) + _block_shapes(out_shape, out_specs)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(bh, groups), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=scratch, compiler_params=_compiler_params(blocks, scratch), interpret=interpret,
        name="neural_memory_backward",
    )(*args)
