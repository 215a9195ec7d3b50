"""The neural-memory chunk scan: `scan_chunks` with the engine's interface, run by the Pallas kernels or
the pure-JAX reference (`kernel = auto | reference | pallas`, memjax.kernels.dispatch).

The fused path (`fused_scan_chunks`): one kernel per direction runs every chunk's state-dependent work
(the inner gradient's factors at the chunk-start state, the read, the chunk-end state and momentum:
engine.chunk_step_linear) with the state carried on chip across chunks; the gate-only coefficients of
each chunk (the momentum / decay recurrence solved with the Omega window's write matrix) are computed
around them in plain JAX (`reference.kernel_inputs`). A custom VJP joins the two directions: it saves
the streams and the state at each remat group's start, and its backward recomputes the coefficients and
differentiates them by ordinary autodiff. Under a context mesh (`jax.set_mesh`) the kernels run inside
shard_map, batch over the mesh's batch axes and heads over `tensor` where those divide them.

Which configurations run the kernels (`supported`): the engine's linear path, i.e. "mlp" memories of
any depth, residual and activation, with "decay" or "qnorm" retention and the "gd" or "momentum"
optimizer, for every objective (l2, lp, huber, dot), Omega window and read order; bfloat16 inputs are
computed in float32. The reference runs instead: optimizer "muon" (per-token updates [C, in, out]; with
ns_form="gram", engine.chunk_step_muon, Newton-Schulz on a [C, m, m] stack of per-token Grams: batched
3-D contractions that the kernels' 2-D block bodies do not express, and that XLA runs as a few large
batched matmuls), retention "softmax" (every token's [in, out] state read through its softmax, token
by token, engine.chunk_step_softmax: a fused kernel would keep a map's state on chip across the chunk's
tokens, but its backward needs every token's state, 1 MiB per map and head at Memora's widths 64 x 256
and chunk 16, more than a kernel block holds on chip) and gated
memories; and whatever `kernel` says, the after-update inner loss of evaluation diagnostics
(`with_after_loss`). The GPU (Triton) kernel also needs power-of-two chunk and widths of at least 16
and an Omega window of 1 (Triton blocks), and SiLU for a deep memory (Triton lowers no erf, so no exact GELU).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from memjax.kernels import dispatch
from memjax.kernels.neural_memory import engine, pallas_gpu, pallas_tpu, reference

OP = "neural_memory"
BATCH_AXES, HEAD_AXIS = ("data", "fsdp"), "tensor"


def spec_supported(spec: engine.Spec) -> tuple[bool, str]:
    """Whether the kernels implement this engine configuration (on some platform), and why not."""
    if spec.memory != "mlp":
        return False, f"memory={spec.memory!r} (the kernels fuse 'mlp' memories)"
    if spec.materialised:
        why = "optimizer='muon'" if spec.optimizer == "muon" else f"retention={spec.retention!r}"
        what = "per-token Newton-Schulz on Grams" if spec.optimizer == "muon" else "per-token weights"
        return False, f"{why} runs the materialised path ({what}), not the fused linear path"
    return True, ""


def supported(spec: engine.Spec, in_dim: int, out_dim: int, on: str | None = None) -> tuple[bool, str]:
    """Whether the kernel for platform `on` (default: `dispatch.platform()`) runs this call, and why not."""
    ok, why = spec_supported(spec)
    if not ok:
        return ok, why
    on = on or dispatch.platform()
    if on == "gpu" or on == "cuda":
        widths = [w for shape in engine.layer_shapes(spec, in_dim, out_dim) for w in shape] + [spec.chunk]
        if any(w < 16 or w & (w - 1) for w in widths):
            return False, (f"the Triton kernel needs power-of-two chunk and widths >= 16, got chunk {spec.chunk}, "
                           f"widths {widths[:-1]}")
        if spec.window != 1:
            return False, f"the Triton kernel needs omega_window=1 (power-of-two blocks), got {spec.window}"
        if spec.depth > 1 and spec.activation == "gelu":
            return False, "the Triton kernel has no erf for exact GELU (use activation='silu')"
    elif on not in ("tpu", "cpu"):
        return False, f"no Pallas kernel for platform {on!r}"
    return True, ""


def scan_chunks(spec: engine.Spec, state, momentum, streams, full_N, with_after_loss=False, *,
                kernel="auto") -> tuple[jax.Array, Any, Any, dict[str, jax.Array]]:
    """engine.scan_chunks (same arguments and results), by the kernel that `kernel` selects. The
    after-update inner loss (`with_after_loss`, evaluation diagnostics) always comes from the reference."""
    ok, why = supported(spec, streams["q"].shape[-1], streams["v"].shape[-1])
    if with_after_loss or dispatch.resolve(OP, kernel, ok, why) == "reference":
        return reference.scan_chunks(spec, state, momentum, streams, full_N, with_after_loss)
    return fused_scan_chunks(spec, state, momentum, streams, full_N)


@dataclasses.dataclass(frozen=True)
class _Kernel:
    spec: engine.Spec
    group: int
    backend: str  # "tpu" or "gpu": which kernel module
    interpret: bool

    @property
    def module(self):
        return pallas_gpu if self.backend == "gpu" else pallas_tpu


def fused_scan_chunks(spec: engine.Spec, state, momentum, streams, full_N, *,
                      backend: str | None = None) -> tuple[jax.Array, Any, Any, dict[str, jax.Array]]:
    """The kernel path of `scan_chunks`. `backend` ("tpu" or "gpu") picks the kernel; by default the
    platform's (the TPU kernel on CPU, in interpret mode)."""
    n = full_N.shape[0]
    on = dispatch.platform()
    backend = backend or ("gpu" if on in ("gpu", "cuda") else "tpu")
    config = _Kernel(spec, engine.remat_group(spec, n), backend, interpret=on == "cpu")
    y, loss, state, momentum = _sharded(partial(_fused, config), state, momentum, streams, full_N)
    b, h = y.shape[:2]
    y = y.reshape(b, h, n * spec.chunk, y.shape[-1])
    return y, state, momentum, {"loss_before": jnp.mean(loss.reshape(b, h, n), axis=(0, 1))}


def _sharded(fn, state, momentum, streams, full_N):
    """fn on each device's batch and heads inside shard_map under a context mesh, else fn."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(state, momentum, streams, full_N)
    b, h = streams["q"].shape[:2]
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    batch = batch_axes if batch_axes and b % math.prod(mesh.shape[a] for a in batch_axes) == 0 else None
    heads = HEAD_AXIS if HEAD_AXIS in mesh.axis_names and h % mesh.shape[HEAD_AXIS] == 0 else None
    per_bh = P(batch, heads)
    specs = jax.tree_util.tree_map(lambda _: per_bh, (state, momentum, streams))
    # check_vma=False: pallas_call has no replication rule (and Pallas TPU kernels compile for a topology
    # only this way).
    return jax.shard_map(fn, mesh=mesh, in_specs=(*specs, P()), out_specs=(per_bh, per_bh, per_bh, per_bh),
                         check_vma=False)(state, momentum, streams, full_N)


def _flat(x):
    return x.reshape(-1, *x.shape[2:])


def _flat_all(tree):
    return jax.tree_util.tree_map(_flat, tree)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(config: _Kernel, state, momentum, streams, full_N):
    return _fused_fwd(config, state, momentum, streams, full_N)[0]


def _kernel_inputs(config: _Kernel, streams, full_N):
    """reference.kernel_inputs with batch and heads flattened (the kernels' grid axis)."""
    xs, coef = reference.kernel_inputs(config.spec, streams, full_N)
    return _flat_all(xs), coef.reshape(coef.shape[0], -1, *coef.shape[3:])


def _fused_fwd(config: _Kernel, state, momentum, streams, full_N):
    b, h = streams["q"].shape[:2]
    xs, coef = _kernel_inputs(config, streams, full_N)
    y, loss, state_end, momentum_end, state_res, momentum_res = config.module.forward(
        config.spec, config.group, _flat_all(state), _flat_all(momentum), xs, coef, interpret=config.interpret)
    unflat = lambda tree: jax.tree_util.tree_map(lambda x: x.reshape(b, h, *x.shape[1:]), tree)
    outputs = (unflat(y), unflat(loss), unflat(state_end), unflat(momentum_end))
    # The streams, not the kernels' inputs: the backward recomputes those (cheap, and the chunked gates
    # and coefficient rows take several times the streams' memory in tiled layouts).
    return outputs, (state_res, momentum_res, streams, full_N)


def _fused_bwd(config: _Kernel, residuals, cotangents):
    state_res, momentum_res, streams, full_N = residuals
    dy, dloss, d_state, d_momentum = cotangents
    b, h = streams["q"].shape[:2]
    (xs, coef), inputs_vjp = jax.vjp(lambda streams: _kernel_inputs(config, streams, full_N), streams)
    d_state0, d_momentum0, d_xs, d_coef = config.module.backward(
        config.spec, config.group, state_res, momentum_res, xs, coef, _flat(dy), _flat(dloss), _flat_all(d_state),
        _flat_all(d_momentum), interpret=config.interpret)
    unflat = lambda tree: jax.tree_util.tree_map(lambda x: x.reshape(b, h, *x.shape[1:]), tree)
    (d_streams,) = inputs_vjp((d_xs, d_coef))
    return unflat(d_state0), unflat(d_momentum0), d_streams, None


_fused.defvjp(_fused_fwd, _fused_bwd)
