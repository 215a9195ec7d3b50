"""Weighted embedding bag over a large table: y_m = sum_k w_mk V[idx_mk], on one device or sharded.

`embedding_bag(table, idx, w, kernel=...)` is the single-device op, memjax.kernels.pkm_lookup's api:
the pure-JAX reference (a custom VJP: chunked gather-reduce forward, sorted scatter-add backward; see
kernels/pkm_lookup/reference.py) or the Pallas kernels, chosen by `kernel = auto | reference | pallas`.

`sharded_embedding_bag` runs the same per-device op with the table sharded over one mesh axis, by
columns (each device holds N x V/P) or by rows (N/P x V); `lookup` picks it when the context mesh
(`jax.set_mesh`) has that axis, else the single-device op.

`embedding_bag_reference` is the dense definition the tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from memjax.kernels.pkm_lookup import api, reference

SHARD_MODES = ("columns", "rows")

embedding_bag = api.embedding_bag
embedding_bag_reference = reference.embedding_bag_dense


def sharded_embedding_bag(table_NxV, idx_MxK, w_MxK, *, axis: str, mode: str = "columns", mesh=None,
                          kernel: str = "auto") -> jax.Array:
    """`embedding_bag` with the table sharded over mesh axis `axis`; tokens (M) are sharded over every
    mesh axis and M must be divisible by the mesh size (see `lookup` for padding); the sharded table
    dimension (V for columns, N for rows) must be divisible by the size of `axis`.

    columns: each device holds table[:, cols]; it gathers the indices and weights of its `axis` group,
      reads its column slice for all of them, and an all-to-all returns full rows to the token owners.
    rows: each device holds table[rows]; it gathers the group's indices, sums the hits that fall in its
      rows (others weigh zero), and a reduce-scatter sums the partial outputs back to the token owners.

    Gradients come from differentiating through the collectives; where the table is replicated over
    other mesh axes, shard_map's transpose sums its gradient over them.

    `kernel` is resolved for the per-device table (its V / P or N / P decides what the kernels take).
    """
    if mode not in SHARD_MODES:
        raise ValueError(f"mode must be one of {SHARD_MODES}, got {mode!r}")
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    tokens = P(tuple(mesh.axis_names))
    table_spec = P(None, axis) if mode == "columns" else P(axis, None)
    n, v = table_NxV.shape
    parts = mesh.shape[axis]
    local_shape = (n, v // parts) if mode == "columns" else (n // parts, v)
    kernel = api.resolve(jax.ShapeDtypeStruct(local_shape, table_NxV.dtype), kernel)
    # A pallas_call's outputs carry no varying-axes type, which check_vma would demand; unchecked, the
    # transpose still sums the replicated table's gradient over the other axes.
    check_vma = kernel == "reference"
    replicated_over = tuple(name for name in mesh.axis_names if name != axis)

    def local(table_local, idx_local, w_local):
        if replicated_over and check_vma:
            # The tokens differ across these axes and the table does not: saying so lets the transpose
            # sum the table's gradient over them (a custom VJP gets no implicit conversion).
            table_local = jax.lax.pcast(table_local, replicated_over, to="varying")
        idx_group = jax.lax.all_gather(idx_local, axis, axis=0, tiled=True)
        w_group = jax.lax.all_gather(w_local, axis, axis=0, tiled=True)
        if mode == "columns":
            y_group = embedding_bag(table_local, idx_group, w_group, kernel=kernel)
            return jax.lax.all_to_all(y_group, axis, split_axis=0, concat_axis=1, tiled=True)
        rows = table_local.shape[0]
        local_idx = idx_group - jax.lax.axis_index(axis) * rows
        mine = (local_idx >= 0) & (local_idx < rows)
        y_partial = embedding_bag(table_local, jnp.where(mine, local_idx, 0), jnp.where(mine, w_group, 0),
                                  kernel=kernel)
        return jax.lax.psum_scatter(y_partial, axis, scatter_dimension=0, tiled=True)

    return jax.shard_map(
        local, mesh=mesh, in_specs=(table_spec, tokens, tokens), out_specs=tokens, check_vma=check_vma
    )(table_NxV, idx_MxK, w_MxK)


def lookup(table_NxV, idx_MxK, w_MxK, *, axis: str = "", mode: str = "columns", kernel: str = "auto") -> jax.Array:
    """The bag, sharded over `axis` of the context mesh when it has that axis with more than one
    device, else on one device. Tokens are padded to a multiple of the mesh size (decoding feeds one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not axis or mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        return embedding_bag(table_NxV, idx_MxK, w_MxK, kernel=kernel)
    m = idx_MxK.shape[0]
    size = mesh.size
    y = sharded_embedding_bag(table_NxV, reference.pad_rows(idx_MxK, size), reference.pad_rows(w_MxK, size), axis=axis,
                              mode=mode, mesh=mesh, kernel=kernel)
    return y[:m]


__all__ = ["embedding_bag", "embedding_bag_reference", "sharded_embedding_bag", "lookup", "SHARD_MODES"]
