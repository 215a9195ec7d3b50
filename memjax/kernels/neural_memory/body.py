"""The loop over one remat group's chunks, shared by the TPU and GPU kernels (`pallas_tpu`, `pallas_gpu`).

The refs hold chunks along their leading axis: `first` is the group's first chunk there (0 for the TPU
kernels, whose blocks are one group; g x group for the GPU kernels, whose blocks are one sequence). A
chunk's coefficient block ([C + 2, K + 2], engine.linear_rows) is read and written piece by piece through
ref slices (engine.linear_rows_layout): Triton cannot slice loaded values, and no piece is padded to a
tile of its own in memory. The memory state is carried as values through the group's loop; the kernels
keep it between groups.
"""

from __future__ import annotations

from typing import Any

import jax

from memjax.kernels.neural_memory import engine, reference


def _is_index(x):
    return isinstance(x, tuple)


def _coef_layout(refs):
    return engine.linear_rows_layout(refs["xs"]["q"].shape[1])


def load(refs, r) -> tuple[dict, Any]:
    chunk = {name: ref[r] for name, ref in refs["xs"].items()}
    coef = jax.tree_util.tree_map(lambda index: refs["coef"][(r, *index)], _coef_layout(refs), is_leaf=_is_index)
    return chunk, coef


def store(refs, r, values) -> None:
    for ref, value in zip(jax.tree_util.tree_leaves(refs), jax.tree_util.tree_leaves(values)):
        ref[r] = value.astype(ref.dtype)


def store_coef(ref, r, layout, values) -> None:
    for index, value in zip(jax.tree_util.tree_leaves(layout, is_leaf=_is_index), jax.tree_util.tree_leaves(values)):
        ref[(r, *index)] = value.astype(ref.dtype)


def forward_group(spec, group: int, refs, first, carry) -> Any:
    """Runs the group's chunks from carry = (state, momentum) (lists of [in, out] values), writing
    refs["y"] and refs["loss"]; returns the carry after the group."""

    def one_chunk(r, carry):
        chunk, coef = load(refs, first + r)
        y, state, momentum, loss = reference.chunk_forward(spec, *carry, chunk, coef)
        store([refs["y"], refs["loss"]], first + r, [y, loss])
        return state, momentum

    return jax.lax.fori_loop(0, group, one_chunk, carry)


def backward_group(spec, group: int, refs, first, start, d_carry, starts, barrier=lambda: None) -> Any:
    """The group's backward: recomputes its chunk-start states from `start` (its first chunk's) into the
    `starts` refs ([group, in, out] per map, for state and momentum), then runs the chunks in reverse from
    d_carry, the cotangents of the group's end (state, momentum). Writes refs["d_xs"] and refs["d_coef"];
    returns the cotangents of the group's start. `barrier` orders the `starts` writes before their reads
    (needed where they go through global memory)."""

    def recompute(r, carry):
        store(starts, r, carry)
        chunk, coef = load(refs, first + r)
        _, state, momentum, _ = reference.chunk_forward(spec, *carry, chunk, coef)
        return state, momentum

    last = jax.lax.fori_loop(0, group - 1, recompute, start)
    store(starts, group - 1, last)
    barrier()

    def one_chunk(i, d_carry):
        r = group - 1 - i
        chunk, coef = load(refs, first + r)
        state, momentum = ([ref[r] for ref in refs_] for refs_ in starts)
        d_state, d_momentum, d_chunk, d_coef = reference.chunk_backward(
            spec, state, momentum, chunk, coef, refs["dy"][first + r], *d_carry, refs["dloss"][first + r]
        )
        store(refs["d_xs"], first + r, d_chunk)
        store_coef(refs["d_coef"], first + r, _coef_layout(refs), d_coef)
        return d_state, d_momentum

    d_start = jax.lax.fori_loop(0, group, one_chunk, d_carry)
    barrier()  # the next group overwrites `starts`
    return d_start
