"""HMT, the Hierarchical Memory Transformer (He et al. 2024, arXiv 2405.06067), around any backbone decoder.

A call of T tokens is cut into segments of L = `model.hmt.segment_len` new tokens x_n. Per segment:

1. Representation encoding: the backbone on [T; s; T] (T a learned token), S_n = its last hidden state
   (after the final norm, before the head) at the final position. The summary input s is, by default
   (`causal=True`), the first j = L // 2 tokens of the PREVIOUS segment x_{n-1}; the paper (`causal=False`)
   uses x_n[:j], segment n's own first half, whose tokens then reach the logits of earlier positions of
   segment n through the recall (a leak for language modelling; kept for comparison).
2. Memory search: a = softmax(S_n W_q (M W_k)^T / sqrt(h)) over the valid cached memories M only,
   P_n = a M. With an empty cache (a document's first segment), or with `recall=False` (stage 1 of the
   paper's two-stage training), P_n = P_0, a learned vector.
3. Memory encoding: the backbone on [P_n; sensory; x_n; P_n]; the logits of the x_n positions are the
   output, the hidden state at the final position (after the final norm, as S_n) is the new memory M_n,
   appended to the cache (a shift buffer of the last N = `cache_size` memories, newest last, with a
   count of valid entries; the search's values are these raw memories). The sensory memory is the
   embeddings of the last k = `sensory_tokens` tokens before x_n; at a document start there are none and
   the k slots hold zero vectors (the backbone sees k zero embeddings: a fixed, input-independent prefix,
   not a masked-out one, so that every segment has one static shape).

`memory=False` drops both P_n tokens (and with them the search); with memory, sensory and recall off the
model is the backbone run on each segment independently. The backbone sees every pass alone (its blocks
get state None: no KV cache or block memory across segments, as in the paper); its parameters are shared
by both passes.

Carry between calls (constant size, batch on axis 0): "cache" [B, N, D] and "count" [B] (with memory),
"sensory" [B, k, D] (k > 0), "summary" [B, j, D] (causal variant with recall), all in the compute dtype.
Segments run through `memjax.segments.scan_segments`, with real truncation every `bptt_segments`.
A ragged last segment (T not a multiple of L) runs at its own length: nothing is padded, so no padding
can reach a valid output; a carry is only returned for whole segments (a call with a carry needs T a
multiple of L; decoding state handles partial segments).

Decoding (`init_states`): the carry plus the current segment's ids so far. Logits of a segment depend
only on the carry (earlier segments) and the segment's tokens up to the position (causal backbone), so
each new token re-runs the memory encoding of the current partial segment (its unfilled slots come after
the token and cannot affect it) and reads the logits at its position; when the segment is full, its
memory, sensory tokens and summary enter the carry. This equals the parallel call exactly and costs a
segment-length pass per token (correctness first). The paper variant reads the current segment's first
half before its first token is predicted, so it has no such decoding; `init_states` refuses it.

Deviations from the paper and its code (github.com/OswaldHe/HMT-pytorch): the causal summary (above);
L counts new tokens only (the reference's segment_length includes the memory and sensory slots);
scores always scale by 1/sqrt(h) (the reference uses 1/h when d, h >= 4096); BPTT truncation is real
(stop_gradient on the carry, the reference's is a no-op); every parameter exists whatever the switches,
so stage 2 (recall on) starts from a stage-1 checkpoint with `train.init_from`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax import segments
from memjax.models import diagnostics, layers, registry
from memjax.models.factory import count_matmul_params
from memjax.models.lm import DecoderLM


def backbone_hidden(backbone: DecoderLM, x_BxTxD) -> jax.Array:
    """The backbone on input embeddings: every block alone (state None), then the final norm."""
    for block in backbone.blocks:
        x_BxTxD, _ = block(x_BxTxD, None)
    return backbone.final_norm(x_BxTxD)


def backbone_logits(backbone: DecoderLM, h_BxTxD) -> jax.Array:
    """float32 logits of final-norm hidden states, as DecoderLM's head computes them."""
    if backbone.head is None:
        return backbone.embed.attend(h_BxTxD)
    return backbone.head(h_BxTxD).astype(jnp.float32)


@registry.register_wrapper("hmt")
class HMT(registry.Wrapper):
    defaults = {
        "enabled": False,
        "segment_len": 128,  # L: new tokens per segment; train.seq_len must be a multiple of it
        "sensory_tokens": 32,  # k: embeddings of the previous segment's last tokens prepended (0 = none)
        "cache_size": 32,  # N: memory embeddings kept for the recall
        "recall_dim": 256,  # h: width of the recall's query and key projections
        "memory": True,  # memory tokens P_n around each segment (needed by the recall)
        "recall": True,  # search the cache (stage 2); False: P_n is the learned P_0 (stage 1)
        "causal": True,  # summarise the previous segment; False: the paper's own first half (leaks)
        "bptt_segments": 0,  # gradients through at most this many segments of a call (0 = all)
    }
    axis_rules = {"hmt_recall": "tensor"}

    def __init__(self, model_cfg, vocab_size: int, *, rngs: nnx.Rngs):
        p = model_cfg.hmt
        d, std, dtype = model_cfg.d_model, model_cfg.init_std, jnp.dtype(model_cfg.dtype)
        self.backbone = DecoderLM(model_cfg, vocab_size, rngs=rngs)
        self.summary_token = layers.param(rngs, (d,), std, ("embed",))
        self.memory_init = layers.param(rngs, (d,), std, ("embed",))
        recall_axes = ("embed", "hmt_recall")
        self.recall_query = layers.Dense((d,), (p.recall_dim,), recall_axes, std=std, dtype=dtype, rngs=rngs)
        self.recall_key = layers.Dense((d,), (p.recall_dim,), recall_axes, std=std, dtype=dtype, rngs=rngs)
        self.segment_len, self.sensory, self.cache_size = p.segment_len, p.sensory_tokens, p.cache_size
        self.summary_len = p.segment_len // 2
        self.memory, self.causal, self.bptt = p.memory, p.causal, p.bptt_segments
        self.recall = p.memory and p.recall  # the search only feeds P_n
        self.record = False  # sow the recall weights (eval_metrics)

    # --- state ------------------------------------------------------------------------------------

    def init_carry(self, batch_size: int) -> dict:
        dtype, d = self.backbone.embed.dtype, self.memory_init.shape[0]
        carry = {}
        if self.memory:
            carry["cache"] = jnp.zeros((batch_size, self.cache_size, d), dtype)
            carry["count"] = jnp.zeros((batch_size,), jnp.int32)
        if self.sensory:
            carry["sensory"] = jnp.zeros((batch_size, self.sensory, d), dtype)
        if self.recall and self.causal:
            carry["summary"] = jnp.zeros((batch_size, self.summary_len, d), dtype)
        return carry

    def init_states(self, batch_size: int, max_len: int) -> dict:
        """Decoding state (constant size whatever max_len): the carry and the current segment's ids."""
        if self.recall and not self.causal:
            raise ValueError("model.hmt.causal=False reads a segment's first half before predicting its first "
                             "token: token-by-token decoding needs the causal variant")
        return {"carry": self.init_carry(batch_size), "buffer": jnp.zeros((batch_size, self.segment_len), jnp.int32),
                "fill": jnp.zeros((), jnp.int32)}

    # --- one segment ------------------------------------------------------------------------------

    def search(self, carry, x_BxLxD) -> tuple[jax.Array, jax.Array]:
        """P_n [B, D] and the recall weights [B, N] (zero on invalid entries and when not recalled)."""
        batch, _, d = x_BxLxD.shape
        dtype = x_BxLxD.dtype
        p0_BxD = jnp.broadcast_to(self.memory_init[...].astype(dtype), (batch, d))
        if not self.recall:
            return p0_BxD, jnp.zeros((batch, self.cache_size), jnp.float32)
        summary_BxJxD = carry["summary"] if self.causal else x_BxLxD[:, : self.summary_len]
        token_Bx1xD = jnp.broadcast_to(self.summary_token[...].astype(dtype), (batch, 1, d))
        s_BxD = backbone_hidden(self.backbone, jnp.concatenate([token_Bx1xD, summary_BxJxD, token_Bx1xD], 1))[:, -1]
        cache_BxNxD, count_B = carry["cache"], carry["count"]
        q_BxH = self.recall_query(s_BxD).astype(jnp.float32)
        k_BxNxH = self.recall_key(cache_BxNxD).astype(jnp.float32)
        scores_BxN = jnp.einsum("bh,bnh->bn", q_BxH, k_BxNxH) / math.sqrt(q_BxH.shape[-1])
        valid_BxN = jnp.arange(self.cache_size) >= self.cache_size - count_B[:, None]  # newest last
        weights_BxN = jnp.where(valid_BxN, jax.nn.softmax(jnp.where(valid_BxN, scores_BxN, -1e30), axis=-1), 0.0)
        p_BxD = jnp.einsum("bn,bnd->bd", weights_BxN.astype(dtype), cache_BxNxD)
        return jnp.where(count_B[:, None] > 0, p_BxD, p0_BxD), weights_BxN

    def encode(self, carry, x_BxLxD) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Memory encoding: hidden states of the x positions [B, L, D], the new memory M_n [B, D] (None
        without memory) and the recall weights [B, N]."""
        parts, weights_BxN, p_Bx1xD = [], None, None
        if self.memory:
            p_BxD, weights_BxN = self.search(carry, x_BxLxD)
            p_Bx1xD = p_BxD[:, None]
            parts.append(p_Bx1xD)
        if self.sensory:
            parts.append(carry["sensory"])
        parts.append(x_BxLxD)
        if self.memory:
            parts.append(p_Bx1xD)
        h_BxSxD = backbone_hidden(self.backbone, jnp.concatenate(parts, 1))
        start = int(self.memory) + self.sensory
        m_BxD = h_BxSxD[:, -1] if self.memory else None
        if weights_BxN is None:
            weights_BxN = jnp.zeros((x_BxLxD.shape[0], self.cache_size), jnp.float32)
        return h_BxSxD[:, start : start + x_BxLxD.shape[1]], m_BxD, weights_BxN

    def advance(self, carry, x_BxLxD, m_BxD) -> dict:
        """The carry after a whole segment x with memory m."""
        new = {}
        if self.memory:
            new["cache"] = jnp.concatenate([carry["cache"][:, 1:], m_BxD[:, None].astype(carry["cache"].dtype)], 1)
            new["count"] = jnp.minimum(carry["count"] + 1, self.cache_size)
        if self.sensory:
            new["sensory"] = jnp.concatenate([carry["sensory"], x_BxLxD], 1)[:, -self.sensory :]
        if "summary" in carry:
            new["summary"] = x_BxLxD[:, : self.summary_len]
        return new

    def _segment(self, carry, x_BxLxD):
        h_BxLxD, m_BxD, weights_BxN = self.encode(carry, x_BxLxD)
        has_memory_B = carry["count"] > 0 if self.memory else jnp.zeros((x_BxLxD.shape[0],), bool)
        return self.advance(carry, x_BxLxD, m_BxD), (backbone_logits(self.backbone, h_BxLxD), weights_BxN, has_memory_B)

    # --- calls ------------------------------------------------------------------------------------

    def __call__(self, ids_BxT, states=None):
        """float32 logits [B, T, V] and the new carry / decoding state (None in, None out)."""
        if states is not None and "buffer" in states:
            return self._decode(ids_BxT, states)
        return self.run(self.backbone.embed(ids_BxT), states)

    def run(self, x_BxTxD, carry=None) -> tuple[jax.Array, dict | None]:
        """The model on input embeddings (what __call__ does after the embedding lookup)."""
        batch, length, d = x_BxTxD.shape
        seg = self.segment_len
        whole, tail = divmod(length, seg)
        if carry is not None and tail:
            raise ValueError(f"a call with a carry takes whole segments: {length} tokens is not a multiple of "
                             f"model.hmt.segment_len={seg} (decode partial segments with init_states)")
        state = self.init_carry(batch) if carry is None else carry
        logits, weights, has_memory = [], [], []
        if whole:
            xs_SxBxLxD = jnp.moveaxis(x_BxTxD[:, : whole * seg].reshape(batch, whole, seg, d), 1, 0)
            state, (logits_SxBxLxV, w_SxBxN, has_SxB) = segments.scan_segments(self._segment, state, xs_SxBxLxD,
                                                                               bptt=self.bptt)
            logits.append(jnp.moveaxis(logits_SxBxLxV, 0, 1).reshape(batch, whole * seg, -1))
            weights.append(w_SxBxN)
            has_memory.append(has_SxB)
        if tail:
            if self.bptt and whole and whole % self.bptt == 0:  # the cut scan_segments makes at segment `whole`
                state = segments.cut(state, jnp.asarray(True))
            _, (tail_logits, w_BxN, has_B) = self._segment(state, x_BxTxD[:, whole * seg :])
            logits.append(tail_logits)
            weights.append(w_BxN[None])
            has_memory.append(has_B[None])
        if self.record and self.recall:  # sown here, outside the scan
            self.sow(nnx.Intermediate, "recall_weights", jnp.concatenate(weights))
            self.sow(nnx.Intermediate, "recall_valid", jnp.concatenate(has_memory))
        return jnp.concatenate(logits, axis=1), (None if carry is None else state)

    def _decode(self, ids_BxT, states):
        """Token by token (see the module docstring)."""
        seg = self.segment_len

        def one_token(state, id_B):
            fill = state["fill"]
            new_Bx1 = id_B[:, None].astype(jnp.int32)
            buffer_BxL = jax.lax.dynamic_update_slice_in_dim(state["buffer"], new_Bx1, fill, axis=1)
            x_BxLxD = self.backbone.embed(buffer_BxL)
            h_BxLxD, m_BxD, _ = self.encode(state["carry"], x_BxLxD)
            logits_Bx1xV = backbone_logits(self.backbone, jax.lax.dynamic_slice_in_dim(h_BxLxD, fill, 1, axis=1))
            full = fill == seg - 1
            carry = jax.tree_util.tree_map(lambda new, old: jnp.where(full, new, old),
                                           self.advance(state["carry"], x_BxLxD, m_BxD), state["carry"])
            return {"carry": carry, "buffer": buffer_BxL, "fill": jnp.where(full, 0, fill + 1)}, logits_Bx1xV[:, 0]

        states, logits_TxBxV = jax.lax.scan(one_token, states, ids_BxT.T)
        return jnp.moveaxis(logits_TxBxV, 0, 1), states



    # --- config, FLOPs, diagnostics (registry.Wrapper hooks) ---------------------------------------

    @classmethod
    def validate(cls, cfg, require) -> None:
        p = cfg.model.hmt
        require(p.segment_len > 0, "model.hmt.segment_len", f"must be positive, got {p.segment_len}")
        require(0 <= p.sensory_tokens <= p.segment_len, "model.hmt.sensory_tokens",
                f"must lie in [0, model.hmt.segment_len={p.segment_len}], got {p.sensory_tokens}")
        require(p.cache_size > 0, "model.hmt.cache_size", f"must be positive, got {p.cache_size}")
        require(p.recall_dim > 0, "model.hmt.recall_dim", f"must be positive, got {p.recall_dim}")
        require(p.bptt_segments >= 0, "model.hmt.bptt_segments", f"must be >= 0 (0 = all), got {p.bptt_segments}")
        require(cfg.train.seq_len % p.segment_len == 0, "train.seq_len",
                f"{cfg.train.seq_len} is not a multiple of model.hmt.segment_len={p.segment_len}")

    @classmethod
    def flops_per_token(cls, model_cfg, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token of the whole HMT model (the backbone's passes included): per segment of
        L new tokens, the memory encoding runs the backbone on L + k + 2 positions, the representation
        encoding on L // 2 + 2, the head on L; plus the search. Each pass's attention-like terms come from
        the blocks' own flops_per_token at that pass's length."""
        p = model_cfg.hmt
        seg = min(p.segment_len, seq_len)
        backbone = nnx.eval_shape(lambda: DecoderLM(model_cfg, vocab_size, rngs=nnx.Rngs(params=0)))

        state_axes = registry.state_axes(model_cfg)
        per_position = 6.0 * (count_matmul_params(backbone.blocks, state_axes)
                              + count_matmul_params(backbone.shared, state_axes))
        blocks, names = registry.load(), registry.block_names(model_cfg)

        def backbone_pass(positions: int) -> float:
            if positions == 0:
                return 0.0
            return positions * (per_position + sum(blocks[name].flops_per_token(model_cfg, positions)
                                                   for name in names))

        memory, recall = p.memory, p.memory and p.recall
        total = backbone_pass(seg + p.sensory_tokens + 2 * memory) + 6.0 * vocab_size * model_cfg.d_model * seg
        if recall:
            d, n, h = model_cfg.d_model, p.cache_size, p.recall_dim
            total += backbone_pass(seg // 2 + 2) + 6.0 * (d * h * (n + 1) + n * (h + d))
        return total / seg

    @staticmethod
    def eval_metrics(graphdef, params, batches) -> dict[str, float]:
        """Mean recall weight by distance d = 1..N (segments back) over the evaluation batches, over the
        segments that had a non-empty cache: the weights of one search sum to 1, so these do too."""
        total, searches = 0.0, 0.0
        for record in diagnostics.per_batch(_recall_record, graphdef, params, batches):
            if record is None:
                return {}
            by_distance_N, count = record
            total, searches = total + np.asarray(by_distance_N, np.float64), searches + float(count)
        if not searches:
            return {}
        return {f"memory/hmt/recall_distance_{d}": float(w / searches) for d, w in enumerate(total, start=1)}


def _recall_record(graphdef, params, inputs_BxT):
    """One batch's recall weights summed by distance [N] and the number of searches (None: recall off)."""
    _, captured = diagnostics.capture(graphdef, params, inputs_BxT, _record_recall)
    if "recall_weights" not in captured:  # recall off: nothing searched
        return None
    weights_SxBxN, valid_SxB = captured["recall_weights"][0], captured["recall_valid"][0]
    # Entry i of the newest-last cache is N - i segments back.
    by_distance_N = jnp.sum(weights_SxBxN * valid_SxB[..., None], axis=(0, 1))[::-1]
    return by_distance_N, jnp.sum(valid_SxB)


def _record_recall(model) -> None:
    model.record = True
