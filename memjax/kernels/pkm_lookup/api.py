"""The weighted embedding bag y_m = sum_k w_mk V[idx_mk], by the configured kernel.

`embedding_bag(table, idx, w, kernel=...)`: "reference" is reference.py's pure-JAX op; "pallas" the
platform's kernel (Mosaic on TPU, Triton on GPU; on CPU the INTERPRET_AS kernel in interpret mode);
"auto" the kernel where there is one for this call, else the reference (see memjax.kernels.dispatch).

The kernels' custom VJP: forward, then dw (a gather against dy) and dV (a scatter-add over the M*K
slots sorted by row, so each row's updates are summed before one write). Tokens are padded here to the
kernels' block, and on TPU the bag size K to the sublane tile, with weight 0 and row 0; outputs are
sliced back. The op is per device: inside shard_map it sees the local table and tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from memjax.kernels import dispatch
from memjax.kernels.pkm_lookup import pallas_gpu, pallas_tpu, reference

OP = "pkm_lookup"
KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Which platform's kernel runs, interpreted, on CPU: "tpu" or "gpu". Tests switch it to check both.
INTERPRET_AS = "tpu"
# How the TPU kernel is interpreted on CPU: True, Pallas' generic interpreter; or pltpu.InterpretParams(),
# TPU interpret mode, which simulates the TPU's memories and DMAs (stricter: uninitialised reads give
# NaN) but synchronises devices with blocking barriers that can deadlock inside a shard_map over 8 CPU
# devices, so it is for single-device tests.
TPU_INTERPRET: bool | pltpu.InterpretParams = True


def platform() -> str:
    """The kernel's platform: dispatch.platform(), or INTERPRET_AS where that is the CPU."""
    target = dispatch.platform()
    return INTERPRET_AS if target == "cpu" else target


def support(table_NxV) -> tuple[bool, str]:
    """Whether the current platform's kernel takes this table, and if not, why."""
    target = platform()
    if target not in ("tpu", "gpu"):
        return False, f"no Pallas kernel for platform {target!r}"
    if table_NxV.dtype not in KERNEL_DTYPES:
        return False, f"table dtype {table_NxV.dtype} (the kernels take float32 or bfloat16)"
    if target == "tpu" and table_NxV.shape[1] % 128:
        return False, (f"value width {table_NxV.shape[1]} is not a multiple of 128 (the TPU kernel copies rows "
                       "of whole lane tiles)")
    if target == "gpu" and table_NxV.shape[1] % pallas_gpu.MIN_COLUMNS:
        return False, (f"value width {table_NxV.shape[1]} is not a multiple of {pallas_gpu.MIN_COLUMNS} "
                       "(the Triton kernel's column blocks)")
    return True, ""


def resolve(table_NxV, kernel: str) -> str:
    """"pallas" or "reference" for a (per-device) table under config choice `kernel`."""
    return dispatch.resolve(OP, kernel, *support(table_NxV))


def embedding_bag(table_NxV, idx_MxK, w_MxK, *, kernel: str = "auto") -> jax.Array:
    """y[m] = sum_k w[m, k] * table[idx[m, k]] in the table's dtype; idx int, in [0, N)."""
    if resolve(table_NxV, kernel) == "reference":
        return reference.embedding_bag(table_NxV, idx_MxK, w_MxK)
    return _pallas_bag(table_NxV, idx_MxK.astype(jnp.int32), w_MxK, platform())


def _interpret(target: str):
    if not dispatch.interpret():
        return False
    return TPU_INTERPRET if target == "tpu" else True


def _padded(idx_MxK, w_MxK, target: str):
    """idx and float32 w padded with (row 0, weight 0) slots: tokens to the kernel's block, and on TPU
    K to the sublane tile (8 float32 rows) so each token's rows are whole tiles."""
    bm = pallas_tpu.TOKENS_PER_BLOCK if target == "tpu" else pallas_gpu.TOKENS_PER_BLOCK
    k_pad = -idx_MxK.shape[1] % 8 if target == "tpu" else 0
    pad = ((0, -idx_MxK.shape[0] % bm), (0, k_pad))
    return jnp.pad(idx_MxK, pad), jnp.pad(w_MxK.astype(jnp.float32), pad)


def _kernel_table(table_NxV, target: str):
    """The table as the kernel reads it: on TPU float32 (a bfloat16 row is half of a packed sublane pair,
    which Mosaic cannot DMA alone), a table-sized copy per call for bfloat16 tables."""
    return table_NxV.astype(jnp.float32) if target == "tpu" else table_NxV


def _forward(table_NxV, idx_MxK, w_MxK, target):
    idx, w = _padded(idx_MxK, w_MxK, target)
    module = pallas_tpu if target == "tpu" else pallas_gpu
    y = module.forward(_kernel_table(table_NxV, target), idx, w, interpret=_interpret(target))
    return y[: idx_MxK.shape[0]].astype(table_NxV.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas_bag(table_NxV, idx_MxK, w_MxK, target):
    return _forward(table_NxV, idx_MxK, w_MxK, target)


def _pallas_bag_fwd(table_NxV, idx_MxK, w_MxK, target):
    return _forward(table_NxV, idx_MxK, w_MxK, target), (table_NxV, idx_MxK, w_MxK)


def _sorted_slots(idx_MxK, w_MxK, chunk: int):
    """The M*K slots in row order: rows, tokens and weights, padded to a multiple of `chunk` with weight-0
    slots on the last row (so the order, and the last run, stay as they are)."""
    k = idx_MxK.shape[1]
    slots_L = idx_MxK.reshape(-1)
    order_L = jnp.argsort(slots_L).astype(jnp.int32)
    pad = -slots_L.shape[0] % chunk
    rows_L = jnp.pad(slots_L[order_L], (0, pad), mode="edge")
    return rows_L, jnp.pad(order_L // k, (0, pad)), jnp.pad(w_MxK.reshape(-1)[order_L], (0, pad))


def _pallas_bag_bwd(target, residuals, g_MxV):
    table_NxV, idx_MxK, w_MxK = residuals
    m, k = idx_MxK.shape
    n = table_NxV.shape[0]
    interpret = _interpret(target)
    idx, w = _padded(idx_MxK, w_MxK, target)
    table = _kernel_table(table_NxV, target)
    # As in the reference, dy meets the table in the table's dtype (rounded to it, then widened on TPU).
    g = jnp.pad(g_MxV.astype(table_NxV.dtype).astype(table.dtype), ((0, idx.shape[0] - m), (0, 0)))
    module = pallas_tpu if target == "tpu" else pallas_gpu
    dw = module.weights_grad(table, idx, g, interpret=interpret)
    dtable = module.table_grad(n, *_sorted_slots(idx, w, module.SLOTS_PER_CHUNK), g, interpret=interpret)
    return dtable.astype(table_NxV.dtype), None, dw[:m, :k].astype(w_MxK.dtype)


_pallas_bag.defvjp(_pallas_bag_fwd, _pallas_bag_bwd)

__all__ = ["embedding_bag", "resolve", "support", "platform", "OP", "INTERPRET_AS"]
