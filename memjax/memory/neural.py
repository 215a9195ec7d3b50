"""The neural memory layer: projections, gates and carried state around the test-time engine.

x_BxTxD (normalised) -> out [B, T, D]. Per memory head: q, k, v = SiLU(causal depthwise conv(x W)),
q and k L2-normalised; gates theta = theta_max * sigmoid(x w_theta + b), eta = sigmoid(.), alpha =
sigmoid(.); y = the engine's read of q; out = W_o(RMSNorm(y) * SiLU(x W_g)) (Titans' output norm and gate).
The initial memory weights M_0 are parameters (one per head); momentum starts at zero.

Carried state (decoding, segments, long inputs): the conv's last inputs, the memory weights and
momentum after the last complete chunk, and the tokens of the incomplete chunk (their q, k, v and
gates, and how many). A call prepends those pending tokens, so any split of a sequence into calls,
including one token at a time, gives the outputs of one call over the whole sequence.

Persistent tokens (`persistent_tokens` > 0): learned inputs processed at the start of every sequence
(prepended in training; run by `init_state` when decoding), so the memory starts each sequence from
weights that have already seen them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory import engine
from memjax.models import layers

STREAMS = ("q", "k", "v", "lr", "mom", "keep")


def engine_spec(p, eps: float) -> engine.Spec:
    return engine.Spec(
        depth=p.memory_depth, expansion=p.memory_expansion, activation=p.activation, residual=p.memory_residual,
        objective=p.objective, read=p.read, chunk=p.chunk, remat_chunks=p.remat_chunks, eps=eps,
    )


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def l2_normalize(x, eps: float = 1e-6):
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class NeuralMemory(nnx.Module):
    def __init__(self, p, model_cfg, *, rngs: nnx.Rngs):
        d, h = model_cfg.d_model, p.heads
        dh = d // h
        dtype = jnp.dtype(model_cfg.dtype)
        std, out_std = model_cfg.init_std, model_cfg.init_std / (2 * model_cfg.num_layers) ** 0.5
        self.spec = engine_spec(p, model_cfg.norm_eps)
        self.heads, self.head_dim, self.dtype, self.eps = h, dh, dtype, model_cfg.norm_eps
        self.conv_kernel, self.theta_max, self.num_persistent = p.conv_kernel, p.theta_max, p.persistent_tokens
        self.qkv = layers.Dense((d,), (3, h, dh), ("embed", "qkv", "heads", "head_dim"), std=std, dtype=dtype, rngs=rngs)
        if p.conv_kernel:
            self.conv = layers.param(rngs, (p.conv_kernel, 3, h, dh), p.conv_kernel**-0.5,
                                     ("conv", "qkv", "heads", "head_dim"))
        self.gates = layers.Dense((d,), (3, h), ("embed", "qkv", "heads"), std=std, dtype=dtype, rngs=rngs)
        bias = jnp.asarray([_logit(p.theta_init / p.theta_max), _logit(p.eta_init), _logit(p.alpha_init)], jnp.float32)
        self.gate_bias = nnx.Param(jnp.broadcast_to(bias[:, None], (3, h)), logical_axes=("qkv", "heads"))
        self.initial_weights = nnx.List([
            layers.param(rngs, (h, fan_in, fan_out), fan_in**-0.5, ("heads", "memory_in", "memory_out"))
            for fan_in, fan_out in engine.layer_shapes(self.spec, dh)
        ])
        self.out_norm = nnx.Param(jnp.ones((h, dh), jnp.float32), logical_axes=("heads", "head_dim"))
        self.out_gate = layers.Dense((d,), (h, dh), ("embed", "heads", "head_dim"), std=std, dtype=dtype, rngs=rngs)
        self.out = layers.Dense((h, dh), (d,), ("heads", "head_dim", "embed"), std=out_std, dtype=dtype, rngs=rngs)
        if p.persistent_tokens:
            self.persistent = layers.param(rngs, (p.persistent_tokens, d), 1.0, ("persistent", "embed"))
        self.record = False  # set by diagnostics only: sown values would otherwise be written every step

    # --- state ----------------------------------------------------------------------------------

    def inner_dtype(self, x):
        # The inner loop runs in float32 at least (float64 under jax_enable_x64 for tests).
        return jnp.promote_types(x.dtype, jnp.float32)

    def empty_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        h, dh, c = self.heads, self.head_dim, self.spec.chunk
        weights = [jnp.broadcast_to(w[...].astype(dtype), (batch_size, *w.shape)) for w in self.initial_weights]
        pending = {name: jnp.zeros((batch_size, h, c, dh) if name in ("q", "k", "v") else (batch_size, h, c), dtype)
                   for name in STREAMS}
        return {
            "conv": jnp.zeros((batch_size, max(self.conv_kernel - 1, 0), 3, h, dh), self.dtype),
            "weights": weights,
            "momentum": [jnp.zeros_like(w) for w in weights],
            "pending": pending,
            "count": jnp.zeros((), jnp.int32),
        }

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        state = self.empty_state(batch_size, dtype)
        if self.num_persistent:
            prefix = jnp.broadcast_to(self.persistent[...].astype(self.dtype), (batch_size, *self.persistent.shape))
            _, state = self(prefix, state, prefix_done=True)
        return state

    # --- the layer ------------------------------------------------------------------------------

    def streams(self, x_BxTxD, conv_state):
        """Per-token q, k, v [B, H, T, Dh] and lr, mom, keep [B, H, T] in the inner dtype; new conv state."""
        raw_BxTx3xHxK = self.qkv(x_BxTxD)
        if self.conv_kernel:
            history = jnp.concatenate([conv_state.astype(raw_BxTx3xHxK.dtype), raw_BxTx3xHxK], axis=1)
            t = x_BxTxD.shape[1]
            kernel = self.conv[...].astype(raw_BxTx3xHxK.dtype)
            raw_BxTx3xHxK = sum(history[:, i : i + t] * kernel[i] for i in range(self.conv_kernel))
            conv_state = history[:, history.shape[1] - conv_state.shape[1]:]
        inner = self.inner_dtype(x_BxTxD)
        q, k, v = jnp.unstack(jax.nn.silu(raw_BxTx3xHxK).astype(inner), axis=2)
        q, k = l2_normalize(q, self.eps), l2_normalize(k, self.eps)
        gates_BxTx3xH = jax.nn.sigmoid(
            (self.gates(x_BxTxD) + self.gate_bias[...].astype(self.dtype)).astype(inner)
        )
        theta, eta, alpha = jnp.unstack(gates_BxTx3xH, axis=2)
        heads_first = lambda x: jnp.moveaxis(x, 1, 2)
        streams = {"q": q, "k": k, "v": v, "lr": self.theta_max * theta, "mom": eta, "keep": 1.0 - alpha}
        return {name: heads_first(x) for name, x in streams.items()}, conv_state

    def __call__(self, x_BxTxD, state=None, *, aligned=False, prefix_done=False):
        """`aligned`: the caller guarantees the state holds no pending tokens (saves a chunk of work)."""
        out_BxTxD, new_state, diagnostics = self.forward(x_BxTxD, state, aligned=aligned, prefix_done=prefix_done)
        if diagnostics is not None:
            self.sow(nnx.Intermediate, "diagnostics", diagnostics)
        return out_BxTxD, new_state

    def forward(self, x_BxTxD, state=None, *, aligned=False, prefix_done=False):
        """(out, new state, diagnostics or None): a pure function of the module (usable in lax.scan)."""
        batch = x_BxTxD.shape[0]
        prefixed = self.num_persistent and state is None and not prefix_done
        if prefixed:
            prefix = jnp.broadcast_to(self.persistent[...].astype(x_BxTxD.dtype), (batch, *self.persistent.shape))
            x_BxTxD = jnp.concatenate([prefix, x_BxTxD], axis=1)
        inner = self.inner_dtype(x_BxTxD)
        carried = state is not None
        if not carried:
            state = self.empty_state(batch, inner)
        streams, conv_state = self.streams(x_BxTxD, state["conv"])
        t, c = x_BxTxD.shape[1], self.spec.chunk
        if carried and not aligned:
            y_BxHxTxK, weights, momentum, pending, count, stats, full = self._with_pending(streams, state)
        else:
            n = engine.num_chunks(t, c)
            padded = {name: _pad_time(x, n * c - t) for name, x in streams.items()}
            full = jnp.arange(1, n + 1) * c <= t
            y, weights, momentum, stats = engine.scan_chunks(
                self.spec, state["weights"], state["momentum"], padded, full, with_after_loss=self.record
            )
            y_BxHxTxK = y[:, :, :t]
            n_full = t // c
            pending = {name: _pad_time(x[:, :, n_full * c:], c - (t - n_full * c)) for name, x in streams.items()}
            count = jnp.asarray(t - n_full * c, jnp.int32)
        y_BxTxHxK = jnp.moveaxis(y_BxHxTxK, 1, 2)
        diagnostics = self._diagnostics(streams, stats, full, weights) if self.record else None
        y_BxTxHxK = layers.rms_normalize(y_BxTxHxK, self.eps) * self.out_norm[...]
        gated = y_BxTxHxK.astype(self.dtype) * jax.nn.silu(self.out_gate(x_BxTxD))
        out_BxTxD = self.out(gated).astype(x_BxTxD.dtype)
        if prefixed:
            out_BxTxD = out_BxTxD[:, self.num_persistent:]
        new_state = None
        if carried or prefix_done:
            new_state = {"conv": conv_state, "weights": weights, "momentum": momentum, "pending": pending,
                         "count": count}
        return out_BxTxD, new_state, diagnostics

    def _with_pending(self, streams, state):
        """The pending tokens of the last incomplete chunk, then this call's tokens, chunked from the
        last complete chunk's state; outputs only for this call's tokens."""
        c = self.spec.chunk
        t = streams["q"].shape[2]
        count = state["count"]
        n = engine.num_chunks(c - 1 + t, c)
        slots = jnp.arange((n + 1) * c)  # one spare chunk so the new pending slice is always in range
        source = jnp.clip(jnp.where(slots < count, slots, c + slots - count), 0, c + t - 1)
        joined = {name: jnp.take(jnp.concatenate([state["pending"][name], x], axis=2), source, axis=2)
                  for name, x in streams.items()}
        full = jnp.arange(1, n + 1) * c <= count + t
        y, weights, momentum, stats = engine.scan_chunks(
            self.spec, state["weights"], state["momentum"], {k: x[:, :, : n * c] for k, x in joined.items()}, full,
            with_after_loss=self.record,
        )
        y_new = jax.lax.dynamic_slice_in_dim(y, count, t, axis=2)
        n_full = (count + t) // c
        pending = {name: jax.lax.dynamic_slice_in_dim(x, n_full * c, c, axis=2) for name, x in joined.items()}
        return y_new, weights, momentum, pending, (count + t) % c, stats, full

    def _diagnostics(self, streams, stats, full, weights):
        complete = jnp.maximum(jnp.sum(full), 1)
        values = {f"inner_{name}": jnp.sum(jnp.where(full, s, 0.0)) / complete for name, s in stats.items()}
        values.update({
            "theta": jnp.mean(streams["lr"]), "eta": jnp.mean(streams["mom"]), "alpha": 1.0 - jnp.mean(streams["keep"]),
            "weight_norm": jnp.mean(jnp.sqrt(sum(jnp.sum(w * w, axis=(-2, -1)) for w in weights))),
        })
        return values



def flops_per_token(p, d_model: int) -> float:
    """Training FLOPs per token that are not parameter matmuls: the engine (3x its forward) and the conv."""
    engine_flops = engine.forward_flops_per_token(engine_spec(p, 1e-6), d_model // p.heads)
    return 3.0 * (p.heads * engine_flops + 2.0 * p.conv_kernel * 3 * d_model)


def _pad_time(x, pad: int):
    """Pads axis 2 (time, after batch and heads) with zeros."""
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
