"""Device meshes, the logical-axis rules, shardings of the train state and batches, multi-host start-up.

The mesh has three named axes, each split into a within-slice (ICI) and an across-slice (DCN) part:
`data` (batch), `fsdp` (batch, and parameters/optimizer state split along their `embed`-like dimension)
and `tensor` (heads, FFN width, vocabulary). Every parameter declares one logical axis name per dimension
(`logical_axes` metadata); `RULES` maps the generic names onto mesh axes, each block adds the names only
its parameters use (`axis_rules`, memjax.models.registry), and `rules(model_cfg)` is the whole table. A
logical axis missing from the table is an error, never a silent replication.
A dimension that the mapped mesh axes do not divide is replicated
and reported once (`explain`).

Computations that need the mesh at trace time (the sharded embedding bag, activation constraints) read
the context mesh: run them under `jax.set_mesh(mesh)`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.models import registry

log = logging.getLogger("memjax")

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both; fsdp also splits the weights

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated). Parameters first, then the
# activation names used by `constrain`.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_out": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "qkv": None,
    # activations
    "act_batch": BATCH_AXES,
    "act_length": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
}


class MissingRuleError(KeyError):
    """A parameter declares a logical axis that the rules table does not map."""

    def __str__(self):
        return self.args[0]


def rules(model_cfg=None) -> dict:
    """The generic rules and those of the blocks and wrapper `model_cfg` uses (their `axis_rules`, set
    from their settings where a layout is one); without a config, the generic rules alone."""
    table = dict(RULES)
    if model_cfg is not None:
        table.update(registry.sharding_rules(model_cfg))
    return table


# ---------------------------------------------------------------------------------------------- mesh


def mesh_shape(mesh_cfg, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ICI sizes, DCN sizes) per MESH_AXES, with -1 resolved; raises ValueError naming the field."""
    dcn = [mesh_cfg[f"dcn_{axis}"] for axis in MESH_AXES]
    dcn = _fill_auto(dcn, num_slices, "dcn_")
    per_slice, rem = divmod(num_devices, math.prod(dcn))
    if rem:
        raise ValueError(f"config.mesh.dcn_*: {math.prod(dcn)} slices do not divide {num_devices} devices")
    ici = _fill_auto([mesh_cfg[axis] for axis in MESH_AXES], per_slice, "")
    return tuple(ici), tuple(dcn)


def _fill_auto(sizes: list[int], total: int, prefix: str) -> list[int]:
    fields = [f"config.mesh.{prefix}{axis}" for axis in MESH_AXES]
    for field, size in zip(fields, sizes):
        if size == 0 or size < -1:
            raise ValueError(f"{field}: must be a positive size or -1 (auto), got {size}")
    auto = [i for i, size in enumerate(sizes) if size == -1]
    if len(auto) > 1:
        raise ValueError(f"{fields[auto[1]]}: only one of {', '.join(fields)} may be -1")
    fixed = math.prod(size for size in sizes if size != -1)
    if auto:
        if total % fixed:
            raise ValueError(f"{fields[auto[0]]}: -1 cannot fill {total} devices: the other axes multiply to {fixed}")
        sizes = list(sizes)
        sizes[auto[0]] = total // fixed
    elif fixed != total:
        shape = " x ".join(f"{axis}={size}" for axis, size in zip(MESH_AXES, sizes))
        raise ValueError(f"config.mesh.{prefix}*: {shape} = {fixed} devices, but {total} are present "
                         f"(set one axis to -1 to fill them)")
    return sizes


def slice_count(devices) -> int:
    """TPU slices joined over DCN (multi-slice); 1 elsewhere."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The device mesh the config describes, over `devices` (default: all devices of all processes, or
    the first `mesh.num_devices` of them)."""
    devices = list(jax.devices() if devices is None else devices)
    devices = devices[: mesh_cfg.num_devices or len(devices)]
    ici, dcn = mesh_shape(mesh_cfg, len(devices), slice_count(devices))
    if math.prod(dcn) > 1:
        device_grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        device_grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def single_device_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# ------------------------------------------------------------------------------------- specs of arrays


def spec(shape, logical_axes, table: dict, mesh, *, where: str = "", replicated: list | None = None) -> P:
    """The PartitionSpec of an array with these logical axes. A mesh axis is used at most once (first
    dimension wins); sizes-1 axes and axes the mesh lacks are dropped; a dimension the mapped axes do not
    divide is replicated and appended to `replicated` as a message."""
    used, out = set(), []
    for size, name in zip(shape, logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise MissingRuleError(f"{where or 'array'}: logical axis {name!r} has no rule in memjax.parallel.RULES "
                                   "or its block's axis_rules")
        target = table[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        ways = math.prod(mesh.shape[a] for a in axes)
        if axes and size % ways:
            if replicated is not None:
                replicated.append(f"{where} dim {name}={size} is not divisible by {'x'.join(axes)}={ways}")
            axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def logical_axes(model) -> dict:
    """{parameter path (tuple of keys): logical axes} of an NNX model (abstract or concrete)."""
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata().get("logical_axes")
        if axes is None or len(axes) != len(variable.shape):
            raise MissingRuleError(f"parameter {'/'.join(map(str, path))} {variable.shape} declares no logical "
                                   f"axes (got {axes}); give every nnx.Param logical_axes=(one name per dim)")
        out[tuple(path)] = tuple(axes)
    return out


def _key_path(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def param_specs(model, params, mesh, model_cfg=None) -> tuple[dict, list[str]]:
    """PartitionSpecs of a params pure dict (same structure), and the replicated-dimension messages."""
    axes_by_path, table, replicated = logical_axes(model), rules(model_cfg), []

    def one(path, x):
        key = _key_path(path)
        return spec(x.shape, axes_by_path[key], table, mesh, where="/".join(map(str, key)), replicated=replicated)

    return jax.tree_util.tree_map_with_path(one, params), replicated


def state_specs(abstract_state: dict, params_spec: dict, mesh) -> dict:
    """Specs of the whole train state: parameters as given; optimizer moments like the parameter they
    track (matched by path suffix and shape); the carried memories over the batch axes on their first
    (lane) dimension; counters, rng and guards replicated."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_state["params"])
    specs = jax.tree_util.tree_leaves(params_spec, is_leaf=lambda x: isinstance(x, P))
    by_path = {_key_path(path): (x.shape, s) for (path, x), s in zip(leaves, specs, strict=True)}
    lanes = math.prod(mesh.shape[a] for a in BATCH_AXES)

    def opt_leaf(path, x):
        key = _key_path(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return P()

    def carry_leaf(x):
        return P(BATCH_AXES) if x.ndim and x.shape[0] % lanes == 0 else P()

    out = {}
    for name, tree in abstract_state.items():
        if name == "params":
            out[name] = params_spec
        elif name == "opt_state":
            out[name] = jax.tree_util.tree_map_with_path(opt_leaf, tree)
        elif name == "carry":
            out[name] = jax.tree_util.tree_map(carry_leaf, tree)
        else:
            out[name] = jax.tree_util.tree_map(lambda _: P(), tree)
    return out


def named(mesh, specs) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def with_shardings(abstract_tree, shardings) -> Any:
    """ShapeDtypeStructs carrying the shardings (what orbax restores onto and what AOT compiles for)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  abstract_tree, shardings)


def batch_sharding(mesh) -> NamedSharding:
    """Every batch array is split over the batch axes along its first dimension."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(batch: dict, mesh) -> dict:
    """A global array per field from this process's rows (the data pipeline shards by process)."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def constrain(x, *logical) -> jax.Array:
    """Pins an activation's sharding under the context mesh (a no-op without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(x.shape, logical, RULES, mesh))


# ---------------------------------------------------------------------------------------- multi-host


def _cluster_detected() -> bool:
    """A multi-process launch that jax.distributed.initialize() can configure by itself."""
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    tpu_workers = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in tpu_workers or env.get("MEGASCALE_NUM_SLICES", "1") not in ("", "1"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    return int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1


def initialize_distributed(mode: str) -> bool:
    """`auto`: jax.distributed.initialize() when the environment is a multi-process launch (a TPU pod's
    workers, a multi-task SLURM job, mpirun, or JAX_COORDINATOR_ADDRESS set); `on`: always; `off`: never.
    Must run before anything touches a JAX backend. Returns whether it initialised."""
    if mode == "off" or (mode == "auto" and not _cluster_detected()):
        return False
    jax.distributed.initialize()
    log.info("process %d of %d; %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True
