"""Weighted embedding bag over a large table: y_m = sum_k w_mk V[idx_mk].

`embedding_bag` is the single-device op: a custom VJP whose forward is a gather-reduce and whose
backward is a scatter-add (over sorted indices, see SORTED_SCATTER), both in chunks of bounded size.
Nothing is a dense one-hot, and the only work that grows with the number of rows N is the dense
gradient buffer dV itself (autodiff gives parameters dense cotangents; the optimizer then updates
every row anyway).

`sharded_embedding_bag` runs the same op with the table sharded over one mesh axis, by columns (each
device holds N x V/P) or by rows (N/P x V); `lookup` picks it when the context mesh (`jax.set_mesh`)
has that axis, else the single-device op.

`embedding_bag_reference` is the dense definition the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# Bytes of gathered rows or scatter updates live at once. Large enough to amortise the loop, small
# enough that [M, K, V] is never materialised (1 GB at M=2048 tokens, K=128, V=1024).
CHUNK_BYTES = 4 << 20

SHARD_MODES = ("columns", "rows")

# Order of the backward scatter-add. Sorted (argsort of the M*K slot ids first), the writes sweep the
# table once, repeated slots sit side by side and XLA is told the indices are sorted, which accelerator
# scatters can exploit (not measured here). On CPU the argsort costs more than it saves (2048 x 128 ids:
# 45 ms sort for at most 30 ms saved, at 16K and at 1M slots), so there it is token order.
# None: sorted except on CPU.
SORTED_SCATTER: bool | None = None


def embedding_bag_reference(table_NxV, idx_MxK, w_MxK):
    """Dense definition: one-hot(idx) weighted by w, times the table. O(M K N): tests only."""
    onehot_MxKxN = jax.nn.one_hot(idx_MxK, table_NxV.shape[0], dtype=table_NxV.dtype)
    return jnp.einsum("mk,mkn,nv->mv", w_MxK.astype(table_NxV.dtype), onehot_MxKxN, table_NxV)


def _rows_per_chunk(row_bytes: int, total_rows: int) -> int:
    return max(1, min(total_rows, CHUNK_BYTES // max(row_bytes, 1)))


def _pad_rows(x, multiple: int, value=0):
    pad = -x.shape[0] % multiple
    return x if pad == 0 else jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=value)


def _chunked_over_tokens(fn, table_NxV, idx_MxK, other_MxX):
    """fn(rows_CxKxV, other_CxX) -> out_CxY applied to chunks of C tokens; returns out_MxY."""
    m, k = idx_MxK.shape
    c = _rows_per_chunk(k * table_NxV.shape[1] * table_NxV.dtype.itemsize, m)
    idx = _pad_rows(idx_MxK, c).reshape(-1, c, k)
    other = _pad_rows(other_MxX, c)
    other = other.reshape(-1, c, *other.shape[1:])

    def body(_, chunk):
        idx_CxK, other_CxX = chunk
        # Rows are in bounds by contract; "clip" only guards padding and skips the NaN-fill select.
        rows_CxKxV = jnp.take(table_NxV, idx_CxK, axis=0, mode="clip")
        return None, fn(rows_CxKxV, other_CxX)

    _, out = jax.lax.scan(body, None, (idx, other))
    return out.reshape(-1, *out.shape[2:])[:m]


def _forward(table_NxV, idx_MxK, w_MxK):
    w_MxK = w_MxK.astype(table_NxV.dtype)
    return _chunked_over_tokens(lambda rows, w: jnp.sum(rows * w[..., None], axis=1), table_NxV, idx_MxK, w_MxK)


@jax.custom_vjp
def embedding_bag(table_NxV, idx_MxK, w_MxK):
    """y[m] = sum_k w[m, k] * table[idx[m, k]], in the table's dtype; idx must lie in [0, N)."""
    return _forward(table_NxV, idx_MxK, w_MxK)


def _bag_fwd(table_NxV, idx_MxK, w_MxK):
    return _forward(table_NxV, idx_MxK, w_MxK), (table_NxV, idx_MxK, w_MxK)


def _bag_bwd(residuals, g_MxV):
    table_NxV, idx_MxK, w_MxK = residuals
    n = table_NxV.shape[0]
    g_MxV = g_MxV.astype(table_NxV.dtype)
    # dw[m, k] = <V[idx[m, k]], g[m]>: the forward's gather again, reduced against g instead of w.
    dw_MxK = _chunked_over_tokens(lambda rows, g: jnp.sum(rows * g[:, None, :], axis=-1), table_NxV, idx_MxK, g_MxV)
    dtable_NxV = _scatter_add(n, idx_MxK, w_MxK.astype(table_NxV.dtype), g_MxV)
    return dtable_NxV, None, dw_MxK.astype(w_MxK.dtype)


def _scatter_add(n: int, idx_MxK, w_MxK, g_MxV):
    """dV = index_add(idx, w (x) g) in chunks of bounded size, in slot order or in token order."""
    sort = SORTED_SCATTER if SORTED_SCATTER is not None else jax.default_backend() != "cpu"
    m, k = idx_MxK.shape
    v = g_MxV.shape[1]
    w_flat = w_MxK.reshape(-1)
    if sort:
        order = jnp.argsort(idx_MxK.reshape(-1))
        c = _rows_per_chunk(v * g_MxV.dtype.itemsize, m * k)
        # Padding goes to row n, past the end, where mode="drop" discards it; the order stays sorted.
        chunks = (_pad_rows(idx_MxK.reshape(-1)[order], c, value=n).reshape(-1, c), _pad_rows(order, c).reshape(-1, c))

        def updates(slots_C, pairs_C):
            return slots_C, w_flat[pairs_C][:, None] * g_MxV[pairs_C // k]
    else:
        c = _rows_per_chunk(k * v * g_MxV.dtype.itemsize, m)
        chunks = (_pad_rows(idx_MxK, c, value=n).reshape(-1, c * k), _pad_rows(w_MxK, c).reshape(-1, c * k),
                  _pad_rows(g_MxV, c).reshape(-1, c, v))

        def updates(slots_CK, w_CK, g_CxV):
            return slots_CK, (w_CK.reshape(c, k, 1) * g_CxV[:, None, :]).reshape(c * k, v)

    def add_chunk(dtable_NxV, chunk):
        slots, updates_xV = updates(*chunk)
        return dtable_NxV.at[slots].add(updates_xV, mode="drop", indices_are_sorted=sort), None

    # The first chunk outside the loop gives the carry the same (shard_map) type as the loop's output.
    dtable_NxV, _ = add_chunk(jnp.zeros((n, v), g_MxV.dtype), tuple(x[0] for x in chunks))
    dtable_NxV, _ = jax.lax.scan(add_chunk, dtable_NxV, tuple(x[1:] for x in chunks))
    return dtable_NxV


embedding_bag.defvjp(_bag_fwd, _bag_bwd)


def sharded_embedding_bag(table_NxV, idx_MxK, w_MxK, *, axis: str, mode: str = "columns", mesh=None):
    """`embedding_bag` with the table sharded over mesh axis `axis`; tokens (M) are sharded over every
    mesh axis and M must be divisible by the mesh size (see `lookup` for padding); the sharded table
    dimension (V for columns, N for rows) must be divisible by the size of `axis`.

    columns: each device holds table[:, cols]; it gathers the indices and weights of its `axis` group,
      reads its column slice for all of them, and an all-to-all returns full rows to the token owners.
    rows: each device holds table[rows]; it gathers the group's indices, sums the hits that fall in its
      rows (others weigh zero), and a reduce-scatter sums the partial outputs back to the token owners.

    Gradients come from differentiating through the collectives; where the table is replicated over
    other mesh axes, shard_map's transpose sums its gradient over them.
    """
    if mode not in SHARD_MODES:
        raise ValueError(f"mode must be one of {SHARD_MODES}, got {mode!r}")
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    tokens = P(tuple(mesh.axis_names))
    table_spec = P(None, axis) if mode == "columns" else P(axis, None)

    replicated_over = tuple(name for name in mesh.axis_names if name != axis)

    def local(table_local, idx_local, w_local):
        if replicated_over:
            # The tokens differ across these axes and the table does not: saying so lets the transpose
            # sum the table's gradient over them (a custom VJP gets no implicit conversion).
            table_local = jax.lax.pcast(table_local, replicated_over, to="varying")
        idx_group = jax.lax.all_gather(idx_local, axis, axis=0, tiled=True)
        w_group = jax.lax.all_gather(w_local, axis, axis=0, tiled=True)
        if mode == "columns":
            y_group = embedding_bag(table_local, idx_group, w_group)
            return jax.lax.all_to_all(y_group, axis, split_axis=0, concat_axis=1, tiled=True)
        rows = table_local.shape[0]
        local_idx = idx_group - jax.lax.axis_index(axis) * rows
        mine = (local_idx >= 0) & (local_idx < rows)
        y_partial = embedding_bag(table_local, jnp.where(mine, local_idx, 0), jnp.where(mine, w_group, 0))
        return jax.lax.psum_scatter(y_partial, axis, scatter_dimension=0, tiled=True)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(table_spec, tokens, tokens), out_specs=tokens
    )(table_NxV, idx_MxK, w_MxK)


def lookup(table_NxV, idx_MxK, w_MxK, *, axis: str = "", mode: str = "columns"):
    """The bag, sharded over `axis` of the context mesh when it has that axis with more than one
    device, else on one device. Tokens are padded to a multiple of the mesh size (decoding feeds one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not axis or mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        return embedding_bag(table_NxV, idx_MxK, w_MxK)
    m = idx_MxK.shape[0]
    size = mesh.size
    y = sharded_embedding_bag(
        table_NxV, _pad_rows(idx_MxK, size), _pad_rows(w_MxK, size), axis=axis, mode=mode, mesh=mesh
    )
    return y[:m]


__all__ = ["embedding_bag", "embedding_bag_reference", "sharded_embedding_bag", "lookup", "SHARD_MODES"]
