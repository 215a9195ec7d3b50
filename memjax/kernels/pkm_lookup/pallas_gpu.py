"""Triton (Pallas GPU) kernels of the weighted embedding bag (see reference.py for the definition).

forward  y_MxV:   program (token block, column block): for each k, a gather load of BM table row
                  slices (one per token), scaled by w and summed in float32 registers.
dw       dw_MxK:  program (token block, k): the same gather against g, reduced over all column blocks.
dtable   dV_NxV:  the M*K slots sorted by row, C consecutive sorted slots per program (and a column
                  block): a sequential sweep sums w * g over each run of equal rows in registers and
                  adds the run's sum to its table row with one atomic add, so a hot row costs one atomic
                  per chunk, not one per slot. Runs cut by a chunk boundary meet in the atomics. The
                  float32 accumulator starts as zeros; rows no slot names stay zero.

Blocks are powers of two (Triton): BV divides V (api.py checks V % MIN_COLUMNS == 0); tokens and
sorted slots arrive padded by api.py. Weights and accumulation are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TOKENS_PER_BLOCK = 16  # BM
SLOTS_PER_CHUNK = 64  # C: sorted slots swept by one program
MAX_COLUMNS = 128  # BV upper bound: a (BM, BV) float32 tile stays in registers
MIN_COLUMNS = 16


def column_block(v: int) -> int:
    """BV: the largest power of two <= MAX_COLUMNS dividing V."""
    bv = MAX_COLUMNS
    while v % bv:
        bv //= 2
    return bv


def _forward_kernel(idx_ref, w_ref, table_ref, y_ref):
    bm, bv = y_ref.shape
    toks, cols = pl.ds(pl.program_id(0) * bm, bm), pl.ds(pl.program_id(1) * bv, bv)

    def add_slot(k, acc_BMxBV):
        rows_BM = idx_ref[toks, k]
        return acc_BMxBV + w_ref[toks, k][:, None] * table_ref[rows_BM, cols].astype(jnp.float32)

    acc = jax.lax.fori_loop(0, idx_ref.shape[1], add_slot, jnp.zeros((bm, bv), jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _weights_grad_kernel(idx_ref, g_ref, table_ref, dw_ref):
    bm = TOKENS_PER_BLOCK
    bv = column_block(table_ref.shape[1])
    toks, k = pl.ds(pl.program_id(0) * bm, bm), pl.program_id(1)
    rows_BM = idx_ref[toks, k]

    def add_columns(c, acc_BM):
        cols = pl.ds(c * bv, bv)
        prod = table_ref[rows_BM, cols].astype(jnp.float32) * g_ref[toks, cols].astype(jnp.float32)
        return acc_BM + jnp.sum(prod, axis=1)

    acc = jax.lax.fori_loop(0, table_ref.shape[1] // bv, add_columns, jnp.zeros((bm,), jnp.float32))
    dw_ref[toks, k] = acc


def _table_grad_kernel(row_ref, tok_ref, w_ref, end_ref, g_ref, zeros_ref, dtable_ref):
    del zeros_ref  # aliased to dtable_ref
    c_slots = SLOTS_PER_CHUNK
    bv = column_block(g_ref.shape[1])
    start, cols = pl.program_id(0) * c_slots, pl.ds(pl.program_id(1) * bv, bv)

    def add_slot(s, acc_BV):
        j = start + s
        acc_BV = acc_BV + w_ref[j] * g_ref[tok_ref[j], cols].astype(jnp.float32)

        @pl.when(end_ref[j] != 0)
        def _():
            plgpu.atomic_add(dtable_ref, (row_ref[j], cols), acc_BV)

        return jnp.where(end_ref[j] != 0, 0.0, acc_BV)

    jax.lax.fori_loop(0, c_slots, add_slot, jnp.zeros((bv,), jnp.float32))


def forward(table_NxV, idx_MxK, w_MxK, *, interpret=False) -> jax.Array:
    """y_MxV (table dtype); M a multiple of TOKENS_PER_BLOCK; w float32."""
    m = idx_MxK.shape[0]
    v = table_NxV.shape[1]
    bv = column_block(v)
    whole = pl.BlockSpec()
    return pl.pallas_call(
        _forward_kernel,
        out_shape=jax.ShapeDtypeStruct((m, v), table_NxV.dtype),
        grid=(m // TOKENS_PER_BLOCK, v // bv),
        in_specs=[whole, whole, whole],
        out_specs=pl.BlockSpec((TOKENS_PER_BLOCK, bv), lambda i, j: (i, j)),
        # Triton parameters pick the Triton lowering (the GPU default is Mosaic GPU).
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
    )(idx_MxK, w_MxK, table_NxV)


def weights_grad(table_NxV, idx_MxK, g_MxV, *, interpret=False) -> jax.Array:
    """dw_MxK float32 = <table[idx_mk], g_m>."""
    m, k = idx_MxK.shape
    whole = pl.BlockSpec()
    return pl.pallas_call(
        _weights_grad_kernel,
        out_shape=jax.ShapeDtypeStruct((m, k), jnp.float32),
        grid=(m // TOKENS_PER_BLOCK, k),
        in_specs=[whole, whole, whole],
        out_specs=whole,
        # Triton parameters pick the Triton lowering (the GPU default is Mosaic GPU).
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
    )(idx_MxK, g_MxV, table_NxV)


def run_ends(rows_L) -> jax.Array:
    """1 where a sorted slot closes its run within its chunk (the next slot names another row, or the
    chunk ends), else 0; int32 [L], L a multiple of SLOTS_PER_CHUNK."""
    last_in_chunk = (jnp.arange(rows_L.shape[0]) % SLOTS_PER_CHUNK) == SLOTS_PER_CHUNK - 1
    changes = jnp.concatenate([rows_L[1:] != rows_L[:-1], jnp.ones((1,), bool)])
    return (last_in_chunk | changes).astype(jnp.int32)


def table_grad(n: int, rows_L, tok_L, w_L, g_MxV, *, interpret=False) -> jax.Array:
    """dV_NxV float32 from the slots sorted by row (rows_L, their tokens and weights), L a multiple of
    SLOTS_PER_CHUNK."""
    v = g_MxV.shape[1]
    whole = pl.BlockSpec()
    return pl.pallas_call(
        _table_grad_kernel,
        out_shape=jax.ShapeDtypeStruct((n, v), jnp.float32),
        grid=(rows_L.shape[0] // SLOTS_PER_CHUNK, v // column_block(v)),
        in_specs=[whole] * 6,
        out_specs=whole,
        input_output_aliases={5: 0},
        # Triton parameters pick the Triton lowering (the GPU default is Mosaic GPU).
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
    )(rows_L, tok_L, w_L, run_ends(rows_L), g_MxV, jnp.zeros((n, v), jnp.float32))
