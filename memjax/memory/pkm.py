"""Product-key memory layers (Lample et al. 2019) and Memory+ (Berges et al. 2024, arXiv 2412.09764).

Block `pkm` (settings at `config.model.pkm`): a pre-norm residual layer, causal self-attention followed
by a product-key memory where the SwiGLU FFN would be. Per token and memory head h:

  q = x W_q + b_q, split into halves q1, q2 (each optionally RMS-normalised, with a learned scale);
  s1 = q1 K1_h^T, s2 = q2 K2_h^T over n half-keys each; top-k of each half; the sums s1_i + s2_j of the
  k^2 pairs (only the ~k ln k that can make the cut are formed) name slot i*n + j; the top-k of those
  are the selected slots, exactly the top-k over all n^2 slots;
  w = softmax over the k selected scores (float32); y = sum_h sum_k w V[slot] (an embedding bag).
For large codebooks (n > 8k) the gradients reach q and the half-keys through the selected scores
only, recomputed from the chosen half-keys (`chosen_scores`), so the backward does not grow with n.

Memory+ (`memory_plus=True`) outputs W2(y * SiLU(W1 x + b1)) + b2; `gate=True` scales the output by a
per-token scalar sigmoid(w_g . x). With `memory_plus=False` the output is y itself (v_dim = d_model).

The value table V [N = n_keys^2, v_dim] is one module per model (`make_shared`), read by every pkm
layer: one parameter whose gradient is the sum over layers. Queries and keys belong to each layer.
NNX lists a shared parameter under the path where it is first met, so the table's leaf is
`blocks/<first pkm layer>/memory/values/table`; give it its own optimizer group with e.g.
`optim.groups.pkm_values = {pattern: VALUES_PATTERN, lr_mult: 10.0, weight_decay: 0.0}`
(not a group named `values`: a ConfigDict attribute of that name reads as the `values()` method).

Query normalisation: "rms" (per head and half) or "none". BatchNorm, which the PKM paper preferred,
is not offered: batch statistics in training mix tokens across positions (a causal LM would see the
future through them) and need running statistics for decoding.

Diagnostics: `slot_usage_metrics(graphdef, params, batches)` returns `memory/slots_hit_fraction` and
`memory/slot_usage_kl` (KL of the slots' summed softmax weight to uniform, Lample et al.'s measure),
for the shared table and per pkm layer, over evaluation batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.kernels.dispatch import KERNEL_CHOICES
from memjax.kernels.pkm_lookup import reference as lookup_reference
from memjax.memory import bag
from memjax.models import layers, sublayers
from memjax.models.attention import AttentionLayer
from memjax.models.diagnostics import batch_sum, capture
from memjax.models.registry import register

QUERY_NORMS = ("rms", "none")
# Regex for the value table's optimizer group (see the module docstring for why not "^shared/pkm/").
VALUES_PATTERN = r"(^|/)memory/values/table$"


def value_dim(model_cfg) -> int:
    return model_cfg.pkm.v_dim or model_cfg.d_model


def candidate_pairs(k: int, half_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a, b) in the two descending half top-k lists that can hold an overall top-k pair.

    Pair (a, b) is dominated by the (a+1)(b+1) - 1 pairs (a' <= a, b' <= b) whose sums are at least as
    large, so with (a+1)(b+1) > k it can only tie the k-th score, never beat it. This keeps about
    k ln k of the k^2 pairs (119 of 1024 at k = 32) and at least k of them.
    """
    a, b = np.meshgrid(np.arange(half_k), np.arange(half_k), indexing="ij")
    keep = (a + 1) * (b + 1) <= k
    return a[keep].astype(np.int32), b[keep].astype(np.int32)


# Half-keys per kept candidate (n / min(k, n)) above which the chosen scores are recomputed for the
# backward. Forward+backward of the selection on a 2-core CPU (2048 tokens, 4 heads, k_dim 256): equal
# at n = 8k (256 keys, k = 32; 128 keys, k = 16); recomputing is 25% slower at n = 4k and 16-28%
# faster at n = 16k to 32k.
RECOMPUTE_SCORES_ABOVE = 8


def product_key_topk(q_BxHxK, keys_Hx2xNxK2, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k slots of each head over the n^2 product keys, without scoring them all.

    q_BxHxK: queries (any leading dims); keys_Hx2xNxK2: the two half-key codebooks of each head.
    Returns scores [..., H, k] (float32, or float64 for float64 queries; in the search's descending
    order) and int32 slots i*n + j [..., H, k]. Each half keeps min(k, n) candidates: any pair in the
    overall top-k has both halves in their half's top-k; `candidate_pairs` then prunes the pairs that
    cannot make the cut.
    """
    n = keys_Hx2xNxK2.shape[2]
    q1, q2 = jnp.split(q_BxHxK, 2, axis=-1)
    keys = keys_Hx2xNxK2.astype(q_BxHxK.dtype)
    score_dtype = jnp.promote_types(q_BxHxK.dtype, jnp.float32)  # float32 from bfloat16 queries
    half_k = min(k, n)
    # Differentiating the search gives each query a dense [.., n] score gradient, almost all zeros, whose
    # backward costs as much as the search and grows with sqrt(N). Past RECOMPUTE_SCORES_ABOVE the search
    # runs without gradients and the chosen pairs' scores are recomputed from their k half-keys instead.
    recompute = n > RECOMPUTE_SCORES_ABOVE * half_k

    def half_topk(q_half, keys_half):
        # Heads lead the score table: no transpose of the [.., n] scores (a third of the search on CPU).
        q_half = jnp.moveaxis(q_half, -2, 0)
        if recompute:
            q_half, keys_half = jax.lax.stop_gradient((q_half, keys_half))
        scores = jnp.einsum("h...d,hnd->h...n", q_half, keys_half, preferred_element_type=score_dtype)
        return [jnp.moveaxis(x, 0, -2) for x in jax.lax.top_k(scores, half_k)]

    top1, idx1 = half_topk(q1, keys[:, 0])
    top2, idx2 = half_topk(q2, keys[:, 1])
    a, b = candidate_pairs(k, half_k)
    scores, pos = jax.lax.top_k(top1[..., a] + top2[..., b], k)
    i = jnp.take_along_axis(idx1, jnp.asarray(a)[pos], axis=-1)
    j = jnp.take_along_axis(idx2, jnp.asarray(b)[pos], axis=-1)
    if recompute:
        scores = (chosen_scores(q1.astype(score_dtype), keys[:, 0].astype(score_dtype), i)
                  + chosen_scores(q2.astype(score_dtype), keys[:, 1].astype(score_dtype), j))
    return scores, (i * n + j).astype(jnp.int32)


def chosen_scores(q_BxHxD, keys_HxNxD, idx_BxHxk) -> jax.Array:
    """<q[.., h], keys[h, idx[.., h, c]]> [B.., H, k], differentiable in q and keys.

    This is the transpose of a weighted embedding bag over the heads' stacked half-keys, so it reuses
    the bag's gather-reduce and scatter-add: its forward is the bag's weight gradient, its q-gradient
    the bag's forward with the score gradients as weights, its key gradient the bag's table gradient.
    """
    heads, n, d = keys_HxNxD.shape
    rows = (idx_BxHxk + n * jnp.arange(heads)[:, None]).reshape(-1, idx_BxHxk.shape[-1])
    return _chosen_scores(q_BxHxD.reshape(-1, d), keys_HxNxD.reshape(heads * n, d), rows).reshape(idx_BxHxk.shape)


@jax.custom_vjp
def _chosen_scores(q_MxD, keys_NxD, idx_MxK):
    return lookup_reference.weights_grad(keys_NxD, idx_MxK, q_MxD)


def _chosen_scores_fwd(q_MxD, keys_NxD, idx_MxK):
    return _chosen_scores(q_MxD, keys_NxD, idx_MxK), (q_MxD, keys_NxD, idx_MxK)


def _chosen_scores_bwd(residuals, dscores_MxK):
    q_MxD, keys_NxD, idx_MxK = residuals
    dq_MxD = lookup_reference.forward(keys_NxD, idx_MxK, dscores_MxK)
    dkeys_NxD = lookup_reference.table_grad(keys_NxD.shape[0], idx_MxK, dscores_MxK, q_MxD)
    return dq_MxD, dkeys_NxD, None


_chosen_scores.defvjp(_chosen_scores_fwd, _chosen_scores_bwd)


class ValueTable(nnx.Module):
    """The memory's values, shared by all pkm layers of a model."""

    def __init__(self, model_cfg, *, rngs: nnx.Rngs):
        p = model_cfg.pkm
        v = value_dim(model_cfg)
        std = p.value_init_std or v**-0.5
        # A lookup table: each row is read by the few tokens that select it, so weight decay (applied to
        # every row every step) would erase rows faster than their sparse updates write them.
        self.table = layers.param(rngs, (p.n_keys**2, v), std, ("value_rows", "value_cols"), decay=False)


class ProductKeyMemory(nnx.Module):
    """x_BxTxD (already normalised) -> the memory's output [B, T, D] in the compute dtype."""

    def __init__(self, model_cfg, values: ValueTable, *, rngs: nnx.Rngs):
        p = model_cfg.pkm
        d, v, h, kd = model_cfg.d_model, value_dim(model_cfg), p.heads, p.k_dim
        dtype = jnp.dtype(model_cfg.dtype)
        self.heads, self.k, self.dtype, self.eps = h, p.k, dtype, model_cfg.norm_eps
        self.query_norm, self.memory_plus, self.use_gate = p.query_norm, p.memory_plus, p.gate
        self.shard_axis, self.shard_mode, self.kernel = p.value_shard_axis, p.value_shard_mode, p.kernel
        self.query = layers.Dense((d,), (h, kd), ("embed", "pkm_heads", "pkm_key_dim"), std=model_cfg.init_std,
                                  dtype=dtype, rngs=rngs)
        # Bias and scale are stored flat (reshaped at use): vectors, not matrices, for weight decay and FLOPs.
        self.query_bias = nnx.Param(jnp.zeros((h * kd,), jnp.float32), logical_axes=("pkm_query",))
        if p.query_norm == "rms":
            self.query_scale = nnx.Param(jnp.ones((h * kd,), jnp.float32), logical_axes=("pkm_query",))
        # Half-keys of std (k_dim/2)^-1/2: with RMS-normalised queries each half score starts ~ N(0, 1).
        self.keys = layers.param(rngs, (h, 2, p.n_keys, kd // 2), (kd / 2) ** -0.5,
                                 ("pkm_heads", "pkm_half", "pkm_keys", "pkm_key_dim"))
        self.values = values
        if p.memory_plus:
            self.w1 = layers.Dense((d,), (v,), ("embed", "pkm_value"), std=model_cfg.init_std, dtype=dtype, rngs=rngs)
            self.b1 = nnx.Param(jnp.zeros((v,), jnp.float32), logical_axes=("pkm_value",))
            self.w2 = layers.Dense((v,), (d,), ("pkm_value", "embed"), std=sublayers.output_std(model_cfg), dtype=dtype,
                                   rngs=rngs)
            self.b2 = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("embed",))
        if p.gate:
            self.gate = nnx.Param(jnp.zeros((d,), jnp.float32), logical_axes=("embed",))
        # Set by `slot_usage` only: sown slots would otherwise be written in every training step.
        self.record_slots = False

    def select(self, x_BxTxD) -> tuple[jax.Array, jax.Array]:
        """Float32 softmax weights and int32 slots [B, T, H, k] of every token and head."""
        q_BxTxHxK = self.query(x_BxTxD)
        q_BxTxHxK = q_BxTxHxK + self.query_bias[...].reshape(q_BxTxHxK.shape[-2:]).astype(self.dtype)
        if self.query_norm == "rms":
            halves = q_BxTxHxK.astype(jnp.float32).reshape(*q_BxTxHxK.shape[:-1], 2, -1)
            halves = halves * jax.lax.rsqrt(jnp.mean(halves * halves, axis=-1, keepdims=True) + self.eps)
            q_BxTxHxK = (halves.reshape(q_BxTxHxK.shape) * self.query_scale[...].reshape(q_BxTxHxK.shape[-2:]))
            q_BxTxHxK = q_BxTxHxK.astype(self.dtype)
        scores_BxTxHxk, slots_BxTxHxk = product_key_topk(q_BxTxHxK, self.keys[...], self.k)
        return jax.nn.softmax(scores_BxTxHxk, axis=-1), slots_BxTxHxk

    def __call__(self, x_BxTxD):
        batch, seq, _ = x_BxTxD.shape
        weights_BxTxHxk, slots_BxTxHxk = self.select(x_BxTxD)
        if self.record_slots:
            self.sow(nnx.Intermediate, "slot_usage", (slots_BxTxHxk, weights_BxTxHxk))
        # The heads' bags are summed, so all H*k (slot, weight) pairs of a token form one bag.
        bag_size = self.heads * self.k
        y_MxV = bag.lookup(
            self.values.table[...], slots_BxTxHxk.reshape(-1, bag_size), weights_BxTxHxk.reshape(-1, bag_size),
            axis=self.shard_axis, mode=self.shard_mode, kernel=self.kernel,
        )
        y_BxTxV = y_MxV.reshape(batch, seq, -1).astype(self.dtype)
        if self.memory_plus:
            hidden_BxTxV = jax.nn.silu(self.w1(x_BxTxD) + self.b1[...].astype(self.dtype))
            y_BxTxV = self.w2(y_BxTxV * hidden_BxTxV) + self.b2[...].astype(self.dtype)
        if self.use_gate:
            gate_BxT = jax.nn.sigmoid(jnp.einsum("btd,d->bt", x_BxTxD, self.gate[...].astype(self.dtype)))
            y_BxTxV = y_BxTxV * gate_BxT[..., None]
        return y_BxTxV.astype(x_BxTxD.dtype)


@register("pkm")
class ProductKeyMemoryBlock(AttentionLayer):
    """Pre-norm causal self-attention, then a product-key memory (Memory+ by default) in place of the FFN."""

    axis_rules = {
        "pkm_heads": None,
        "pkm_half": None,
        "pkm_keys": None,
        "pkm_key_dim": None,
        "pkm_query": None,
        "pkm_value": "tensor",
        # The value table follows model.pkm.value_shard_axis / value_shard_mode (`sharding_rules`): the
        # sharded embedding bag expects exactly that layout.
        "value_rows": None,
        "value_cols": None,
    }
    state_axes = frozenset({"value_rows"})  # the value table is read (a lookup), not multiplied
    defaults = {
        "heads": 4,
        "k": 32,  # slots read per head and token
        "n_keys": 256,  # half-keys per codebook: N = n_keys^2 slots (65,536)
        "k_dim": 128,  # query / full key width per head (each half k_dim / 2)
        "v_dim": 0,  # value width; 0 = d_model
        "query_norm": "rms",  # one of QUERY_NORMS
        "memory_plus": True,
        "gate": False,  # scalar sigmoid gate on the memory output
        "value_init_std": 0.0,  # 0 = v_dim^-1/2
        # Shard the value table over this mesh axis when the context mesh (jax.set_mesh) has it:
        # "columns" (v_dim / P each) or "rows" (N / P each).
        "value_shard_axis": "tensor",
        "value_shard_mode": "columns",
        # The value lookup's implementation (memjax.kernels.dispatch): "auto" = the Pallas kernel on TPU
        # and GPU where it takes the (per-device) table, else the pure-JAX reference, with one warning.
        "kernel": "auto",
    }

    def __init__(self, cfg, layer_index: int, *, shared=None, rngs: nnx.Rngs):
        super().__init__(cfg, layer_index, rngs=rngs)
        self.memory = ProductKeyMemory(cfg, shared, rngs=rngs)
        # AttentionLayer's second residual step is x + mlp(mlp_norm(x)): the memory takes the FFN's
        # place there. Both names hold one module, whose parameters are listed once, under `memory/`.
        self.mlp = self.memory

    @classmethod
    def sharding_rules(cls, model_cfg) -> dict:
        table, p = dict(cls.axis_rules), model_cfg.pkm
        if p.value_shard_axis:
            table["value_rows" if p.value_shard_mode == "rows" else "value_cols"] = p.value_shard_axis
        return table

    @classmethod
    def make_shared(cls, cfg, *, rngs) -> ValueTable:
        return ValueTable(cfg, rngs=rngs)

    @staticmethod
    def eval_metrics(graphdef, params, batches) -> dict[str, float]:
        return slot_usage_metrics(graphdef, params, batches)

    @classmethod
    def validate(cls, cfg, require) -> None:
        p, d = cfg.model.pkm, cfg.model.d_model
        require(p.heads > 0, "model.pkm.heads", f"must be positive, got {p.heads}")
        require(p.n_keys >= 2, "model.pkm.n_keys", f"must be >= 2, got {p.n_keys}")
        require(
            1 <= p.k <= p.n_keys**2,
            "model.pkm.k",
            f"must lie in [1, n_keys^2 = {p.n_keys ** 2}] (slots read per head), got {p.k}",
        )
        require(p.k_dim > 0 and p.k_dim % 2 == 0, "model.pkm.k_dim", f"must be positive and even, got {p.k_dim}")
        require(p.v_dim >= 0, "model.pkm.v_dim", f"must be >= 0 (0 = d_model), got {p.v_dim}")
        require(
            p.memory_plus or value_dim(cfg.model) == d,
            "model.pkm.v_dim",
            f"without model.pkm.memory_plus the memory output is added to the residual: v_dim must be 0 or "
            f"d_model={d}, got {p.v_dim}",
        )
        require(p.query_norm in QUERY_NORMS, "model.pkm.query_norm",
                f"{p.query_norm!r} is not one of {list(QUERY_NORMS)}")
        require(p.value_init_std >= 0, "model.pkm.value_init_std", "must be >= 0 (0 = v_dim^-1/2)")
        require(
            p.value_shard_mode in bag.SHARD_MODES,
            "model.pkm.value_shard_mode",
            f"{p.value_shard_mode!r} is not one of {list(bag.SHARD_MODES)}",
        )
        require(p.kernel in KERNEL_CHOICES, "model.pkm.kernel", f"{p.kernel!r} is not one of {list(KERNEL_CHOICES)}")

    @classmethod
    def flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """Attention scores + the memory's work that is not a parameter matmul.

        Parameter matmuls (queries, half-key scores, W1, W2) are counted by the caller as 6 x parameters,
        which is exact for the half-key scores (each key element is one multiply-add per token). The
        value table is a lookup, excluded from that count: the bag reads H*k rows of v_dim (2 H k v
        forward; its backward scatter-add and dw the same again each: 6 H k v). Selection counts one
        operation per score scanned or formed: 2 top-k over n half scores, the candidate pair sums and
        their top-k (about k ln k pairs, `candidate_pairs`), and the k-way softmax; forward only, its
        backward is a k-row scatter.
        """
        p = model_cfg.pkm
        pairs = len(candidate_pairs(p.k, min(p.k, p.n_keys))[0])
        bag_flops = 6.0 * p.heads * p.k * value_dim(model_cfg)
        selection = p.heads * (2.0 * p.n_keys + 2.0 * pairs + 5.0 * p.k)
        return super().flops_per_token(model_cfg, seq_len) + bag_flops + selection


def pkm_layers(model) -> list[tuple[int, ProductKeyMemory]]:
    """(layer index, memory) of every pkm block of a DecoderLM."""
    return [(i, block.memory) for i, block in enumerate(model.blocks) if isinstance(block, ProductKeyMemoryBlock)]


def _switch_on_recording(model) -> None:
    for _, memory in pkm_layers(model):
        memory.record_slots = True


def slot_usage(graphdef, params, inputs_BxT) -> dict[str, jax.Array]:
    """One batch's slot usage per pkm layer: {"hits": [L, N] times selected, "mass": [L, N] summed
    softmax weight}, L = pkm layers in order. Pure and jittable (graphdef static)."""
    model, captured = capture(graphdef, params, inputs_BxT, _switch_on_recording)
    memories = pkm_layers(model)
    if not memories:
        return {}
    n = memories[0][1].values.table.shape[0]
    hits, mass = [], []
    for i, _ in memories:
        (slots, weights), = captured["blocks"][i]["memory"]["slot_usage"]
        slots = slots.reshape(-1)
        hits.append(jnp.zeros((n,), jnp.float32).at[slots].add(1.0))
        mass.append(jnp.zeros((n,), jnp.float32).at[slots].add(weights.reshape(-1).astype(jnp.float32)))
    return {"hits": jnp.stack(hits), "mass": jnp.stack(mass)}


def usage_metrics(usage: dict, layer_indices=None) -> dict[str, float]:
    """Metrics from summed `slot_usage` outputs: for the shared table (all pkm layers together) and for
    each layer, the fraction of slots selected at least once and KL(usage || uniform) in nats, where
    usage is the slots' share of the summed softmax weight (0 when spread evenly, log N when one slot
    takes everything)."""
    if not usage:
        return {}
    hits_LxN, mass_LxN = np.asarray(usage["hits"], np.float64), np.asarray(usage["mass"], np.float64)
    layer_indices = range(hits_LxN.shape[0]) if layer_indices is None else layer_indices

    def hit_fraction(hits_N):
        return float(np.mean(hits_N > 0))

    def kl_to_uniform(mass_N):
        p_N = mass_N / mass_N.sum()
        nonzero = p_N[p_N > 0]
        return float(np.sum(nonzero * np.log(nonzero * p_N.shape[0])))

    out = {
        "memory/slots_hit_fraction": hit_fraction(hits_LxN.sum(0)),
        "memory/slot_usage_kl": kl_to_uniform(mass_LxN.sum(0)),
    }
    for row, layer in enumerate(layer_indices):
        out[f"memory/layer{layer}/slots_hit_fraction"] = hit_fraction(hits_LxN[row])
        out[f"memory/layer{layer}/slot_usage_kl"] = kl_to_uniform(mass_LxN[row])
    return out


def slot_usage_metrics(graphdef, params, batches) -> dict[str, float]:
    """`usage_metrics` over evaluation batches (dicts with "inputs" [B, T]); {} for a model without
    pkm layers. The trainer logs them with each evaluation (the block's `eval_metrics`)."""
    layer_indices = [i for i, _ in pkm_layers(nnx.merge(graphdef, params))]
    if not layer_indices:
        return {}
    total = batch_sum(slot_usage, graphdef, params, batches)
    return usage_metrics(total, layer_indices) if total is not None else {}
