"""Mosaic TPU kernels of the weighted embedding bag (see reference.py for the definition).

forward  y_MxV:   per grid step (BM tokens, BV columns) BM*K row slices are DMA'd from the table in HBM
                  (indices read from SMEM) into VMEM, then y_m = w_m (1xK) @ rows_m (KxBV) on the MXU.
dw       dw_MxK:  the same gather; dw_m += g_m (1xBV) @ rows_m^T, summed over the column blocks.
dtable   dV_NxV:  the M*K slots sorted by row; per step C consecutive sorted slots: their dy rows are
                  DMA'd in, scaled by w, and summed per run of equal rows by one (C x C) 0/1 matrix on
                  the MXU; each run's sum is DMA'd to its table row. A run cut by a chunk boundary is
                  carried into the next chunk, whose first write of that row holds the full sum. Rows
                  that no slot names are never written: the output aliases a zeros input.

The wrappers take inputs already prepared by api.py: M padded to a multiple of BM, K to a multiple of
8 (whole sublane tiles per token), the sorted slots to a multiple of C; a float32 table whose width V is a
multiple of 128. The row DMAs need both: Mosaic slices HBM and VMEM only at word-aligned offsets, so
neither a row of a narrower (1, 128)-tiled table nor one row of a sublane-packed bfloat16 tile can be
copied on its own (api.py widens bfloat16 tables). Weights and accumulation are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

TOKENS_PER_BLOCK = 8  # BM: one sublane tile of output rows
SLOTS_PER_CHUNK = 128  # C: sorted slots per backward step (the segment matrix is C x C)
ROWS_BYTES = 4 << 20  # VMEM for one step's gathered rows; BV shrinks (by 128 lanes) to fit
HIGHEST = jax.lax.Precision.HIGHEST


def column_block(v: int, rows: int, itemsize: int) -> int:
    """BV: the widest multiple of 128 dividing V whose `rows` gathered rows fit ROWS_BYTES (V itself
    when V is not a multiple of 128: a block must then span the full dimension)."""
    if v % 128:
        return v
    bv = v
    while bv > 128 and (rows * bv * itemsize > ROWS_BYTES or v % bv):
        bv -= 128
    return bv


def _gather(idx_smem, src_hbm, rows_vmem, sem, v0):
    """rows_vmem[j // K, j % K] = src[idx[j], v0:v0+BV] for the block's BM*K slots: all DMAs in flight
    at once (the rows are small; latency, not bandwidth, bounds one copy)."""
    bm, k, bv = rows_vmem.shape

    def copy(j):
        row = idx_smem[j // k, j % k]
        return pltpu.make_async_copy(src_hbm.at[pl.ds(row, 1), pl.ds(v0, bv)],
                                     rows_vmem.at[j // k, pl.ds(j % k, 1)], sem)

    def start(j, carry):
        copy(j).start()
        return carry

    def wait(j, carry):
        copy(j).wait()
        return carry

    jax.lax.fori_loop(0, bm * k, start, 0)
    jax.lax.fori_loop(0, bm * k, wait, 0)


def _forward_kernel(idx_smem, w_ref, table_hbm, y_ref, rows_vmem, sem):
    bv = y_ref.shape[1]
    _gather(idx_smem, table_hbm, rows_vmem, sem, pl.multiple_of(pl.program_id(1) * bv, bv))
    for m in range(y_ref.shape[0]):
        y_m = jnp.dot(w_ref[m:m + 1, :], rows_vmem[m].astype(jnp.float32), precision=HIGHEST,
                      preferred_element_type=jnp.float32)
        y_ref[m:m + 1, :] = y_m.astype(y_ref.dtype)


def _weights_grad_kernel(idx_smem, g_ref, table_hbm, dw_ref, rows_vmem, sem):
    bv = g_ref.shape[1]
    j = pl.program_id(1)
    _gather(idx_smem, table_hbm, rows_vmem, sem, pl.multiple_of(j * bv, bv))

    @pl.when(j == 0)
    def _():
        dw_ref[...] = jnp.zeros_like(dw_ref)

    for m in range(g_ref.shape[0]):
        dw_m = jax.lax.dot_general(g_ref[m:m + 1, :].astype(jnp.float32), rows_vmem[m].astype(jnp.float32),
                                   (((1,), (1,)), ((), ())), precision=HIGHEST, preferred_element_type=jnp.float32)
        dw_ref[m:m + 1, :] += dw_m


def _token_blocked_call(kernel, table_NxV, idx_MxK, x_MxX, *, weights_grad: bool, interpret):
    """Grid (token blocks, column blocks) over a gather of each token block's K table rows. x is w
    (block BM x K) for the forward, g (BM x BV) for dw; the output is y (BM x BV) or dw (BM x K), which
    accumulates over the column blocks, so that axis is then sequential."""
    m, k = idx_MxK.shape
    n, v = table_NxV.shape
    bm = TOKENS_PER_BLOCK
    bv = column_block(v, bm * k, table_NxV.dtype.itemsize)
    token_block = pl.BlockSpec((bm, k), lambda i, j: (i, 0))
    tile_block = pl.BlockSpec((bm, bv), lambda i, j: (i, j))
    out_shape = (m, k) if weights_grad else (m, v)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32 if weights_grad else table_NxV.dtype),
        grid=(m // bm, v // bv),
        in_specs=[
            pl.BlockSpec((bm, k), lambda i, j: (i, 0), memory_space=pltpu.SMEM),
            tile_block if weights_grad else token_block,
            pl.BlockSpec(memory_space=pltpu.HBM),
        ],
        out_specs=token_block if weights_grad else tile_block,
        scratch_shapes=[pltpu.VMEM((bm, k, bv), table_NxV.dtype), pltpu.SemaphoreType.DMA(())],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary" if weights_grad else "parallel")),
        interpret=interpret,
    )(idx_MxK, x_MxX, table_NxV)


def forward(table_NxV, idx_MxK, w_MxK, *, interpret=False) -> jax.Array:
    """y_MxV (table dtype); w float32."""
    return _token_blocked_call(_forward_kernel, table_NxV, idx_MxK, w_MxK, weights_grad=False, interpret=interpret)


def weights_grad(table_NxV, idx_MxK, g_MxV, *, interpret=False) -> jax.Array:
    """dw_MxK float32 = <table[idx_mk], g_m>."""
    return _token_blocked_call(_weights_grad_kernel, table_NxV, idx_MxK, g_MxV, weights_grad=True,
                               interpret=interpret)


def _table_grad_kernel(chunk_smem, tok_smem, segrow_smem, w_ref, seg_ref, g_hbm, zeros_hbm, dtable_hbm,
                       g_vmem, acc_vmem, carry_vmem, sem):
    del zeros_hbm  # aliased to dtable_hbm: rows no slot names stay zero
    c_slots, bv = g_vmem.shape
    v0 = pl.multiple_of(pl.program_id(0) * bv, bv)

    def gather(s, carry):
        pltpu.make_async_copy(g_hbm.at[pl.ds(tok_smem[s], 1), pl.ds(v0, bv)], g_vmem.at[pl.ds(s, 1)], sem).start()
        return carry

    def gather_wait(s, carry):
        pltpu.make_async_copy(g_hbm.at[pl.ds(tok_smem[s], 1), pl.ds(v0, bv)], g_vmem.at[pl.ds(s, 1)], sem).wait()
        return carry

    jax.lax.fori_loop(0, c_slots, gather, 0)
    jax.lax.fori_loop(0, c_slots, gather_wait, 0)
    updates_CxV = w_ref[...] * g_vmem[...].astype(jnp.float32)
    # One row per run of equal table rows: S[s, j] = 1 where slot j belongs to run s.
    runs_CxC = (jax.lax.broadcasted_iota(jnp.int32, (c_slots, c_slots), 0) == seg_ref[...]).astype(jnp.float32)
    sums_CxV = jnp.dot(runs_CxC, updates_CxV, precision=HIGHEST, preferred_element_type=jnp.float32)
    # The first run continues the previous chunk's last one when the chunk starts mid-run; the carry is
    # only read then, so its value from another column block (or none, at chunk 0) never leaks in.
    first_C = jax.lax.broadcasted_iota(jnp.int32, (c_slots, 1), 0) == 0
    continues = chunk_smem[0, 1] != 0
    sums_CxV = sums_CxV + jnp.where(first_C & continues, carry_vmem[...], 0.0)
    nseg = chunk_smem[0, 0]
    last_1xC = (jax.lax.broadcasted_iota(jnp.int32, (1, c_slots), 1) == nseg - 1).astype(jnp.float32)
    carry_vmem[...] = jnp.dot(last_1xC, sums_CxV, precision=HIGHEST, preferred_element_type=jnp.float32)
    acc_vmem[...] = sums_CxV

    def write(s):
        return pltpu.make_async_copy(acc_vmem.at[pl.ds(s, 1)], dtable_hbm.at[pl.ds(segrow_smem[s], 1), pl.ds(v0, bv)],
                                     sem)

    def write_start(s, carry):
        write(s).start()
        return carry

    def write_wait(s, carry):
        write(s).wait()
        return carry

    jax.lax.fori_loop(0, nseg, write_start, 0)
    jax.lax.fori_loop(0, nseg, write_wait, 0)


def _runs(rows_L):
    """Per chunk of C sorted slots: [number of runs of equal rows, whether the first run continues the
    previous chunk's last]; each slot's run within its chunk; each run's table row."""
    c = SLOTS_PER_CHUNK
    rows_GxC = rows_L.reshape(-1, c)
    starts_L = jnp.concatenate([jnp.ones((1,), bool), rows_L[1:] != rows_L[:-1]])
    starts_GxC = starts_L.reshape(-1, c)
    run_GxC = jnp.cumsum(starts_GxC, axis=1, dtype=jnp.int32) - starts_GxC[:, :1].astype(jnp.int32)
    run_rows_GxC = jnp.zeros_like(rows_GxC).at[jnp.arange(rows_GxC.shape[0])[:, None], run_GxC].set(rows_GxC)
    chunks_Gx1x2 = jnp.stack([run_GxC[:, -1] + 1, (~starts_GxC[:, 0]).astype(jnp.int32)], axis=1)[:, None]
    return chunks_Gx1x2, run_GxC.reshape(1, -1), run_rows_GxC.reshape(-1)


def table_grad(n: int, rows_L, tok_L, w_L, g_MxV, *, interpret=False) -> jax.Array:
    """dV_NxV float32 from the slots sorted by row (rows_L, their tokens and float32 weights), L a
    multiple of SLOTS_PER_CHUNK."""
    chunks_Gx1x2, run_1xL, run_rows = _runs(rows_L)
    c = SLOTS_PER_CHUNK
    v = g_MxV.shape[1]
    bv = column_block(v, 4 * c, 4)  # g, updates, run sums and their copy: (C, BV) each
    smem = functools.partial(pl.BlockSpec, memory_space=pltpu.SMEM)
    return pl.pallas_call(
        _table_grad_kernel,
        out_shape=jax.ShapeDtypeStruct((n, v), jnp.float32),
        grid=(v // bv, rows_L.shape[0] // c),
        in_specs=[
            smem((None, 1, 2), lambda j, i: (i, 0, 0)),  # a (1, 2) block: the last two dims whole
            smem((c,), lambda j, i: (i,)),
            smem((c,), lambda j, i: (i,)),
            pl.BlockSpec((c, 1), lambda j, i: (i, 0)),
            pl.BlockSpec((1, c), lambda j, i: (0, i)),
            pl.BlockSpec(memory_space=pltpu.HBM),
            pl.BlockSpec(memory_space=pltpu.HBM),
        ],
        out_specs=pl.BlockSpec(memory_space=pltpu.HBM),
        scratch_shapes=[pltpu.VMEM((c, bv), g_MxV.dtype), pltpu.VMEM((c, bv), jnp.float32),
                        pltpu.VMEM((1, bv), jnp.float32), pltpu.SemaphoreType.DMA(())],
        input_output_aliases={6: 0},  # the zeros the output starts from
        # The chunks run in order (the carry); column blocks are independent.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
    )(chunks_Gx1x2, tok_L, run_rows, w_L[:, None], run_1xL, g_MxV, jnp.zeros((n, v), jnp.float32))
