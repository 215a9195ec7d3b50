"""Titans (Behrouz et al. 2025, arXiv 2501.00663): the neural memory as a layer and its hybrids.

One block class, registered under several names whose settings (`config.model.<name>`) differ only in
their defaults; `hybrid` picks the architecture, so any engine configuration can be used in any of them:

- "none" (titans_lmm): x + Memory(norm x), then the SwiGLU FFN.
- "mag" (titans_mag): one branch is sliding-window attention with persistent tokens as an always
  visible prefix, the other the memory; out = W_o(RMSNorm(attn) * sigmoid(RMSNorm(mem))), then the FFN.
- "mal" (titans_mal): x + Memory(norm x), then x + SWA(norm x), then the FFN.
- "mac" (titans_mac): the sequence in segments of `segment` tokens. Per segment, r_t = M_s(q_t) reads
  the memory as it was at the segment start (a projection of it gives one retrieved token per input
  token); attention over [persistent | r_<=t | x_<=t] gives y_t (causal: the paper lets token t see the
  whole segment's retrieved tokens, which would leak later inputs into a language model); the memory
  is written with y and read at y_t after the write, m_t; out = W_o(RMSNorm(y) * sigmoid(RMSNorm(m))).
  The memory's chunk grid starts with its persistent tokens, so where `persistent_tokens % chunk` != 0
  that many tokens before each segment start are pending (an incomplete chunk): M_s is the memory after
  its last complete chunk, and the pending tokens are written with the segment's first chunk of the grid,
  in one call (training, evaluation) as in decoding.

Persistent tokens (`persistent_tokens`) are learned: in attention, key/value pairs projected from learned
inputs by the layer's own W_K, W_V (no RoPE: they have no position); in the memory, learned inputs
written at the start of each sequence (see memjax.memory.neural).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels import dispatch
from memjax.kernels.neural_memory import api as neural_memory
from memjax.kernels.neural_memory import engine
from memjax.memory import neural
from memjax.models import layers, sublayers
from memjax.models.diagnostics import batch_mean, capture
from memjax.models.registry import Block, register

HYBRIDS = ("none", "mag", "mal", "mac")


class NeuralMemoryBlock(Block):
    """A residual layer built around the neural memory; see the module docstring for `hybrid`."""

    axis_rules = {
        "conv": None,
        "gates": None,
        "branch": None,
        "persistent": None,
        "feature_degree": None,
        # The memory's initial weights per head: heads over `tensor` (the whole memory recurrence of a
        # head then stays on its devices), each head's matrix whole.
        "memory_in": None,
        "memory_out": None,
    }
    # The memory's initial weights start a recurrence (their per-token work: neural.flops_per_token);
    # persistent tokens are inputs.
    state_axes = frozenset({"memory_in", "persistent"})

    defaults: dict = {
        "hybrid": "none",  # one of HYBRIDS
        "heads": 4,  # memory heads (each of width d_model / heads)
        # The engine's choices (memjax.kernels.neural_memory.engine): memory architecture, ...
        "memory": "mlp",  # "mlp" (memory_depth linear maps) or "gated": W1(s(W2 x) * W3 x)
        "memory_depth": 2,  # linear maps in the memory MLP; 1 = linear memory
        "memory_expansion": 4,  # hidden width / head width
        "activation": "gelu",  # exact GELU or SiLU inside the memory
        "memory_residual": "none",  # "add": x + f(x); "norm": x + LN(f(x))
        # ... inner objective ...
        "objective": "l2",  # "l2", "lp" (Moneta), "huber" (Yaad, data-dependent threshold), "dot" (Hebbian)
        "p_norm": 3.0,  # exponent of "lp"
        "omega_window": 1,  # Omega rule: the inner loss sums the last c tokens (gated by gamma); 1 = online
        # ... inner optimizer, retention and feature map.
        "optimizer": "momentum",  # "gd", "momentum" (Titans) or "muon" (momentum, then Newton-Schulz: ATLAS)
        "ns_steps": 5,  # Newton-Schulz iterations of "muon"
        # "gram": on the Gram matrix of each token's update, from the chunk's gradient factors (4x fewer FLOPs
        # at ATLAS's widths; float32 rounding grows as eps / sigma_min^2); "matrix": on the formed update
        "ns_form": "gram",
        "retention": "decay",  # "decay" (1 - alpha), "qnorm" (Moneta), "softmax" (Memora's KL retention)
        "q_norm": 4.0,  # exponent of "qnorm"
        "feature_degree": 0,  # polynomial feature map on q, k of this degree (0 = identity)
        "feature_learnable": True,  # its coefficients are parameters (else fixed at the truncated exp kernel)
        "read": "after",  # y_t = M_t(q_t) ("after" the token's write) or M_{t-1}(q_t) ("before")
        "chunk": 16,  # tokens per chunk: inner gradients are taken at the chunk-start state
        "remat_chunks": 4,  # chunks per rematerialisation group (one stored state per group)
        # The chunk scan's implementation (memjax.kernels.neural_memory): "auto" (the Pallas kernel on TPU /
        # GPU where it supports the configuration, else the pure-JAX reference, with a warning), "reference"
        # or "pallas" (an error where unsupported; interpret mode on CPU).
        "kernel": "auto",
        "conv_kernel": 4,  # causal depthwise conv on q, k, v; 0 = none
        "theta_max": 1.0,  # step size theta = theta_max * sigmoid(.)
        "theta_init": 0.1,  # gate values at initialisation (their biases)
        "eta_init": 0.9,
        "alpha_init": 0.01,
        "gamma_init": 0.9,  # Omega window weights
        "delta_init": 1.0,  # Huber threshold
        "persistent_tokens": 0,
        "window": 128,  # sliding-window attention of mag / mal
        "segment": 64,  # segment length of mac (a multiple of chunk)
    }

    def __init__(self, cfg, layer_index: int, *, shared=None, rngs: nnx.Rngs):
        p = cfg[self.block_name]
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        self.hybrid, self.eps = p.hybrid, cfg.norm_eps
        self.memory_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.memory = neural.NeuralMemory(p, cfg, rngs=rngs)
        if p.hybrid in ("mag", "mal", "mac"):
            window = p.window if p.hybrid != "mac" else 0
            self.attention = sublayers.Attention(cfg, window=window, persistent=p.persistent_tokens, rngs=rngs)
        if p.hybrid == "mal":
            self.attention_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        if p.hybrid in ("mag", "mac"):
            # Two norm scales stacked, not a matrix: never decayed.
            self.branch_norms = nnx.Param(jnp.ones((2, d), jnp.float32), logical_axes=("branch", "embed"), decay=False)
            self.mix = layers.Dense((d,), (d,), ("embed", "embed_out"), std=sublayers.output_std(cfg), dtype=dtype,
                                    rngs=rngs)
        if p.hybrid == "mac":
            h, dh = p.heads, d // p.heads
            self.segment = p.segment
            self.retrieve_query = layers.Dense((d,), (h, dh), ("embed", "heads", "head_dim"), std=cfg.init_std,
                                               dtype=dtype, rngs=rngs)
            self.retrieve_out = layers.Dense((h, dh), (d,), ("heads", "head_dim", "embed"), std=cfg.init_std,
                                             dtype=dtype, rngs=rngs)
        self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = sublayers.feed_forward(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int, dtype) -> dict:
        state = {"memory": self.memory.init_state(batch_size)}
        if self.hybrid in ("mag", "mal"):
            state["attention"] = self.attention.init_state(batch_size, max_len, dtype)
        if self.hybrid == "mac":
            # The KV cache of one segment: slots [0, s) hold its retrieved tokens, [s, 2s) its inputs.
            state.update(self.attention.init_state(batch_size, 2 * self.segment, dtype))
            state["segment_memory"] = state["memory"]["memory"]
        return state

    def init_carry(self, batch_size: int, dtype) -> dict:
        """Segment recurrence carries the memory alone: attention (MAG / MAL / MAC) sees each segment."""
        return {"memory": self.memory.init_state(batch_size)}

    def gate(self, attended_BxTxD, memory_BxTxD) -> tuple[jax.Array, jax.Array]:
        """W_o(RMSNorm(attention) * sigmoid(RMSNorm(memory))): the memory gates the attention.
        Returns the output and the gate's mean (a diagnostic)."""
        scales = self.branch_norms[...]
        a = layers.rms_normalize(attended_BxTxD, self.eps) * scales[0]
        g = jax.nn.sigmoid(layers.rms_normalize(memory_BxTxD, self.eps) * scales[1])
        return self.mix((a * g).astype(attended_BxTxD.dtype)).astype(attended_BxTxD.dtype), jnp.mean(g)

    def __call__(self, x_BxTxD, state=None):
        new_state = None if state is None else dict(state)
        mem_state = None if state is None else state["memory"]
        if self.hybrid == "mac":
            out, new_state = self._mac(x_BxTxD, state)
            x_BxTxD = x_BxTxD + out
        elif self.hybrid == "mag":
            h = self.memory_norm(x_BxTxD)
            attended, attn_state = self.attention(h, None if state is None else state.get("attention"))
            remembered, mem_state = self.memory(h, mem_state)
            gated, gate_mean = self.gate(attended, remembered)
            x_BxTxD = x_BxTxD + gated
            if self.memory.record:
                self.sow(nnx.Intermediate, "gate", gate_mean)
            if state is not None:
                new_state["memory"] = mem_state
                if attn_state is not None:
                    new_state["attention"] = attn_state
        else:
            remembered, mem_state = self.memory(self.memory_norm(x_BxTxD), mem_state)
            x_BxTxD = x_BxTxD + remembered
            if state is not None:
                new_state["memory"] = mem_state
            if self.hybrid == "mal":
                attended, attn_state = self.attention(self.attention_norm(x_BxTxD),
                                                      None if state is None else state.get("attention"))
                x_BxTxD = x_BxTxD + attended
                if attn_state is not None:
                    new_state["attention"] = attn_state
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return x_BxTxD, new_state

    # --- memory as context ----------------------------------------------------------------------

    def retrieve(self, h_BxTxD, memory_state) -> jax.Array:
        """Tokens read from a fixed memory state (per sequence and head) at queries from h."""
        spec, inner = self.memory.spec, self.memory.inner_dtype(h_BxTxD)
        q = neural.l2_normalize(self.retrieve_query(h_BxTxD).astype(inner), self.eps)
        q = self.memory.features(q)

        def read(state, x):
            return engine.apply_fixed(spec, engine.effective_weights(spec, state), x)

        read = jax.vmap(jax.vmap(read, in_axes=(0, 1), out_axes=1))
        return self.retrieve_out(read(memory_state, q).astype(h_BxTxD.dtype))

    def _mac(self, x_BxTxD, state):
        """Segment-parallel from an empty (or carried, state={"memory"}) memory; token by token with
        a decoding state (init_state)."""
        h = self.memory_norm(x_BxTxD)
        if state is not None and "k" in state:
            return self._mac_carried(h, state)
        batch, t, d = h.shape
        s = self.segment
        n = -(-t // s)
        segments = jnp.moveaxis(jnp.pad(h, ((0, 0), (0, n * s - t), (0, 0))).reshape(batch, n, s, d), 1, 0)
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (batch, s))
        causal = layers.attention_mask(pos, pos, 0)
        mask = jnp.concatenate([causal, causal], axis=-1)  # [r_<=t | x_<=t]
        # The persistent tokens leave persistent % chunk of them pending in the memory, and every segment
        # (a multiple of the chunk) leaves as many: each write must take them in, or the chunk grid shifts
        # away from decoding's. Only without pending tokens may the cheaper aligned write (one chunk less
        # per segment) be used.
        aligned = self.memory.num_persistent % self.memory.spec.chunk == 0

        def one_segment(mem_state, h_seg):
            retrieved = self.retrieve(h_seg, mem_state["memory"])
            q, k_h, v_h = self.attention.project(h_seg, pos)
            _, k_r, v_r = self.attention.project(retrieved, pos)
            y = self.attention.attend(q, jnp.concatenate([k_r, k_h], 1), jnp.concatenate([v_r, v_h], 1), mask)
            remembered, mem_state, diagnostics = self.memory.forward(y, mem_state, aligned=aligned)
            gated, gate_mean = self.gate(y, remembered)
            return mem_state, (gated, gate_mean, diagnostics)

        if state is not None:
            mem_state = state["memory"]
        elif self.memory.num_persistent:
            mem_state = self.memory.init_state(batch, self.memory.inner_dtype(h))
        else:
            mem_state = self.memory.empty_state(batch, self.memory.inner_dtype(h))
        mem_state, (out, gate_mean, diagnostics) = jax.lax.scan(one_segment, mem_state, segments)
        if self.memory.record:  # sown here, outside the scan: one record averaged over segments
            self.memory.sow(nnx.Intermediate, "diagnostics", jax.tree_util.tree_map(jnp.mean, diagnostics))
            self.sow(nnx.Intermediate, "gate", jnp.mean(gate_mean))
        out = jnp.moveaxis(out, 0, 1).reshape(batch, n * s, d)[:, :t]
        return out, (None if state is None else {"memory": mem_state})

    def _mac_carried(self, h_BxTxD, state):
        """Token by token (decoding; prompts): the same outputs as the segment-parallel path."""
        batch, _, _ = h_BxTxD.shape
        s = self.segment

        def one_token(state, h_Bx1xD):
            i = state["index"] % s
            segment_memory = jax.tree_util.tree_map(
                lambda now, kept: jnp.where(i == 0, now, kept), state["memory"]["memory"], state["segment_memory"]
            )
            pos = jnp.broadcast_to(i, (batch, 1))
            retrieved = self.retrieve(h_Bx1xD, segment_memory)
            q, k_h, v_h = self.attention.project(h_Bx1xD, pos)
            _, k_r, v_r = self.attention.project(retrieved, pos)
            cache = sublayers.write_kv(sublayers.write_kv(state, k_r, v_r, i), k_h, v_h, s + i)
            slot = jnp.arange(2 * s) % s
            mask = jnp.broadcast_to(slot <= i, (batch, 1, 2 * s))
            y = self.attention.attend(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), mask)
            remembered, mem_state, _ = self.memory.forward(y, state["memory"])
            new = {"memory": mem_state, "segment_memory": segment_memory, "k": cache["k"], "v": cache["v"],
                   "index": state["index"] + 1}
            return new, self.gate(y, remembered)[0][:, 0]

        state, out = jax.lax.scan(one_token, state, jnp.moveaxis(h_BxTxD[:, :, None], 1, 0))
        return jnp.moveaxis(out, 0, 1), state

    # --- protocol -------------------------------------------------------------------------------

    @classmethod
    def validate(cls, cfg, require) -> None:
        name = cls.block_name
        p, d = cfg.model[name], cfg.model.d_model
        field = f"model.{name}"
        require(p.hybrid in HYBRIDS, f"{field}.hybrid", f"{p.hybrid!r} is not one of {list(HYBRIDS)}")
        require(p.heads > 0 and d % p.heads == 0, f"{field}.heads", f"{p.heads} heads do not divide model.d_model={d}")
        for key, options in (("memory", engine.MEMORIES), ("memory_residual", engine.RESIDUALS),
                             ("optimizer", engine.OPTIMIZERS), ("retention", engine.RETENTIONS)):
            require(p[key] in options, f"{field}.{key}", f"{p[key]!r} is not one of {list(options)}")
        require(p.memory_depth >= 1, f"{field}.memory_depth", f"must be >= 1, got {p.memory_depth}")
        require(p.omega_window >= 1, f"{field}.omega_window", f"must be >= 1, got {p.omega_window}")
        require(p.ns_steps >= 1, f"{field}.ns_steps", f"must be >= 1, got {p.ns_steps}")
        require(p.p_norm >= 1, f"{field}.p_norm", f"must be >= 1, got {p.p_norm}")
        require(p.q_norm >= 2, f"{field}.q_norm", f"must be >= 2, got {p.q_norm}")
        require(0 <= p.feature_degree <= 4, f"{field}.feature_degree",
                f"must lie in [0, 4] (phi's width grows as head_dim^degree), got {p.feature_degree}")
        require(0 < p.gamma_init < 1, f"{field}.gamma_init", f"must lie in (0, 1), got {p.gamma_init}")
        require(p.delta_init > 0, f"{field}.delta_init", f"must be positive, got {p.delta_init}")
        require(p.memory_expansion >= 1, f"{field}.memory_expansion", f"must be >= 1, got {p.memory_expansion}")
        require(p.activation in engine.ACTIVATIONS, f"{field}.activation",
                f"{p.activation!r} is not one of {sorted(engine.ACTIVATIONS)}")
        require(p.objective in engine.OBJECTIVES, f"{field}.objective",
                f"{p.objective!r} is not one of {list(engine.OBJECTIVES)}")
        require(p.read in engine.READS, f"{field}.read", f"{p.read!r} is not one of {list(engine.READS)}")
        require(p.ns_form in engine.NS_FORMS, f"{field}.ns_form",
                f"{p.ns_form!r} is not one of {list(engine.NS_FORMS)}")
        require(p.kernel in dispatch.KERNEL_CHOICES, f"{field}.kernel",
                f"{p.kernel!r} is not one of {list(dispatch.KERNEL_CHOICES)}")
        if p.kernel == "pallas":
            ok, why = neural_memory.spec_supported(neural.engine_spec(p, cfg.model.norm_eps))
            require(ok, f"{field}.kernel", f"'pallas' does not run this memory: {why}; use 'auto' or 'reference'")
        require(p.chunk >= 1, f"{field}.chunk", f"must be >= 1, got {p.chunk}")
        require(p.remat_chunks >= 1, f"{field}.remat_chunks", f"must be >= 1, got {p.remat_chunks}")
        require(p.conv_kernel >= 0, f"{field}.conv_kernel", f"must be >= 0, got {p.conv_kernel}")
        require(p.theta_max > 0, f"{field}.theta_max", f"must be positive, got {p.theta_max}")
        require(0 < p.theta_init < p.theta_max, f"{field}.theta_init", f"must lie in (0, theta_max={p.theta_max})")
        for gate in ("eta_init", "alpha_init"):
            require(0 < p[gate] < 1, f"{field}.{gate}", f"must lie in (0, 1), got {p[gate]}")
        require(p.persistent_tokens >= 0, f"{field}.persistent_tokens", "must be >= 0")
        if p.hybrid in ("mag", "mal"):
            require(0 < p.window <= cfg.train.seq_len, f"{field}.window",
                    f"must lie in [1, train.seq_len={cfg.train.seq_len}], got {p.window}")
        if p.hybrid == "mac":
            require(p.segment >= 1 and p.segment % p.chunk == 0, f"{field}.segment",
                    f"must be a positive multiple of {field}.chunk={p.chunk}, got {p.segment}")
            if cfg.train.segments_per_step:  # a padded tail segment would be written into the carried memory
                require(cfg.train.seq_len % p.segment == 0, f"{field}.segment",
                        f"must divide train.seq_len={cfg.train.seq_len} with train.segments_per_step > 0")
        if cfg.train.segments_per_step:
            # The carried memory's count of pending tokens (an incomplete chunk) is one for all lanes, which
            # advance in step; a lane reset at a document start takes the start's pending tokens, which
            # match that count only if every segment is whole chunks (else the lane misreads its pending
            # tokens: its document does not start afresh).
            require(cfg.train.seq_len % p.chunk == 0, f"{field}.chunk",
                    f"must divide train.seq_len={cfg.train.seq_len} with train.segments_per_step > 0, got {p.chunk}")

    @classmethod
    def flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """The memory's non-parameter work, plus attention scores over the keys each token sees
        (12 x d_model per key, as for the attention blocks)."""
        p = model_cfg[cls.block_name]
        total = neural.flops_per_token(p, model_cfg.d_model)
        if p.hybrid in ("mag", "mal"):
            total += 12.0 * model_cfg.d_model * (min(p.window, seq_len) + p.persistent_tokens)
        elif p.hybrid == "mac":
            total += 12.0 * model_cfg.d_model * (2 * min(p.segment, seq_len) + p.persistent_tokens)
        return total

    @staticmethod
    def eval_metrics(graphdef, params, batches) -> dict[str, float]:
        return memory_diagnostics(graphdef, params, batches)


def register_memory_block(name: str, **defaults):
    """Registers the block under `name` with these defaults (the rest: NeuralMemoryBlock.defaults)."""
    unknown = set(defaults) - set(NeuralMemoryBlock.defaults)
    if unknown:
        raise ValueError(f"{name}: unknown settings {sorted(unknown)}")
    settings = ", ".join(f"{k}={v}" for k, v in defaults.items())
    cls = type(name, (NeuralMemoryBlock,), {"defaults": {**NeuralMemoryBlock.defaults, **defaults},
                                            "__doc__": f"Neural-memory block {name}: {settings}."})
    return register(name)(cls)


# Inside a chunk every inner gradient is taken at the chunk-start weights and momentum sums them, so a
# chunk moves the memory by about theta * C^2 / 2 gradients: with theta up to 1 (the engine's default)
# the momentum memory of MAG / MAC is non-finite at initialisation already. theta <= 0.01 is also the
# usual maximum inner learning rate of public Titans code.
TITANS_STEP = {"theta_max": 0.01, "theta_init": 0.005}
TitansLMM = register_memory_block("titans_lmm", hybrid="none", **TITANS_STEP)
TitansMAG = register_memory_block("titans_mag", hybrid="mag", persistent_tokens=4, **TITANS_STEP)
TitansMAL = register_memory_block("titans_mal", hybrid="mal", persistent_tokens=4, **TITANS_STEP)
TitansMAC = register_memory_block("titans_mac", hybrid="mac", persistent_tokens=4, **TITANS_STEP)


def memory_layers(model) -> list[tuple[int, NeuralMemoryBlock]]:
    return [(i, block) for i, block in enumerate(model.blocks) if isinstance(block, NeuralMemoryBlock)]


def _switch_on_recording(model) -> None:
    for _, block in memory_layers(model):
        block.memory.record = True


def _captured_diagnostics(graphdef, params, inputs_BxT) -> dict:
    """One batch's {memory/layer<i>/<name>: mean} of every neural-memory layer."""
    model, captured = capture(graphdef, params, inputs_BxT, _switch_on_recording)
    out = {}
    for i, _ in memory_layers(model):
        block = captured["blocks"][i]
        values = {}
        for record in block.get("memory", {}).get("diagnostics", ()):
            for key, value in record.items():
                values.setdefault(key, []).append(value)
        if "gate" in block:
            values["gate"] = list(block["gate"])
        out.update({f"memory/layer{i}/{key}": jnp.mean(jnp.stack([jnp.mean(v) for v in vals]))
                    for key, vals in values.items()})
    return out


def memory_diagnostics(graphdef, params, batches) -> dict[str, float]:
    """Per neural-memory layer, averaged over evaluation batches: the inner loss on each chunk before and
    after its update, the mean gates (theta, eta, alpha; the MAG/MAC branch gate), and the norm of the
    memory weights after the batch."""
    return batch_mean(_captured_diagnostics, graphdef, params, batches)


__all__ = ["NeuralMemoryBlock", "memory_diagnostics", "HYBRIDS"]
