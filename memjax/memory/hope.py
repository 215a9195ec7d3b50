"""HOPE (Behrouz, Razaviyayn, Zhong, Mirrokni, "Nested Learning: The Illusion of Deep Learning Architectures",
NeurIPS 2025): a self-modifying Titans followed by a continuum memory system (CMS).

Block: x + SelfModifyingTitans(norm x), then for each CMS level l in order x + level_l(norm_l x).

Self-modifying Titans, per memory head (width dh) and token t, with x_t = the head's slice of x W_in:

  k_t = l2(M_k,t-1(x_t)),  v_t = l2(M_v,t-1(x_t)),  q_t = l2(M_q,t-1(x_t))
  eta_t = theta_max sigmoid(w_eta . M_eta,t-1(x_t) + b_eta)        (step size)
  alpha_t = 1 - sigmoid(w_alpha . M_alpha,t-1(x_t) + b_alpha)      (retention: the kept fraction)
  v_hat_[],t = M_[],t-1(v_t)                                        (self-generated values)
  M_[],t = alpha_t M_[],t-1 - eta_t grad 1/2 ||M_[],t-1(k_t) - v_hat_[],t||^2,  [] in {k, v, q, eta, alpha, memory}
  y_t = M_memory,t-1(q_t)   (`read`: "before", the paper's; "after": M_memory,t)

For a linear memory the update is M (alpha_t I - eta_t k_t k_t^T) + eta_t v_hat k_t^T: the paper's delta
gradient descent (DGD) with the l2 objective's gradient counted once; for the MLP memories it is the
gradient of that objective (memjax.kernels.neural_memory.engine, "gd" with decay retention).
out = W_o(RMSNorm(y) * SiLU(x W_g)) as in Titans (memjax.memory.neural).

Choices where the paper leaves them open (or where a language model needs one):
- Multi-head: a static W_in maps x to the heads; every memory is per head, dh -> dh, so that x_t, k_t and
  v_t share one space (the self-generated value M(v_t) needs it). The scalar gates read their memory's
  output through a learned vector (w_eta, w_alpha): the memories stay dh -> dh and are updated alike.
- `adaptive` picks the projection memories that learn in context (default all five); the others are
  static projections (their initial state, trained by the outer loop only). The main memory's own target
  is v_hat = M_memory(v_t) with `self_target`, else v_t (Titans).
- No short convolution: the paper's projections are the memories themselves.
- v_t is L2-normalised (`value_norm`), as k_t and q_t. With a self-generated value the update is not a
  contraction by itself: for M(x) = x + x W the step is W <- (alpha I - eta k^T (k - v)) W - eta k^T (k - v),
  whose factor has the eigenvalue alpha - eta (1 - v . k) along k: above 1 once eta (v . k - 1) exceeds
  the forgetting 1 - alpha, which an unnormalised v reaches (the memories grew geometrically: a quickstart
  run went non-finite at step 35). With ||v|| = 1, 0 <= 1 - v . k <= 2 and the eigenvalue stays in
  [alpha - 2 eta, alpha].
- Chunk-parallel training: in a chunk of `chunk` tokens every projection memory is read, and every
  self-generated value formed, at the chunk-start state (reading M_[],t-1 would need the chunk's own
  writes before its projections exist: a sequential dependence); the main memory is the engine's chunk
  (gradients at the chunk start, in-chunk decay exact). At chunk 1 this is the per-token recurrence above.
- Every memory has the paper's form x + W1 s(W2 x) by default (`*_residual` "add", GELU; hidden width:
  the head width for the projection memories, `memory_expansion` x it for the main memory);
  `projection_depth` = 1 makes the projections linear maps (what DGD is derived for).
- The self-generated values are not stopped in the outer gradient: the outer loop trains through them.

Continuum memory system (`cms_chunks`, e.g. "16,0"): a chain of SwiGLU MLPs, each of width
swiglu_width(d_model, d_ff) / levels (the chain has the FFN's parameters). A level with chunk 0 is static
(trained by the outer loop alone: the lowest frequency). A level with chunk C keeps its weights fixed
within each block of C tokens (from the sequence start) and, at the block's end, adds its accumulated
inner gradients: W <- W - sum_{i in block} lr_i grad 1/2 ||f_W(k_i) - v_i||^2, all at the block-start W.
Its inner objective: k_i = the level's (normalised) input, v_i = k_i W_v (a learned value map: the outer
loop learns what the level stores; an identity target would pull the MLP towards the identity and
double the residual stream), lr_i = cms_theta_max sigmoid(k_i w + b) / d_model (k_i is RMS-normalised:
||k_i||^2 = d_model, the scale of the inner loss's curvature). The carried state is the weights,
the gradient accumulated since the last block end and the position in the block: constant in size.

With `self_modifying` off the mixer is Titans' NeuralMemory with the titans_lmm settings overridden by
this block's shared ones (heads, chunk, memory, gates): HOPE with one static level is then Titans LMM
followed by its FFN (tests/test_hope.py compares it with the registered block).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from memjax.kernels.neural_memory import engine
from memjax.memory import neural
from memjax.memory.titans import NeuralMemoryBlock, TitansLMM
from memjax.models import layers, sublayers
from memjax.models.registry import Block, register

PROJECTIONS = ("k", "v", "q", "eta", "alpha")


def parse_levels(text: str) -> list[int]:
    """The CMS chunks of `cms_chunks` ("16,0"): one int >= 0 per level."""
    return [int(part) for part in text.split(",") if part.strip()]


def parse_adaptive(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def cms_width(model_cfg, levels: int) -> int:
    return -(-layers.swiglu_width(model_cfg.d_model, model_cfg.d_ff) // levels)


# ------------------------------------------------------------------------------------ self-modifying Titans


def memory_spec(p, eps: float) -> engine.Spec:
    return engine.Spec(memory="mlp", depth=p.memory_depth, expansion=p.memory_expansion, activation="gelu",
                       residual=p.memory_residual, objective="l2", optimizer="gd", retention="decay", read=p.read,
                       chunk=p.chunk, remat_chunks=p.remat_chunks, eps=eps)


def projection_spec(p, eps: float) -> engine.Spec:
    return engine.Spec(memory="mlp", depth=p.projection_depth, expansion=1, activation="gelu",
                       residual=p.projection_residual, objective="l2",
                       optimizer="gd", retention="decay", read="before", chunk=p.chunk, eps=eps)


def smt_chunk(mspec: engine.Spec, pspec: engine.Spec, adaptive, self_target: bool, value_norm: bool,
              theta_max: float, eps: float, proj, memory, momentum, readout, x_CxK) -> tuple:
    """One chunk of one head from the chunk-start states: (y [C, dh], new proj, memory, momentum).
    proj: {name: maps}; readout: {"eta" / "alpha": (w [dh], b [])}."""
    reads = {name: engine.apply_fixed(pspec, proj[name], x_CxK) for name in PROJECTIONS}
    k, q, v = neural.l2_normalize(reads["k"], eps), neural.l2_normalize(reads["q"], eps), reads["v"]
    v = neural.l2_normalize(v, eps) if value_norm else v
    gate = {name: reads[name] @ readout[name][0] + readout[name][1] for name in ("eta", "alpha")}
    lr, keep = theta_max * jax.nn.sigmoid(gate["eta"]), 1.0 - jax.nn.sigmoid(gate["alpha"])
    ones = jnp.ones_like(lr)
    streams = {"k": k, "lr": lr, "mom": jnp.zeros_like(lr), "keep": keep, "gamma": ones}
    new_proj = dict(proj)
    for name in adaptive:
        target = engine.apply_fixed(pspec, proj[name], v)
        zeros = [jnp.zeros_like(w) for w in proj[name]]
        new_proj[name], _ = engine.chunk_end_state(pspec, proj[name], zeros, {**streams, "v": target})
    target = engine.apply_fixed(mspec, memory, v) if self_target else v
    y, memory, momentum, _ = engine.chunk_step(mspec, memory, momentum, {**streams, "q": q, "v": target})
    return y, new_proj, memory, momentum


class SelfModifyingTitans(nnx.Module):
    def __init__(self, p, model_cfg, *, rngs: nnx.Rngs):
        d, h = model_cfg.d_model, p.heads
        dh = d // h
        dtype, std = jnp.dtype(model_cfg.dtype), model_cfg.init_std
        self.heads, self.head_dim, self.dtype, self.eps = h, dh, dtype, model_cfg.norm_eps
        self.mspec, self.pspec = memory_spec(p, model_cfg.norm_eps), projection_spec(p, model_cfg.norm_eps)
        self.adaptive, self.self_target, self.theta_max = parse_adaptive(p.adaptive), p.self_target, p.theta_max
        self.value_norm = p.value_norm
        self.project_in = layers.Dense((d,), (h, dh), ("embed", "heads", "head_dim"), std=std, dtype=dtype, rngs=rngs)
        # Initial states start recurrences (per sequence), not weights of the model's matmuls: no decay.
        self.projections = nnx.Dict({
            name: nnx.List([layers.param(rngs, (h, i, o), i**-0.5, ("heads", "memory_in", "memory_out"), decay=False)
                            for i, o in engine.layer_shapes(self.pspec, dh, dh)])
            for name in PROJECTIONS
        })
        self.readout = layers.param(rngs, (2, h, dh), dh**-0.5, ("gates", "heads", "head_dim"))
        logits = [math.log(p.theta_init / p.theta_max) - math.log1p(-p.theta_init / p.theta_max),
                  math.log(p.alpha_init) - math.log1p(-p.alpha_init)]
        self.gate_bias = nnx.Param(jnp.broadcast_to(jnp.asarray(logits, jnp.float32)[:, None], (2, h)),
                                   logical_axes=("gates", "heads"), decay=False)
        self.initial_state = nnx.List([
            layers.param(rngs, (h, i, o), i**-0.5, ("heads", "memory_in", "memory_out"), decay=False)
            for i, o in engine.layer_shapes(self.mspec, dh, dh)
        ])
        self.out_norm = nnx.Param(jnp.ones((h, dh), jnp.float32), logical_axes=("heads", "head_dim"), decay=False)
        self.out_gate = layers.Dense((d,), (h, dh), ("embed", "heads", "head_dim"), std=std, dtype=dtype, rngs=rngs)
        self.out = layers.Dense((h, dh), (d,), ("heads", "head_dim", "embed"), std=sublayers.output_std(model_cfg),
                                dtype=dtype, rngs=rngs)

    def inner_dtype(self, x) -> jnp.dtype:
        return jnp.promote_types(x.dtype, jnp.float32)

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        broadcast = lambda maps: [jnp.broadcast_to(a[...].astype(dtype), (batch_size, *a.shape)) for a in maps]
        memory = broadcast(self.initial_state)
        return {
            "proj": {name: broadcast(self.projections[name]) for name in PROJECTIONS},
            "memory": memory,
            "momentum": [jnp.zeros_like(a) for a in memory],
            "pending": jnp.zeros((batch_size, self.heads, self.mspec.chunk, self.head_dim), dtype),
            "count": jnp.zeros((), jnp.int32),
        }

    def __call__(self, x_BxTxD, state=None) -> tuple[jax.Array, dict | None]:
        inner = self.inner_dtype(x_BxTxD)
        carried = state is not None
        if not carried:
            state = self.init_state(x_BxTxD.shape[0], inner)
        x_BxHxTxK = jnp.moveaxis(self.project_in(x_BxTxD).astype(inner), 1, 2)
        t, c = x_BxTxD.shape[1], self.mspec.chunk
        count = state["count"] if carried else jnp.zeros((), jnp.int32)
        joined_BxHxSxK, n = join_pending(state["pending"], x_BxHxTxK, count, c)
        valid = count + t
        full_N = jnp.arange(1, n + 1) * c <= valid
        chunks = jnp.moveaxis(joined_BxHxSxK[:, :, : n * c].reshape(*x_BxHxTxK.shape[:2], n, c, -1), 2, 0)
        readout = {"eta": (self.readout[0], self.gate_bias[0]), "alpha": (self.readout[1], self.gate_bias[1])}
        readout = jax.tree_util.tree_map(lambda a: a[...].astype(inner), readout)
        step = partial(smt_chunk, self.mspec, self.pspec, self.adaptive, self.self_target, self.value_norm,
                       self.theta_max, self.eps)
        # Batch (everything), then heads (states, readout and inputs; the readout has no batch axis).
        step_h = jax.vmap(step, in_axes=(0, 0, 0, 0, 0))
        step_bh = jax.vmap(step_h, in_axes=(0, 0, 0, None, 0))

        def one_chunk(carry, inputs):
            x_BxHxCxK, full = inputs
            y, *new = step_bh(*carry, readout, x_BxHxCxK)
            return jax.tree_util.tree_map(lambda a, b: jnp.where(full, a, b), tuple(new), carry), y

        carry = (state["proj"], state["memory"], state["momentum"])
        group = engine.remat_group(self.mspec, n)

        @jax.checkpoint
        def one_group(carry, xs):
            return jax.lax.scan(one_chunk, carry, xs)

        grouped = jax.tree_util.tree_map(lambda a: a.reshape(n // group, group, *a.shape[1:]), (chunks, full_N))
        (proj, memory, momentum), y = jax.lax.scan(one_group, carry, grouped)
        y = jnp.moveaxis(y.reshape(n, *y.shape[2:]), 0, 2)  # [B, H, N, C, K]
        y_BxHxTxK = jax.lax.dynamic_slice_in_dim(y.reshape(*y.shape[:2], n * c, -1), count, t, axis=2)
        boundary = (valid // c) * c
        new_state = {"proj": proj, "memory": memory, "momentum": momentum, "count": valid % c,
                     "pending": jax.lax.dynamic_slice_in_dim(joined_BxHxSxK, boundary, c, axis=2)}
        y_BxTxHxK = layers.rms_normalize(jnp.moveaxis(y_BxHxTxK, 1, 2), self.eps) * self.out_norm[...]
        gated = y_BxTxHxK.astype(self.dtype) * jax.nn.silu(self.out_gate(x_BxTxD))
        return self.out(gated).astype(x_BxTxD.dtype), (new_state if carried else None)


def join_pending(pending_BxHxCxK, x_BxHxTxK, count, c: int) -> tuple[jax.Array, int]:
    """The `count` pending tokens, then this call's, zero-padded to N + 1 whole chunks (a spare chunk keeps
    the next pending slice in range): ([B, H, (N+1) C, K], N)."""
    t = x_BxHxTxK.shape[2]
    n = engine.num_chunks(c - 1 + t, c)
    slots = jnp.arange((n + 1) * c)
    source = jnp.where(slots < count, slots, c + slots - count)
    padded = jnp.concatenate([pending_BxHxCxK, x_BxHxTxK, jnp.zeros_like(pending_BxHxCxK[:, :, :1])], axis=2)
    source = jnp.where(source < c + t, source, c + t)  # past this call's tokens: the zero row
    return jnp.take(padded, source, axis=2), n


# -------------------------------------------------------------------------------- continuum memory system

CMS_SPEC = engine.Spec(memory="gated", activation="silu", residual="none", objective="l2", optimizer="gd")


class CMSLevel(nnx.Module):
    """One level: a SwiGLU MLP, static (chunk 0) or updated at the end of every block of `chunk` tokens."""

    def __init__(self, model_cfg, chunk: int, width: int, theta_max: float, theta_init: float, *, remat_blocks: int = 4,
                 rngs: nnx.Rngs):
        d, dtype = model_cfg.d_model, jnp.dtype(model_cfg.dtype)
        # The keys are RMS-normalised (squared norm d_model), so the step is per unit of their curvature.
        self.chunk, self.step_scale, self.remat_blocks = chunk, theta_max / d, remat_blocks
        self.norm = layers.RMSNorm(d, eps=model_cfg.norm_eps, dtype=dtype)
        self.mlp = layers.SwiGLU(d, width, std=model_cfg.init_std, out_std=sublayers.output_std(model_cfg),
                                 dtype=dtype, rngs=rngs)
        if chunk:
            self.value = layers.Dense((d,), (d,), ("embed", "embed_out"), std=model_cfg.init_std, dtype=dtype,
                                      rngs=rngs)
            self.lr_gate = layers.Dense((d,), (1,), ("embed", "gates"), std=model_cfg.init_std, dtype=dtype, rngs=rngs)
            logit = math.log(theta_init / theta_max) - math.log1p(-theta_init / theta_max)
            self.lr_bias = nnx.Param(jnp.full((1,), logit, jnp.float32), logical_axes=("gates",), decay=False)

    def weights(self, dtype) -> list[jax.Array]:
        return [self.mlp.gate.kernel[...].astype(dtype), self.mlp.up.kernel[...].astype(dtype),
                self.mlp.down.kernel[...].astype(dtype)]

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict | None:
        if not self.chunk:
            return None
        weights = [jnp.broadcast_to(w, (batch_size, *w.shape)) for w in self.weights(dtype)]
        return {"weights": weights, "grad": [jnp.zeros_like(w) for w in weights], "count": jnp.zeros((), jnp.int32)}

    def __call__(self, x_BxTxD, state=None) -> tuple[jax.Array, dict | None]:
        h_BxTxD = self.norm(x_BxTxD)
        if not self.chunk:
            return x_BxTxD + self.mlp(h_BxTxD), state
        inner = jnp.promote_types(x_BxTxD.dtype, jnp.float32)
        carried = state is not None
        if not carried:
            state = self.init_state(x_BxTxD.shape[0], inner)
        k = h_BxTxD.astype(inner)
        streams = {"k": k, "v": self.value(h_BxTxD).astype(inner),
                   "lr": self.step_scale * jax.nn.sigmoid((self.lr_gate(h_BxTxD) + self.lr_bias[...]).astype(inner))}
        y_BxTxD, new_state = cms_scan(self.chunk, state, streams, self.remat_blocks)
        return x_BxTxD + y_BxTxD.astype(x_BxTxD.dtype), (new_state if carried else None)


def cms_block(carry, block):
    """One block of C tokens (batch first): outputs at the block-start weights, the block's gradients added
    to the accumulator, which joins the weights where the block ends."""
    weights, grad = carry
    k, v, lr, ends = block["k"], block["v"], block["lr"], block["ends"]
    y = jax.vmap(partial(engine.apply_fixed, CMS_SPEC))(weights, k)
    inputs, deltas, _ = jax.vmap(partial(engine.gradient_factors, CMS_SPEC))(weights, k, v)
    grad = [g + jnp.einsum("bc,bci,bco->bio", -lr, h, dl) for g, h, dl in zip(grad, inputs, deltas)]
    new_weights = [jnp.where(ends, w + g, w) for w, g in zip(weights, grad)]
    new_grad = [jnp.where(ends, 0.0, g) for g in grad]
    return (new_weights, new_grad), y


def cms_scan(c: int, state, streams, remat_blocks: int = 4) -> tuple[jax.Array, dict]:
    """A level over a call's tokens [B, T, ...] from its state (weights, accumulated gradient, position in
    the block): the call is placed on the block grid by `count` leading empty slots (zero step size)."""
    count = state["count"]
    b, t = streams["k"].shape[:2]
    n = engine.num_chunks(c - 1 + t, c)
    slots = jnp.arange(n * c)
    source = jnp.clip(slots - count, 0, t - 1)
    inside = (slots >= count) & (slots < count + t)
    placed = {name: jnp.take(x, source, axis=1) for name, x in streams.items()}
    placed["lr"] = jnp.where(inside[None, :], placed["lr"][..., 0], 0.0)
    blocks = {name: jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0) for name, x in placed.items()}
    blocks["ends"] = jnp.arange(1, n + 1) * c <= count + t
    # Rematerialised in groups of blocks: the backward stores one (weights, accumulator) per group.
    group = engine.remat_group(engine.Spec(remat_chunks=remat_blocks), n)

    @jax.checkpoint
    def one_group(carry, xs):
        return jax.lax.scan(cms_block, carry, xs)

    grouped = jax.tree_util.tree_map(lambda a: a.reshape(n // group, group, *a.shape[1:]), blocks)
    (weights, grad), y = jax.lax.scan(one_group, (state["weights"], state["grad"]), grouped)
    y_BxSxD = jnp.moveaxis(y.reshape(n, *y.shape[2:]), 0, 1).reshape(b, n * c, -1)
    new_state = {"weights": weights, "grad": grad, "count": (count + t) % c}
    return jax.lax.dynamic_slice_in_dim(y_BxSxD, count, t, axis=1), new_state


# ------------------------------------------------------------------------------------------------ the block


def titans_settings(p) -> ml_collections.ConfigDict:
    """titans_lmm's settings with this block's shared ones: the mixer without self-modification."""
    keys = ("heads", "chunk", "remat_chunks", "memory_depth", "memory_expansion", "memory_residual", "read",
            "theta_max", "theta_init", "alpha_init")
    shared = {key: p[key] for key in keys}
    return ml_collections.ConfigDict({**TitansLMM.defaults, **shared})


@register("hope")
class HopeBlock(Block):
    """x + SelfModifyingTitans(norm x), then the CMS chain (see the module docstring)."""

    axis_rules = dict(NeuralMemoryBlock.axis_rules)  # the same parameter kinds, and Titans' without self-modification
    state_axes = NeuralMemoryBlock.state_axes

    defaults: dict = {
        "self_modifying": True,  # False: the mixer is Titans' NeuralMemory (titans_lmm's settings)
        "adaptive": "k,v,q,eta,alpha",  # projection memories updated in context (the rest stay static)
        "self_target": True,  # the main memory's value is M_memory(v_t) (else v_t)
        "value_norm": True,  # L2-normalise v_t as k_t and q_t (see the module docstring: stability)
        "heads": 4,
        "memory_depth": 2,  # the main memory's linear maps (engine MLP)
        "memory_expansion": 4,  # its hidden width / head width
        "memory_residual": "add",  # x + W1 s(W2 x), the paper's memory form ("none", "norm": engine.RESIDUALS)
        "projection_depth": 2,  # the projection memories' maps (1: linear), hidden width = head width
        "projection_residual": "add",
        "read": "before",  # y_t = M_t-1(q_t) (the paper's) or M_t(q_t) ("after")
        "chunk": 16,  # tokens per chunk of the self-modifying Titans (chunk-start reads and gradients)
        "remat_chunks": 4,  # chunks (and CMS blocks) per rematerialisation group: one stored state per group
        "theta_max": 0.1,  # eta_t = theta_max * sigmoid(.): no momentum, so a chunk moves <= theta_max * chunk
        "theta_init": 0.01,
        "alpha_init": 0.01,  # forgetting at initialisation (alpha_t above is 1 - this)
        "cms_chunks": "16,0",  # CMS levels in chain order: the chunk of each (0 = static)
        "cms_theta_max": 0.05,  # CMS levels' inner step size: lr = cms_theta_max * sigmoid(.) / d_model
        "cms_theta_init": 0.01,
    }

    def __init__(self, cfg, layer_index: int, *, shared=None, rngs: nnx.Rngs):
        p = cfg[self.block_name]
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        self.self_modifying = p.self_modifying
        self.memory_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        if p.self_modifying:
            self.memory = SelfModifyingTitans(p, cfg, rngs=rngs)
        else:
            self.memory = neural.NeuralMemory(titans_settings(p), cfg, rngs=rngs)
        chunks = parse_levels(p.cms_chunks)
        width = cms_width(cfg, len(chunks))
        self.levels = nnx.List([CMSLevel(cfg, c, width, p.cms_theta_max, p.cms_theta_init, remat_blocks=p.remat_chunks,
                                         rngs=rngs)
                                for c in chunks])

    def init_state(self, batch_size: int, max_len: int, dtype) -> dict:
        return self.init_carry(batch_size, dtype)

    def init_carry(self, batch_size: int, dtype) -> dict:
        return {"memory": self.memory.init_state(batch_size),
                "levels": [level.init_state(batch_size) for level in self.levels]}

    def __call__(self, x_BxTxD, state=None):
        remembered, mem_state = self.memory(self.memory_norm(x_BxTxD), None if state is None else state["memory"])
        x_BxTxD = x_BxTxD + remembered
        level_states = []
        for i, level in enumerate(self.levels):
            x_BxTxD, level_state = level(x_BxTxD, None if state is None else state["levels"][i])
            level_states.append(level_state)
        return x_BxTxD, (None if state is None else {"memory": mem_state, "levels": level_states})

    @classmethod
    def validate(cls, cfg, require) -> None:
        p, d = cfg.model[cls.block_name], cfg.model.d_model
        field = f"model.{cls.block_name}"
        require(p.heads > 0 and d % p.heads == 0, f"{field}.heads", f"{p.heads} heads do not divide model.d_model={d}")
        unknown = set(parse_adaptive(p.adaptive)) - set(PROJECTIONS)
        require(not unknown, f"{field}.adaptive", f"{sorted(unknown)} are not among {list(PROJECTIONS)}")
        for key in ("memory_depth", "memory_expansion", "projection_depth", "chunk", "remat_chunks"):
            require(p[key] >= 1, f"{field}.{key}", f"must be >= 1, got {p[key]}")
        for key in ("memory_residual", "projection_residual"):
            require(p[key] in engine.RESIDUALS, f"{field}.{key}", f"{p[key]!r} is not one of {list(engine.RESIDUALS)}")
        require(p.read in engine.READS, f"{field}.read", f"{p.read!r} is not one of {list(engine.READS)}")
        for key in ("theta", "cms_theta"):
            require(p[f"{key}_max"] > 0, f"{field}.{key}_max", f"must be positive, got {p[key + '_max']}")
            require(0 < p[f"{key}_init"] < p[f"{key}_max"], f"{field}.{key}_init",
                    f"must lie in (0, {key}_max={p[key + '_max']}), got {p[key + '_init']}")
        require(0 < p.alpha_init < 1, f"{field}.alpha_init", f"must lie in (0, 1), got {p.alpha_init}")
        try:
            chunks = parse_levels(p.cms_chunks)
        except ValueError:
            chunks = None
        require(chunks is not None and all(c >= 0 for c in chunks), f"{field}.cms_chunks",
                f"must be comma-separated chunk sizes >= 0 (0 = a static level), got {p.cms_chunks!r}")
        if cfg.train.segments_per_step:
            # The carried position in a chunk is one count for all lanes (as in the neural memory): a lane
            # reset at a document start matches it only if every segment is whole chunks.
            for key, values in (("chunk", [p.chunk]), ("cms_chunks", [c for c in chunks or [] if c])):
                require(all(cfg.train.seq_len % c == 0 for c in values), f"{field}.{key}",
                        f"must divide train.seq_len={cfg.train.seq_len} with train.segments_per_step > 0")

    @classmethod
    def flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """Training FLOPs (3 x forward) that are not parameter matmuls: the main memory's chunked algorithm,
        the projection memories (reads, self-generated values and chunk-end updates: 4 passes of their maps),
        and each in-context CMS level's inner gradient and update (3 passes of its 3 d x width maps)."""
        p = model_cfg[cls.block_name]
        if not p.self_modifying:
            return neural.flops_per_token(titans_settings(p), model_cfg.d_model)
        dh = model_cfg.d_model // p.heads
        mspec, pspec = memory_spec(p, 1e-6), projection_spec(p, 1e-6)
        main = engine.forward_flops_per_token(mspec, dh, dh) + (2.0 * sum(i * o for i, o in engine.layer_shapes(
            mspec, dh, dh)) if p.self_target else 0.0)
        projection = sum(2.0 * i * o for i, o in engine.layer_shapes(pspec, dh, dh))
        adaptive = len(parse_adaptive(p.adaptive))
        smt = p.heads * (main + projection * (len(PROJECTIONS) + 3 * adaptive))
        chunks = parse_levels(p.cms_chunks)
        width = cms_width(model_cfg, len(chunks))
        cms = sum(3 * 2.0 * 3 * model_cfg.d_model * width for c in chunks if c)
        return 3.0 * (smt + cms)


__all__ = ["HopeBlock", "SelfModifyingTitans", "CMSLevel", "smt_chunk", "cms_scan"]
