"""Weighted embedding bag, pure JAX: y_m = sum_k w_mk V[idx_mk]. The source of truth for the kernels.

`embedding_bag` is a custom VJP whose forward is a gather-reduce and whose backward is a scatter-add
(over sorted indices, see SORTED_SCATTER) plus the weights' gradient dw_mk = <dy_m, V[idx_mk]>, all in
chunks of bounded size. Nothing is a dense one-hot, and the only work that grows with the number of
rows N is the dense gradient buffer dV itself (autodiff gives parameters dense cotangents; the
optimizer then updates every row anyway).

`embedding_bag_dense` is the dense definition the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Bytes of gathered rows or scatter updates live at once. Large enough to amortise the loop, small
# enough that [M, K, V] is never materialised (1 GB at M=2048 tokens, K=128, V=1024).
CHUNK_BYTES = 4 << 20

# Order of the backward scatter-add. Sorted (argsort of the M*K slot ids first), the writes sweep the
# table once, repeated slots sit side by side and XLA is told the indices are sorted, which accelerator
# scatters can exploit (not measured here). On CPU the argsort costs more than it saves (2048 x 128 ids:
# 45 ms sort for at most 30 ms saved, at 16K and at 1M slots), so there it is token order.
# None: sorted except on CPU.
SORTED_SCATTER: bool | None = None


def embedding_bag_dense(table_NxV, idx_MxK, w_MxK) -> jax.Array:
    """Dense definition: one-hot(idx) weighted by w, times the table. O(M K N): tests only."""
    onehot_MxKxN = jax.nn.one_hot(idx_MxK, table_NxV.shape[0], dtype=table_NxV.dtype)
    return jnp.einsum("mk,mkn,nv->mv", w_MxK.astype(table_NxV.dtype), onehot_MxKxN, table_NxV)


def _rows_per_chunk(row_bytes: int, total_rows: int) -> int:
    return max(1, min(total_rows, CHUNK_BYTES // max(row_bytes, 1)))


def pad_rows(x, multiple: int, value=0) -> jax.Array:
    """x padded along axis 0 to a multiple of `multiple` with `value`."""
    pad = -x.shape[0] % multiple
    return x if pad == 0 else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _chunked_over_tokens(fn, table_NxV, idx_MxK, other_MxX):
    """fn(rows_CxKxV, other_CxX) -> out_CxY applied to chunks of C tokens; returns out_MxY."""
    m, k = idx_MxK.shape
    c = _rows_per_chunk(k * table_NxV.shape[1] * table_NxV.dtype.itemsize, m)
    idx = pad_rows(idx_MxK, c).reshape(-1, c, k)
    other = pad_rows(other_MxX, c)
    other = other.reshape(-1, c, *other.shape[1:])

    def body(_, chunk):
        idx_CxK, other_CxX = chunk
        # Rows are in bounds by contract; "clip" only guards padding and skips the NaN-fill select.
        rows_CxKxV = jnp.take(table_NxV, idx_CxK, axis=0, mode="clip")
        return None, fn(rows_CxKxV, other_CxX)

    _, out = jax.lax.scan(body, None, (idx, other))
    return out.reshape(-1, *out.shape[2:])[:m]


def forward(table_NxV, idx_MxK, w_MxK) -> jax.Array:
    """y_MxV in the table's dtype."""
    w_MxK = w_MxK.astype(table_NxV.dtype)
    return _chunked_over_tokens(lambda rows, w: jnp.sum(rows * w[..., None], axis=1), table_NxV, idx_MxK, w_MxK)


def weights_grad(table_NxV, idx_MxK, g_MxV) -> jax.Array:
    """dw_MxK = <V[idx_mk], g_m>: the forward's gather again, reduced against g instead of w."""
    g_MxV = g_MxV.astype(table_NxV.dtype)
    return _chunked_over_tokens(lambda rows, g: jnp.sum(rows * g[:, None, :], axis=-1), table_NxV, idx_MxK, g_MxV)


def table_grad(n: int, idx_MxK, w_MxK, g_MxV) -> jax.Array:
    """dV_NxV = index_add(idx, w (x) g) in chunks of bounded size, in slot order or in token order."""
    sort = SORTED_SCATTER if SORTED_SCATTER is not None else jax.default_backend() != "cpu"
    w_MxK = w_MxK.astype(g_MxV.dtype)
    m, k = idx_MxK.shape
    v = g_MxV.shape[1]
    w_flat = w_MxK.reshape(-1)
    if sort:
        order = jnp.argsort(idx_MxK.reshape(-1))
        c = _rows_per_chunk(v * g_MxV.dtype.itemsize, m * k)
        # Padding goes to row n, past the end, where mode="drop" discards it; the order stays sorted.
        chunks = (pad_rows(idx_MxK.reshape(-1)[order], c, value=n).reshape(-1, c), pad_rows(order, c).reshape(-1, c))

        def updates(slots_C, pairs_C):
            return slots_C, w_flat[pairs_C][:, None] * g_MxV[pairs_C // k]
    else:
        c = _rows_per_chunk(k * v * g_MxV.dtype.itemsize, m)
        chunks = (pad_rows(idx_MxK, c, value=n).reshape(-1, c * k), pad_rows(w_MxK, c).reshape(-1, c * k),
                  pad_rows(g_MxV, c).reshape(-1, c, v))

        def updates(slots_CK, w_CK, g_CxV):
            return slots_CK, (w_CK.reshape(c, k, 1) * g_CxV[:, None, :]).reshape(c * k, v)

    def add_chunk(dtable_NxV, chunk):
        slots, updates_xV = updates(*chunk)
        return dtable_NxV.at[slots].add(updates_xV, mode="drop", indices_are_sorted=sort), None

    # The first chunk outside the loop gives the carry the same (shard_map) type as the loop's output.
    dtable_NxV, _ = add_chunk(jnp.zeros((n, v), g_MxV.dtype), tuple(x[0] for x in chunks))
    dtable_NxV, _ = jax.lax.scan(add_chunk, dtable_NxV, tuple(x[1:] for x in chunks))
    return dtable_NxV


@jax.custom_vjp
def embedding_bag(table_NxV, idx_MxK, w_MxK) -> jax.Array:
    """y[m] = sum_k w[m, k] * table[idx[m, k]], in the table's dtype; idx must lie in [0, N)."""
    return forward(table_NxV, idx_MxK, w_MxK)


def _bag_fwd(table_NxV, idx_MxK, w_MxK):
    return forward(table_NxV, idx_MxK, w_MxK), (table_NxV, idx_MxK, w_MxK)


def _bag_bwd(residuals, g_MxV):
    table_NxV, idx_MxK, w_MxK = residuals
    g_MxV = g_MxV.astype(table_NxV.dtype)
    dw_MxK = weights_grad(table_NxV, idx_MxK, g_MxV)
    dtable_NxV = table_grad(table_NxV.shape[0], idx_MxK, w_MxK, g_MxV)
    return dtable_NxV, None, dw_MxK.astype(w_MxK.dtype)


embedding_bag.defvjp(_bag_fwd, _bag_bwd)

__all__ = ["embedding_bag", "embedding_bag_dense", "forward", "weights_grad", "table_grad", "pad_rows"]
