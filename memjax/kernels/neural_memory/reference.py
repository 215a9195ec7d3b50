"""The neural-memory chunk scan in pure JAX: the source of truth the Pallas kernels are tested against.

`scan_chunks` is the engine's scan (engine.py beside this module: lax.scan over chunks in remat groups,
the chunk step vmapped over batch and heads). The kernels run the same per-chunk math on their blocks:
`chunk_forward` is `engine.chunk_step_linear`, and `chunk_backward` its VJP
(the fused backward recomputes each chunk's forward from its start state).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from memjax.kernels.neural_memory import engine

scan_chunks = engine.scan_chunks
ROWS_BATCH = 16  # chunks per step of the coefficient rows in `kernel_inputs`


def kernel_inputs(spec: engine.Spec, streams, full_N) -> tuple[dict[str, jax.Array], jax.Array]:
    """What the kernels read, from the streams of `scan_chunks`: per chunk, [B, H, N, ...], q [C, I],
    k [K, I], v [K, D] (K = C + c - 1: the Omega window) and delta [1, K] (Huber); and the chunks'
    `engine.linear_rows` [N, B, H, C + 2, K + 2] (chunks first, as the kernels index them).

    The rows are computed here in plain JAX (in `compute_dtype`) from the gates alone: they do not depend
    on the memory state. A few chunks at a time, rematerialised in the backward: per chunk they are
    arrays of [C, 2, K + 2] that TPU's tiled layouts pad several times over (128 lanes), too large to
    hold for a whole sequence. An incomplete chunk's end rows are the identity (A_C = A_0, S_C = S_0): its
    end state is not kept, with no mask in the kernels."""
    n = full_N.shape[0]
    chunks = engine.chunk_streams(spec, streams, n)
    xs = {name: chunks[name] for name in ("q", "k", "v")}
    if "delta" in chunks:
        xs["delta"] = chunks["delta"][..., None, :]
    gates = {name: jnp.moveaxis(chunks[name].astype(compute_dtype(chunks[name].dtype)), 2, 0)
             for name in ("lr", "mom", "keep", "gamma")}
    per_chunk = jax.vmap(jax.vmap(lambda chunk: engine.linear_rows(spec, engine.chunk_gates(spec, chunk))))
    rows = jax.lax.map(jax.checkpoint(per_chunk), gates, batch_size=ROWS_BATCH)
    keep = jnp.zeros((2, rows.shape[-1]), rows.dtype).at[0, 1].set(1.0).at[1, 0].set(1.0)
    full = full_N.reshape(-1, *(1,) * (rows.ndim - 1))
    return xs, jnp.concatenate([rows[..., :-2, :], jnp.where(full, rows[..., -2:, :], keep)], axis=-2)


def compute_dtype(dtype) -> jnp.dtype:
    """The kernels compute in float32 at least: Mosaic's matmuls accumulate in 32 bits, and the memory's
    recurrence compounds rounding (bfloat16 inputs and outputs are stored as such)."""
    return jnp.promote_types(dtype, jnp.float32)


def chunk_forward(spec: engine.Spec, state, momentum, chunk, coef) -> tuple[jax.Array, Any, Any, jax.Array]:
    """One chunk of the kernels: outputs [C, D], the chunk-end (state, momentum) and the chunk's mean
    inner loss [1, 1], in `compute_dtype`. `coef`: the pieces of the chunk's `engine.linear_rows`
    (engine.linear_rows_layout)."""
    dtype = compute_dtype(chunk["q"].dtype)
    state, momentum, chunk, coef = jax.tree_util.tree_map(lambda x: x.astype(dtype), (state, momentum, chunk, coef))
    if "delta" in chunk:
        chunk = {**chunk, "delta": chunk["delta"].reshape(-1)}
    y_CxD, new_state, new_momentum, losses_K = engine.chunk_step_linear(spec, state, momentum, chunk, coef)
    return y_CxD, new_state, new_momentum, jnp.reshape(engine.chunk_loss(spec, losses_K), (1, 1))


def chunk_backward(spec: engine.Spec, state, momentum, chunk, coef, dy_CxD, d_state, d_momentum, dloss_1x1) -> tuple:
    """Cotangents of (chunk-start state, momentum, chunk, coef) from those of `chunk_forward`'s outputs."""
    _, vjp = jax.vjp(partial(chunk_forward, spec), state, momentum, chunk, coef)
    dtype = compute_dtype(dy_CxD.dtype)
    return vjp((dy_CxD.astype(dtype), d_state, d_momentum, dloss_1x1.astype(dtype)))
