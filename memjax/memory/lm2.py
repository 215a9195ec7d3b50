"""LM2 (Kang et al. 2025, "Large Memory Models", arXiv 2502.06049): a decoder layer with a gated memory bank.

One whole residual layer, registered as "lm2" (settings at `config.model.lm2`). With h = norm_m(E_attn):

    E_attn = x + Attention(norm_a x)                          causal self-attention with RoPE
    E_mem  = softmax(h W_Q (M W_K)^T / sqrt(d_h)) (M W_V)     H heads, tokens -> the N slots of M
    g_out  = sigmoid(E_mem W_out + b_out)
    y      = E_attn + g_out * (E_mem W_proj)
    out    = y + SwiGLU(norm_f y)

The memory bank M [B, N, K] has N slots of width K; N, K, d_model and the sequence length are independent
(the heads project between K and d_model). At a document start M = M0, a parameter initialised
identity-like: row i = slot_init_scale * e_{i mod K} (the paper initialises every slot to the identity).

Writes are strictly causal. A call's tokens form segments of `segment` tokens (the last may be partial,
padded and never written). Tokens of segment n read M_n, the memory after the writes of segments < n
(segment 0 reads M0 or the carried memory); after segment n is complete:

    U_n      = softmax(M_n W_q^s (h W_k^s)^T / sqrt(d_h)) (h W_v^s) W_u      [B, N, K], over its S tokens
    g_in     = sigmoid(U_n W_in + b_in),   g_forget = sigmoid(U_n W_forget + b_forget)   per slot and channel
    M_{n+1}  = g_in * tanh(U_n) + g_forget * M_n

Deviations from the paper, and why:
- The paper writes g_in = sigmoid(E W_in), g_forget = sigmoid(E_mem W_forget), M' = g_in tanh(E_mem) +
  g_forget M with per-token E, E_mem [T, d] against a bank [N, d]: the shapes only meet after a reduction
  over tokens, which the reference code takes as a mean over the whole current sequence, so every
  position reads a memory written from later tokens. Here each slot summarises one finished segment
  (U_n: the paper's cross-attention turned around, slots as queries), and the gates are functions of
  U_n: causal, and shape-consistent for any N, K, d_model.
- The write reads h (the layer's attention output, before the memory read), so the recurrence over
  segments carries only M (a lax.scan) and the reads of all segments run in parallel after it.
- W_proj (heads -> d_model) and the gate biases are additions: the paper adds E_mem directly (its slot
  width is d_model). Within a segment, tokens see each other through the self-attention only.

State (see memjax.models.registry):
- None: independent sequences, the memory starts at M0.
- `init_state(B, max_len, dtype)`: decoding and prompts: {"attention": KV cache and position index,
  "memory": the memory the pending segment reads, "pending": [B, segment, d_model] h of the pending
  segment's tokens (the first index % segment are valid)}. Any split into calls, one token at a time
  included, gives the outputs of one call.
- `init_carry(B, dtype)`: segment recurrence (memjax.segments): {"memory": M} only; the attention sees
  each call alone and every call starts a segment, so train.seq_len must be a multiple of `segment`
  (checked by `validate` when train.segments_per_step > 0): a partial tail would never be written.

Logical axes: the block's own (`axis_rules`) "lm2_slots" (N; only M0 has it: a state's initial value, not
a matmul weight, so it is a state axis and M0 is never weight-decayed), "lm2_width" (K), "lm2_width_out"
(K on the output side of the K x K gate kernels), and the shared "embed", "heads", "head_dim", "qkv", "mlp".

Diagnostics (`eval_metrics`): memory/layer<i>/lm2_out_gate (mean g_out over tokens), lm2_in_gate and
lm2_forget_gate (means over the written segments).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.models import layers, sublayers
from memjax.models.diagnostics import batch_mean, capture
from memjax.models.registry import Block, register


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


@register("lm2")
class LM2Block(Block):
    # M0's slots whole, its width over fsdp like every weight's model-width dimension (all-gathered at use).
    # The square gate matrices split over fsdp only: split over fsdp x tensor, XLA partitions the write
    # scan wrongly on a mesh with data, fsdp and tensor all > 1 (their gradients came out ~100% off;
    # tests/test_sharding.py catches it).
    axis_rules = {"lm2_slots": None, "lm2_width": "fsdp", "lm2_width_out": None}
    state_axes = frozenset({"lm2_slots"})
    defaults: dict = {
        "slots": 16,  # N memory slots
        "slot_width": 64,  # K, the width of a slot (independent of d_model)
        "heads": 4,  # heads of the read and write cross-attention (each d_model / heads wide)
        "segment": 64,  # tokens per write: a segment reads the memory written before it
        "slot_init_scale": 1.0,  # M0 row i = scale * e_{i mod slot_width}
        "out_gate_init": 0.5,  # g_out, g_in, g_forget at initialisation (their biases)
        "in_gate_init": 0.5,
        "forget_gate_init": 0.5,
    }

    def __init__(self, cfg, layer_index: int, *, shared=None, rngs: nnx.Rngs):
        p = cfg[self.block_name]
        d, h, n, k = cfg.d_model, p.heads, p.slots, p.slot_width
        dh = d // h
        dtype = jnp.dtype(cfg.dtype)
        std, out_std = cfg.init_std, sublayers.output_std(cfg)
        self.segment, self.d_model, self.dtype = p.segment, d, dtype

        def dense(in_shape, out_shape, axes, scale=std):
            return layers.Dense(in_shape, out_shape, axes, std=scale, dtype=dtype, rngs=rngs)

        def bias(size, value, axis):
            return nnx.Param(jnp.full((size,), value, jnp.float32), logical_axes=(axis,))

        self.attn_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.attention = sublayers.Attention(cfg, rngs=rngs)
        self.memory_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        # M0 in float32 whatever the compute dtype; identity-like rows, as the paper's identity slots.
        eye_NxK = jax.nn.one_hot(jnp.arange(n) % k, k, dtype=jnp.float32)
        self.initial_memory = nnx.Param(p.slot_init_scale * eye_NxK, logical_axes=("lm2_slots", "lm2_width"),
                                        decay=False)
        # Read: tokens -> slots.
        self.read_query = dense((d,), (h, dh), ("embed", "heads", "head_dim"))
        self.read_key = dense((k,), (h, dh), ("lm2_width", "heads", "head_dim"))
        self.read_value = dense((k,), (h, dh), ("lm2_width", "heads", "head_dim"))
        self.read_out = dense((h, dh), (d,), ("heads", "head_dim", "embed"), out_std)
        self.out_gate = dense((h, dh), (d,), ("heads", "head_dim", "embed"))
        self.out_bias = bias(d, _logit(p.out_gate_init), "embed")
        # Write: slots -> a finished segment's tokens.
        self.write_query = dense((k,), (h, dh), ("lm2_width", "heads", "head_dim"))
        self.write_key = dense((d,), (h, dh), ("embed", "heads", "head_dim"))
        self.write_value = dense((d,), (h, dh), ("embed", "heads", "head_dim"))
        self.write_out = dense((h, dh), (k,), ("heads", "head_dim", "lm2_width"))
        self.in_gate = dense((k,), (k,), ("lm2_width", "lm2_width_out"))
        self.in_bias = bias(k, _logit(p.in_gate_init), "lm2_width")
        self.forget_gate = dense((k,), (k,), ("lm2_width", "lm2_width_out"))
        self.forget_bias = bias(k, _logit(p.forget_gate_init), "lm2_width")
        self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = sublayers.feed_forward(cfg, rngs=rngs)
        self.record = False  # set by diagnostics only: sown values would otherwise be written every step

    # --- state ----------------------------------------------------------------------------------

    @staticmethod
    def memory_dtype(dtype):
        # The recurrence runs for a whole document: never below float32.
        return jnp.promote_types(dtype, jnp.float32)

    def init_carry(self, batch_size: int, dtype) -> dict[str, jax.Array]:
        m0_NxK = self.initial_memory[...].astype(self.memory_dtype(dtype))
        return {"memory": jnp.broadcast_to(m0_NxK, (batch_size, *m0_NxK.shape))}

    def init_state(self, batch_size: int, max_len: int, dtype) -> dict:
        return {
            "attention": self.attention.init_state(batch_size, max_len, dtype),
            "memory": self.init_carry(batch_size, dtype)["memory"],
            "pending": jnp.zeros((batch_size, self.segment, self.d_model), dtype),
        }

    # --- the layer ------------------------------------------------------------------------------

    def __call__(self, x_BxTxD, state=None):
        decoding = state is not None and "attention" in state
        attended_BxTxD, attn_state = self.attention(self.attn_norm(x_BxTxD), state["attention"] if decoding else None)
        e_attn_BxTxD = x_BxTxD + attended_BxTxD
        h_BxTxD = self.memory_norm(e_attn_BxTxD)
        batch, seq, d = h_BxTxD.shape
        s = self.segment
        if decoding:
            # The pending segment's earlier tokens go first: the buffer starts at a segment boundary.
            offset = state["attention"]["index"] % s
            length = s * (1 + -(-seq // s))
            buffer_BxLxD = jnp.zeros((batch, length, d), h_BxTxD.dtype)
            buffer_BxLxD = buffer_BxLxD.at[:, :s].set(state["pending"].astype(h_BxTxD.dtype))
            buffer_BxLxD = jax.lax.dynamic_update_slice_in_dim(buffer_BxLxD, h_BxTxD, offset, axis=1)
            memory_BxNxK = state["memory"]
        else:
            offset = 0
            buffer_BxLxD = jnp.pad(h_BxTxD, ((0, 0), (0, s * -(-seq // s) - seq), (0, 0)))
            memory_BxNxK = (self.init_carry(batch, h_BxTxD.dtype) if state is None else state)["memory"]
        valid = offset + seq
        e_mem_BxLxHxK, memory_BxNxK, gates = self._segments(buffer_BxLxD, valid, memory_BxNxK)
        e_mem_BxTxHxK = jax.lax.dynamic_slice_in_dim(e_mem_BxLxHxK, offset, seq, axis=1)
        g_out_BxTxD = jax.nn.sigmoid(self.out_gate(e_mem_BxTxHxK) + self.out_bias[...])
        y_BxTxD = e_attn_BxTxD + (g_out_BxTxD * self.read_out(e_mem_BxTxHxK)).astype(e_attn_BxTxD.dtype)
        out_BxTxD = y_BxTxD + self.mlp(self.mlp_norm(y_BxTxD))
        if self.record:
            self.sow(nnx.Intermediate, "lm2_out_gate", jnp.mean(g_out_BxTxD.astype(jnp.float32)))
            written = jnp.sum(gates["complete"])
            for name in ("lm2_in_gate", "lm2_forget_gate"):
                mean = jnp.sum(jnp.where(gates["complete"], gates[name], 0.0)) / jnp.maximum(written, 1)
                self.sow(nnx.Intermediate, name, jnp.where(written > 0, mean, jnp.nan))
        if state is None:
            return out_BxTxD, None
        if not decoding:
            return out_BxTxD, {"memory": memory_BxNxK}
        pending_BxSxD = jax.lax.dynamic_slice_in_dim(buffer_BxLxD, (valid // s) * s, s, axis=1)
        return out_BxTxD, {"attention": attn_state, "memory": memory_BxNxK,
                           "pending": pending_BxSxD.astype(state["pending"].dtype)}

    def _segments(self, h_BxLxD, valid, memory_BxNxK):
        """Writes then reads over a buffer of whole segments whose first `valid` tokens are real.

        Returns E_mem [B, L, H, dh] (token t reads the memory of its segment's start), the memory after
        the complete segments (the one the next token reads) and per-segment gate means."""
        batch, length, _ = h_BxLxD.shape
        s = self.segment
        num = length // s

        def segments(x):  # [B, L, ...] -> [num, B, S, ...]
            return jnp.moveaxis(x.reshape(batch, num, s, *x.shape[2:]), 1, 0)

        complete_n = (jnp.arange(num) + 1) * s <= valid
        all_slots = jnp.ones((batch, memory_BxNxK.shape[1], s), bool)

        def write(m_BxNxK, inputs):
            k_BxSxHxK, v_BxSxHxK, complete = inputs
            # Only complete segments are written, so every key is a real token: no mask needed.
            summary_BxNxHxK = layers.attend(self.write_query(m_BxNxK), k_BxSxHxK, v_BxSxHxK, all_slots)
            u_BxNxK = self.write_out(summary_BxNxHxK).astype(m_BxNxK.dtype)
            g_in_BxNxK = jax.nn.sigmoid(self.in_gate(u_BxNxK) + self.in_bias[...]).astype(m_BxNxK.dtype)
            g_forget_BxNxK = jax.nn.sigmoid(self.forget_gate(u_BxNxK) + self.forget_bias[...]).astype(m_BxNxK.dtype)
            new_BxNxK = g_in_BxNxK * jnp.tanh(u_BxNxK) + g_forget_BxNxK * m_BxNxK
            means = (jnp.mean(g_in_BxNxK.astype(jnp.float32)), jnp.mean(g_forget_BxNxK.astype(jnp.float32)))
            return jnp.where(complete, new_BxNxK, m_BxNxK), (m_BxNxK, *means)

        keys = segments(self.write_key(h_BxLxD))
        values = segments(self.write_value(h_BxLxD))
        memory_BxNxK, (read_nxBxNxK, g_in_n, g_forget_n) = jax.lax.scan(write, memory_BxNxK, (keys, values, complete_n))

        # Every segment's read at once: segments fold into the batch.
        fold = lambda x: x.reshape(num * batch, *x.shape[2:])
        q = fold(segments(self.read_query(h_BxLxD)))
        k, v = fold(self.read_key(read_nxBxNxK)), fold(self.read_value(read_nxBxNxK))
        e_mem = layers.attend(q, k, v, jnp.ones((num * batch, s, k.shape[1]), bool))
        e_mem = jnp.moveaxis(e_mem.reshape(num, batch, *e_mem.shape[1:]), 0, 1)
        gates = {"complete": complete_n, "lm2_in_gate": g_in_n, "lm2_forget_gate": g_forget_n}
        return e_mem.reshape(batch, length, *e_mem.shape[3:]), memory_BxNxK, gates

    # --- protocol -------------------------------------------------------------------------------

    @classmethod
    def validate(cls, cfg, require) -> None:
        name = cls.block_name
        p, d, t = cfg.model[name], cfg.model.d_model, cfg.train
        field = f"model.{name}"
        require(p.slots > 0, f"{field}.slots", f"must be positive, got {p.slots}")
        require(p.slot_width > 0, f"{field}.slot_width", f"must be positive, got {p.slot_width}")
        require(p.heads > 0 and d % p.heads == 0, f"{field}.heads", f"{p.heads} heads do not divide model.d_model={d}")
        require(p.segment > 0, f"{field}.segment", f"must be positive, got {p.segment}")
        require(p.segment <= t.seq_len, f"{field}.segment",
                f"{p.segment} exceeds train.seq_len={t.seq_len}: no segment would complete, nothing would be written")
        if t.segments_per_step > 0:
            require(t.seq_len % p.segment == 0, f"{field}.segment",
                    f"{p.segment} must divide train.seq_len={t.seq_len} with train.segments_per_step > 0 (the "
                    "carried memory holds complete segments only: a partial tail would never be written)")
        require(p.slot_init_scale > 0, f"{field}.slot_init_scale", f"must be positive, got {p.slot_init_scale}")
        for gate in ("out_gate_init", "in_gate_init", "forget_gate_init"):
            require(0 < p[gate] < 1, f"{field}.{gate}", f"must lie in (0, 1), got {p[gate]}")

    @classmethod
    def flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """Attention scores over the sequence (12 x d_model per key, as the attention blocks), the read
        (each token against N slots) and the write (N slots against each segment's tokens), and the
        slot-side projections' excess over the caller's 6 x parameters: they multiply N slot rows per
        segment, not one row per token."""
        p, d = model_cfg[cls.block_name], model_cfg.d_model
        n, k, s = p.slots, p.slot_width, p.segment
        padded = s * -(-seq_len // s)
        read = 12.0 * d * n
        write = 12.0 * d * n * padded / seq_len
        slot_params = 3 * k * d + d * k + 2 * k * k  # W_K, W_V, W_q^s; W_u; W_in, W_forget
        slot_rows_per_token = n * (padded // s) / seq_len
        return 12.0 * d * seq_len + read + write + 6.0 * slot_params * (slot_rows_per_token - 1.0)

    @staticmethod
    def eval_metrics(graphdef, params, batches) -> dict[str, float]:
        return gate_diagnostics(graphdef, params, batches)


GATES = ("lm2_out_gate", "lm2_in_gate", "lm2_forget_gate")


def lm2_layers(model) -> list[tuple[int, LM2Block]]:
    return [(i, block) for i, block in enumerate(model.blocks) if isinstance(block, LM2Block)]


def _switch_on_recording(model) -> None:
    for _, block in lm2_layers(model):
        block.record = True


def _captured_gates(graphdef, params, inputs_BxT) -> dict:
    """One batch's {memory/layer<i>/<gate>: mean} of every LM2 layer."""
    model, captured = capture(graphdef, params, inputs_BxT, _switch_on_recording)
    return {f"memory/layer{i}/{g}": jnp.mean(jnp.stack(list(captured["blocks"][i][g])))
            for i, _ in lm2_layers(model) for g in GATES}


def gate_diagnostics(graphdef, params, batches) -> dict[str, float]:
    """Per LM2 layer, averaged over evaluation batches: the mean output, input and forget gates."""
    return batch_mean(_captured_gates, graphdef, params, batches)


__all__ = ["LM2Block", "gate_diagnostics", "lm2_layers"]
