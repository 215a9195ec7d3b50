"""The neural memory layer: projections, gates, feature map and carried state around the engine.

x_BxTxD (normalised) -> out [B, T, D]. Per memory head: q, k, v = SiLU(causal depthwise conv(x W)),
q and k L2-normalised, then mapped by the feature map phi (identity, or a polynomial: see `features`);
gates theta = theta_max * sigmoid(x w + b) (step size), eta = sigmoid(.) (momentum), alpha = sigmoid(.)
(forgetting), with an Omega window > 1 gamma = sigmoid(.) (the window's token weights), with the Huber
objective delta = softplus(.) (its threshold); y = the engine's read of phi(q);
out = W_o(RMSNorm(y) * SiLU(x W_g)) (Titans' output norm and gate). The memory's initial state A_0 is a
parameter per head; momentum starts at zero.

Carried state (decoding, segments, long inputs): the conv's last inputs, the state and momentum after
the last complete chunk, the tokens of the incomplete chunk (all their streams, and how many), and the
c - 1 tokens before the chunk grid's last boundary (the Omega window's history). A call prepends the
pending tokens, so any split of a sequence into calls, one token at a time included, gives the outputs
of one call over the whole sequence.

Persistent tokens (`persistent_tokens` > 0): learned inputs processed at the start of every sequence
(prepended in training; run by `init_state` when decoding), so each sequence starts from a memory that
has already been written with them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.neural_memory import api as neural_memory
from memjax.kernels.neural_memory import engine
from memjax.models import layers, sublayers


def engine_spec(p, eps: float) -> engine.Spec:
    return engine.Spec(
        memory=p.memory, depth=p.memory_depth, expansion=p.memory_expansion, activation=p.activation,
        residual=p.memory_residual, objective=p.objective, p=p.p_norm, window=p.omega_window,
        optimizer=p.optimizer, ns_steps=p.ns_steps, ns_form=p.ns_form, retention=p.retention, q=p.q_norm, read=p.read,
        chunk=p.chunk, remat_chunks=p.remat_chunks, eps=eps,
    )


def feature_dim(head_dim: int, degree: int) -> int:
    """Width of phi: the head dim (identity, degree 0) or sum_{i<=p} head_dim^i."""
    return head_dim if degree == 0 else sum(head_dim**i for i in range(degree + 1))


def features(x_xK, coefficients, degree: int) -> jax.Array:
    """phi(x) = [c_1 x, c_0, c_2 x(x)x, .., c_p x^(x)p] (tensor powers, degree-1 block first so that a
    residual memory adds x), so that phi(q) . phi(k) = sum_i c_i^2 (q . k)^i: with c_i = 1/sqrt(i!)
    (the initialisation) the exponential kernel truncated at degree p. Degree 0: phi(x) = x."""
    if degree == 0:
        return x_xK
    blocks, power = [coefficients[1] * x_xK, jnp.broadcast_to(coefficients[0], (*x_xK.shape[:-1], 1))], x_xK
    for i in range(2, degree + 1):
        power = (power[..., :, None] * x_xK[..., None, :]).reshape(*x_xK.shape[:-1], -1)
        blocks.append(coefficients[i] * power)
    return jnp.concatenate(blocks, axis=-1)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def l2_normalize(x, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def causal_conv(x_BxTx_, history_BxKm1x_, kernel_Kx_) -> tuple[jax.Array, jax.Array]:
    """Causal depthwise convolution over time (axis 1) of x, continuing the K - 1 inputs before it
    (`history`, zeros at a sequence start); every trailing axis is a channel of its own. Returns the
    output (x's dtype) and the new history (the last K - 1 inputs)."""
    history = jnp.concatenate([history_BxKm1x_.astype(x_BxTx_.dtype), x_BxTx_], axis=1)
    t, taps = x_BxTx_.shape[1], kernel_Kx_.shape[0]
    kernel = kernel_Kx_.astype(x_BxTx_.dtype)
    out = sum(history[:, i : i + t] * kernel[i] for i in range(taps))
    return out, history[:, history.shape[1] - history_BxKm1x_.shape[1]:]


class NeuralMemory(nnx.Module):
    def __init__(self, p, model_cfg, *, rngs: nnx.Rngs):
        d, h = model_cfg.d_model, p.heads
        dh = d // h
        dtype = jnp.dtype(model_cfg.dtype)
        std, out_std = model_cfg.init_std, sublayers.output_std(model_cfg)
        self.spec = engine_spec(p, model_cfg.norm_eps)
        self.kernel = p.kernel  # the chunk scan's implementation: memjax.kernels.neural_memory.api
        self.heads, self.head_dim, self.dtype, self.eps = h, dh, dtype, model_cfg.norm_eps
        self.conv_kernel, self.theta_max, self.num_persistent = p.conv_kernel, p.theta_max, p.persistent_tokens
        self.degree = p.feature_degree
        self.gate_names = ("theta", "eta", "alpha") + (("gamma",) if p.omega_window > 1 else ()) + (
            ("delta",) if p.objective == "huber" else ())
        self.qkv = layers.Dense((d,), (3, h, dh), ("embed", "qkv", "heads", "head_dim"), std=std, dtype=dtype,
                                rngs=rngs)
        if p.conv_kernel:
            self.conv = layers.param(rngs, (p.conv_kernel, 3, h, dh), p.conv_kernel**-0.5,
                                     ("conv", "qkv", "heads", "head_dim"))
        self.gates = layers.Dense((d,), (len(self.gate_names), h), ("embed", "gates", "heads"), std=std, dtype=dtype,
                                  rngs=rngs)
        initial = {"theta": _logit(p.theta_init / p.theta_max), "eta": _logit(p.eta_init),
                   "alpha": _logit(p.alpha_init), "gamma": _logit(p.gamma_init),
                   "delta": math.log(math.expm1(p.delta_init))}
        bias = jnp.asarray([initial[name] for name in self.gate_names], jnp.float32)
        # Per-head biases, 2-D but no matrix: weight decay would pull every gate towards 0.5.
        self.gate_bias = nnx.Param(jnp.broadcast_to(bias[:, None], (len(self.gate_names), h)),
                                   logical_axes=("gates", "heads"), decay=False)
        exp_kernel = tuple(1.0 / math.sqrt(math.factorial(i)) for i in range(self.degree + 1))
        if self.degree and p.feature_learnable:
            self.feature_coefficients = nnx.Param(jnp.asarray(exp_kernel, jnp.float32),
                                                  logical_axes=("feature_degree",))
        else:
            self.feature_coefficients = exp_kernel  # fixed: a constant of the computation
        # The memory's weights before the first token: the start of a recurrence, not a weight of the
        # model's matmuls, so weight decay would only pull every sequence's memory towards zero.
        self.initial_state = nnx.List([
            layers.param(rngs, (h, fan_in, fan_out), fan_in**-0.5, ("heads", "memory_in", "memory_out"), decay=False)
            for fan_in, fan_out in engine.layer_shapes(self.spec, feature_dim(dh, self.degree), dh)
        ])
        self.out_norm = nnx.Param(jnp.ones((h, dh), jnp.float32), logical_axes=("heads", "head_dim"), decay=False)
        self.out_gate = layers.Dense((d,), (h, dh), ("embed", "heads", "head_dim"), std=std, dtype=dtype, rngs=rngs)
        self.out = layers.Dense((h, dh), (d,), ("heads", "head_dim", "embed"), std=out_std, dtype=dtype, rngs=rngs)
        if p.persistent_tokens:
            self.persistent = layers.param(rngs, (p.persistent_tokens, d), 1.0, ("persistent", "embed"), decay=False)
        self.record = False  # set by diagnostics only: sown values would otherwise be written every step

    # --- state ----------------------------------------------------------------------------------

    def inner_dtype(self, x) -> jnp.dtype:
        # The inner loop runs in float32 at least (float64 under jax_enable_x64 for tests).
        return jnp.promote_types(x.dtype, jnp.float32)

    def _zeros_like_streams(self, batch_size: int, length: int, dtype) -> dict:
        h, dh, f = self.heads, self.head_dim, feature_dim(self.head_dim, self.degree)
        widths = {"q": f, "k": f, "v": dh}
        names = ("q", "k", "v", "lr", "mom", "keep", "gamma") + (("delta",) if "delta" in self.gate_names else ())
        return {name: jnp.zeros((batch_size, h, length, widths[name]) if name in widths else (batch_size, h, length),
                                dtype) for name in names}

    def empty_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        state = [jnp.broadcast_to(a[...].astype(dtype), (batch_size, *a.shape)) for a in self.initial_state]
        history = {name: x for name, x in self._zeros_like_streams(batch_size, self.spec.window - 1, dtype).items()
                   if name in self.spec.window_streams}
        return {
            "conv": jnp.zeros((batch_size, max(self.conv_kernel - 1, 0), 3, self.heads, self.head_dim), self.dtype),
            "memory": state,
            "momentum": [jnp.zeros_like(a) for a in state],
            "pending": self._zeros_like_streams(batch_size, self.spec.chunk, dtype),
            "count": jnp.zeros((), jnp.int32),
            "history": history,
        }

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        state = self.empty_state(batch_size, dtype)
        if self.num_persistent:
            prefix = jnp.broadcast_to(self.persistent[...].astype(self.dtype), (batch_size, *self.persistent.shape))
            _, state, _ = self.forward(prefix, state, prefix_done=True)
        return state

    # --- the layer ------------------------------------------------------------------------------

    def streams(self, x_BxTxD, conv_state) -> tuple[dict[str, jax.Array], jax.Array | None]:
        """Per-token streams [B, H, T, ...] in the inner dtype (see engine.scan_chunks); new conv state."""
        raw_BxTx3xHxK = self.qkv(x_BxTxD)
        if self.conv_kernel:
            raw_BxTx3xHxK, conv_state = causal_conv(raw_BxTx3xHxK, conv_state, self.conv[...])
        inner = self.inner_dtype(x_BxTxD)
        q, k, v = jnp.unstack(jax.nn.silu(raw_BxTx3xHxK).astype(inner), axis=2)
        q, k = l2_normalize(q, self.eps), l2_normalize(k, self.eps)
        q, k = self.features(q), self.features(k)
        logits = (self.gates(x_BxTxD) + self.gate_bias[...].astype(self.dtype)).astype(inner)
        gates = dict(zip(self.gate_names, jnp.unstack(logits, axis=2)))
        streams = {
            "q": q, "k": k, "v": v,
            "lr": self.theta_max * jax.nn.sigmoid(gates["theta"]),
            "mom": jax.nn.sigmoid(gates["eta"]),
            "keep": 1.0 - jax.nn.sigmoid(gates["alpha"]),
            "gamma": jax.nn.sigmoid(gates["gamma"]) if "gamma" in gates else jnp.ones_like(gates["theta"]),
        }
        if "delta" in gates:
            streams["delta"] = jax.nn.softplus(gates["delta"])
        return {name: jnp.moveaxis(x, 1, 2) for name, x in streams.items()}, conv_state

    def features(self, x) -> jax.Array:
        if not self.degree:
            return x
        coefficients = self.feature_coefficients
        if isinstance(coefficients, nnx.Param):
            coefficients = coefficients[...].astype(x.dtype)
        return features(x, coefficients, self.degree)

    def __call__(self, x_BxTxD, state=None, *, aligned=False, prefix_done=False):
        """`aligned`: the caller guarantees the state holds no pending tokens (saves a chunk of work)."""
        out_BxTxD, new_state, diagnostics = self.forward(x_BxTxD, state, aligned=aligned, prefix_done=prefix_done)
        if diagnostics is not None:
            self.sow(nnx.Intermediate, "diagnostics", diagnostics)
        return out_BxTxD, new_state

    def forward(self, x_BxTxD, state=None, *, aligned=False,
                prefix_done=False) -> tuple[jax.Array, dict | None, dict | None]:
        """(out, new state, diagnostics or None): a pure function of the module (usable in lax.scan)."""
        batch = x_BxTxD.shape[0]
        prefixed = self.num_persistent and state is None and not prefix_done
        if prefixed:
            prefix = jnp.broadcast_to(self.persistent[...].astype(x_BxTxD.dtype), (batch, *self.persistent.shape))
            x_BxTxD = jnp.concatenate([prefix, x_BxTxD], axis=1)
        carried = state is not None
        if not carried:
            state = self.empty_state(batch, self.inner_dtype(x_BxTxD))
        streams, conv_state = self.streams(x_BxTxD, state["conv"])
        t, c = x_BxTxD.shape[1], self.spec.chunk
        if carried and not aligned:
            # The pending tokens of the last incomplete chunk, then this call's: [count + t] valid tokens.
            count, n = state["count"], engine.num_chunks(c - 1 + t, c)
            slots = jnp.arange((n + 1) * c)  # a spare chunk keeps the new pending slice in range
            source = jnp.clip(jnp.where(slots < count, slots, c + slots - count), 0, c + t - 1)
            joined = {name: jnp.take(jnp.concatenate([state["pending"][name], x], axis=2), source, axis=2)
                      for name, x in streams.items()}
        else:
            count, n = jnp.zeros((), jnp.int32), engine.num_chunks(t, c)
            joined = {name: _pad_time(x, (n + 1) * c - t) for name, x in streams.items()}
        valid = count + t
        full = jnp.arange(1, n + 1) * c <= valid
        chunked = {name: x[:, :, : n * c] for name, x in joined.items()}
        window_prefixed = {name: jnp.concatenate([state["history"][name], joined[name]], axis=2)
                           for name in self.spec.window_streams}
        chunked.update({name: x[:, :, : self.spec.window - 1 + n * c] for name, x in window_prefixed.items()})
        y, memory, momentum, stats = neural_memory.scan_chunks(
            self.spec, state["memory"], state["momentum"], chunked, full, with_after_loss=self.record,
            kernel=self.kernel,
        )
        y_BxHxTxK = jax.lax.dynamic_slice_in_dim(y, count, t, axis=2)
        boundary = (valid // c) * c
        new_state = {
            "conv": conv_state, "memory": memory, "momentum": momentum, "count": valid % c,
            "pending": {name: jax.lax.dynamic_slice_in_dim(x, boundary, c, axis=2) for name, x in joined.items()},
            "history": {name: jax.lax.dynamic_slice_in_dim(x, boundary, self.spec.window - 1, axis=2)
                        for name, x in window_prefixed.items()},
        }
        y_BxTxHxK = jnp.moveaxis(y_BxHxTxK, 1, 2)
        diagnostics = self._diagnostics(streams, stats, full, memory) if self.record else None
        y_BxTxHxK = layers.rms_normalize(y_BxTxHxK, self.eps) * self.out_norm[...]
        gated = y_BxTxHxK.astype(self.dtype) * jax.nn.silu(self.out_gate(x_BxTxD))
        out_BxTxD = self.out(gated).astype(x_BxTxD.dtype)
        if prefixed:
            out_BxTxD = out_BxTxD[:, self.num_persistent:]
        return out_BxTxD, (new_state if carried or prefix_done else None), diagnostics

    def _diagnostics(self, streams, stats, full, memory):
        complete = jnp.maximum(jnp.sum(full), 1)
        values = {f"inner_{name}": jnp.sum(jnp.where(full, s, 0.0)) / complete for name, s in stats.items()}
        values.update({
            "theta": jnp.mean(streams["lr"]),
            "eta": 0.0 if self.spec.optimizer == "gd" else jnp.mean(streams["mom"]),
            "alpha": 1.0 - jnp.mean(streams["keep"]),
            "weight_norm": jnp.mean(jnp.sqrt(sum(jnp.sum(w * w, axis=(-2, -1)) for w in memory))),
        })
        for name in ("gamma", "delta"):
            if name in self.gate_names:
                values[name] = jnp.mean(streams[name])
        return values


def flops_per_token(p, d_model: int) -> float:
    """Training FLOPs per token that are not parameter matmuls: the engine (3x its forward) and the
    feature map. (The conv is counted with the parameters: one multiply-add per weight and token.)"""
    dh = d_model // p.heads
    f = feature_dim(dh, p.feature_degree)
    engine_flops = engine.forward_flops_per_token(engine_spec(p, 1e-6), f, dh)
    return 3.0 * p.heads * (engine_flops + 4.0 * f)


def _pad_time(x, pad: int):
    """Pads axis 2 (time, after batch and heads) with zeros."""
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
