"""Gated DeltaNet, DeltaNet and DeltaProduct: one delta-rule block registered under three names.

The mixer (Gated DeltaNet, Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464), per head, from x (normalised):
  q, k, v = SiLU(causal depthwise conv(x W)) (kernel `conv_kernel`), q and k L2-normalised;
  beta = beta_max * sigmoid(x W_beta);  alpha = exp(-exp(A_log) softplus(x W_alpha + dt_bias)) (Mamba-2's decay);
  S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,  o_t = S_t q_t;
  out = W_o(RMSNorm(o) * SiLU(x W_g)) (RMSNorm per head, its scale learned per head and channel).
The block: x + mixer(norm x) (then, with `hybrid` = "swa", x + SWA(norm x) as titans_mal), then the SwiGLU FFN.

- `gated_deltanet`: as above.
- `deltanet` (Yang et al. 2024, arXiv 2406.06484): alpha = 1 (`gate` off: no decay parameters).
- `deltaproduct` (Siems et al. 2025, arXiv 2502.10297): `householder` = n_h keys, values and betas per token
  (n_h times the k / v / beta projections and convs), S_t = alpha_t S_{t-1} H_{t,1} .. H_{t,n_h} + ..., i.e.
  n_h delta steps per token, the decay once per token (on its first step, as the paper's gated variant
  and fla's `naive_recurrent_gated_delta_product`) and the read after the token's last step. Run as the
  delta rule over T x n_h steps with log decay 0 on all but each token's first step. beta_max = 2 by
  default there: the paper's "[-1, 1]" eigenvalue range (I - 2 k k^T is a reflection), which its results
  need for state tracking.

Choices. q is not scaled by head_dim^-1/2 (fla does): the per-head RMSNorm of o removes any constant
factor on q up to its epsilon, so the scale would only decide how much that epsilon matters. Key width
`head_dim` (0: d_model / heads) and value width `value_expansion` x key width (the paper: 256 and 2x).
The kernel (memjax.kernels.delta_rule) is exact for any chunk, so `chunk` is a speed setting only, a call
may have any length and the carried state is S [B, H, K, V] plus the convs' last inputs: split calls,
token-by-token decoding and segments equal one call up to rounding.

The paper's H1 hybrid (Gated DeltaNet and sliding-window attention layers interleaved) is
`block_pattern = "gated_deltanet,swa"`; `hybrid = "swa"` puts both in one layer, with one FFN.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels import delta_rule
from memjax.memory import neural
from memjax.models import layers, sublayers
from memjax.models.diagnostics import batch_mean, capture
from memjax.models.registry import Block, register

HYBRIDS = ("none", "swa")
# Mamba-2's initialisation of the decay (as fla's Gated DeltaNet): A ~ U(A_RANGE), dt log-uniform in DT_RANGE.
A_RANGE = (1.0, 16.0)
DT_RANGE = (1e-3, 1e-1)


class DeltaRuleMixer(nnx.Module):
    """The token mixer: x_BxTxD (normalised) -> out [B, T, D] and the new carried state."""

    def __init__(self, p, model_cfg, *, rngs: nnx.Rngs):
        d, h, n = model_cfg.d_model, p.heads, p.householder
        dk = p.head_dim or d // h
        dv = p.value_expansion * dk
        dtype = jnp.dtype(model_cfg.dtype)
        std, out_std = model_cfg.init_std, sublayers.output_std(model_cfg)
        self.heads, self.key_dim, self.value_dim, self.householder = h, dk, dv, n
        self.dtype, self.eps, self.beta_max = dtype, model_cfg.norm_eps, p.beta_max
        self.conv_kernel, self.chunk, self.remat_chunks, self.gated = p.conv_kernel, p.chunk, p.remat_chunks, p.gate
        self.q = layers.Dense((d,), (h, dk), ("embed", "heads", "head_dim"), std=std, dtype=dtype, rngs=rngs)
        self.k = layers.Dense((d,), (n, h, dk), ("embed", "householder", "heads", "head_dim"), std=std, dtype=dtype,
                              rngs=rngs)
        self.v = layers.Dense((d,), (n, h, dv), ("embed", "householder", "heads", "head_dim"), std=std, dtype=dtype,
                              rngs=rngs)
        if p.conv_kernel:
            scale = p.conv_kernel**-0.5
            self.conv_q = layers.param(rngs, (p.conv_kernel, h, dk), scale, ("conv", "heads", "head_dim"))
            self.conv_k = layers.param(rngs, (p.conv_kernel, n, h, dk), scale, ("conv", "householder", "heads",
                                                                                 "head_dim"))
            self.conv_v = layers.param(rngs, (p.conv_kernel, n, h, dv), scale, ("conv", "householder", "heads",
                                                                                 "head_dim"))
        self.beta = layers.Dense((d,), (n, h), ("embed", "householder", "heads"), std=std, dtype=dtype, rngs=rngs)
        if p.gate:
            self.alpha = layers.Dense((d,), (h,), ("embed", "heads"), std=std, dtype=dtype, rngs=rngs)
            a = jax.random.uniform(rngs.params(), (h,), jnp.float32, *A_RANGE)
            log_dt = jax.random.uniform(rngs.params(), (h,), jnp.float32, *map(math.log, DT_RANGE))
            dt = jnp.exp(log_dt)
            # Vectors: never decayed (memjax.optim decays matrices only).
            self.a_log = nnx.Param(jnp.log(a), logical_axes=("heads",))
            self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), logical_axes=("heads",))  # softplus^-1(dt)
        self.out_norm = nnx.Param(jnp.ones((h, dv), jnp.float32), logical_axes=("heads", "head_dim"), decay=False)
        self.out_gate = layers.Dense((d,), (h, dv), ("embed", "heads", "head_dim"), std=std, dtype=dtype, rngs=rngs)
        self.out = layers.Dense((h, dv), (d,), ("heads", "head_dim", "embed"), std=out_std, dtype=dtype, rngs=rngs)
        self.record = False  # set by diagnostics only: sown values would otherwise be written every step

    def init_state(self, batch_size: int, dtype=jnp.float32) -> dict:
        """Before a sequence: S = 0 (in the inner dtype, float32 at least) and no conv history."""
        h, n, dk, dv, taps = self.heads, self.householder, self.key_dim, self.value_dim, max(self.conv_kernel - 1, 0)
        conv = {"q": jnp.zeros((batch_size, taps, h, dk), self.dtype),
                "k": jnp.zeros((batch_size, taps, n, h, dk), self.dtype),
                "v": jnp.zeros((batch_size, taps, n, h, dv), self.dtype)}
        return {"conv": conv, "memory": jnp.zeros((batch_size, h, dk, dv), jnp.promote_types(dtype, jnp.float32))}

    def streams(self, x_BxTxD, conv_state) -> tuple[dict[str, jax.Array], dict]:
        """q [B, T, H, K], k [B, T, n, H, K], v [B, T, n, H, V] (convolved, SiLU, q and k normalised), beta
        [B, T, n, H] and log alpha [B, T, H], all in the inner dtype; the convs' new history."""
        raw = {"q": self.q(x_BxTxD), "k": self.k(x_BxTxD), "v": self.v(x_BxTxD)}
        new_conv = conv_state
        if self.conv_kernel:
            kernels = {"q": self.conv_q, "k": self.conv_k, "v": self.conv_v}
            convolved = {name: neural.causal_conv(x, conv_state[name], kernels[name][...]) for name, x in raw.items()}
            raw = {name: out for name, (out, _) in convolved.items()}
            new_conv = {name: history for name, (_, history) in convolved.items()}
        inner = jnp.promote_types(x_BxTxD.dtype, jnp.float32)
        out = {name: jax.nn.silu(x).astype(inner) for name, x in raw.items()}
        out["q"], out["k"] = neural.l2_normalize(out["q"], self.eps), neural.l2_normalize(out["k"], self.eps)
        out["beta"] = self.beta_max * jax.nn.sigmoid(self.beta(x_BxTxD).astype(inner))
        if self.gated:
            dt = jax.nn.softplus(self.alpha(x_BxTxD).astype(inner) + self.dt_bias[...].astype(inner))
            out["log_decay"] = -jnp.exp(self.a_log[...].astype(inner)) * dt
        else:
            out["log_decay"] = jnp.zeros(x_BxTxD.shape[:2] + (self.heads,), inner)
        return out, new_conv

    def recur(self, s, memory_BxHxKxV) -> tuple[jax.Array, jax.Array]:
        """The delta rule over the streams (`streams`) from this state: o [B, T, H, V] and the new state."""
        batch, t = s["q"].shape[:2]
        n = self.householder
        # n delta steps per token, token-major: [B, H, T x n, ...]; the decay on each token's first step
        # and the query (the read) on its last.
        steps = lambda x_BxTxnxHx_: jnp.moveaxis(x_BxTxnxHx_, 3, 1).reshape(batch, self.heads, t * n,
                                                                           *x_BxTxnxHx_.shape[4:])
        only_at = lambda x_BxTxHx_, i: steps(jnp.zeros((batch, t, n, *x_BxTxHx_.shape[2:]), x_BxTxHx_.dtype)
                                             .at[:, :, i].set(x_BxTxHx_))
        o_BxHxTnxV, memory_BxHxKxV = delta_rule.delta_rule(
            only_at(s["q"], n - 1), steps(s["k"]), steps(s["v"]), steps(s["beta"]), only_at(s["log_decay"], 0),
            memory_BxHxKxV.astype(s["k"].dtype), chunk=self.chunk * n, remat_chunks=self.remat_chunks,
        )
        return jnp.moveaxis(o_BxHxTnxV.reshape(batch, self.heads, t, n, -1)[:, :, :, n - 1], 1, 2), memory_BxHxKxV

    def __call__(self, x_BxTxD, state=None) -> tuple[jax.Array, dict | None]:
        carried = state is not None
        if not carried:
            state = self.init_state(x_BxTxD.shape[0], x_BxTxD.dtype)
        s, conv = self.streams(x_BxTxD, state["conv"])
        o_BxTxHxV, memory = self.recur(s, state["memory"])
        if self.record:
            self.sow(nnx.Intermediate, "diagnostics", {
                "beta": jnp.mean(s["beta"]), "alpha": jnp.mean(jnp.exp(s["log_decay"])),
                "state_norm": jnp.mean(jnp.sqrt(jnp.sum(memory * memory, axis=(-2, -1)))),
            })
        o_BxTxHxV = layers.rms_normalize(o_BxTxHxV, self.eps) * self.out_norm[...]
        gated = o_BxTxHxV.astype(self.dtype) * jax.nn.silu(self.out_gate(x_BxTxD))
        out_BxTxD = self.out(gated).astype(x_BxTxD.dtype)
        if not carried:
            return out_BxTxD, None
        conv = jax.tree_util.tree_map(lambda new, old: new.astype(old.dtype), conv, state["conv"])
        return out_BxTxD, {"conv": conv, "memory": memory.astype(state["memory"].dtype)}


class DeltaRuleBlock(Block):
    """A residual layer around the delta-rule mixer; see the module docstring."""

    axis_rules = {"conv": None, "householder": None}

    defaults: dict = {
        "hybrid": "none",  # one of HYBRIDS: "swa" adds sliding-window attention after the mixer (as titans_mal)
        "heads": 4,
        "head_dim": 0,  # key width per head; 0 = d_model / heads
        "value_expansion": 1,  # value width / key width (the paper: 2)
        "gate": True,  # the decay alpha (Gated DeltaNet); False: alpha = 1 (DeltaNet)
        "householder": 1,  # delta steps per token (DeltaProduct's n_h)
        "beta_max": 1.0,  # beta = beta_max * sigmoid(.): 1 (eigenvalues in [0, 1]) or 2 ([-1, 1])
        "conv_kernel": 4,  # causal depthwise conv on q, k, v; 0 = none
        "chunk": 64,  # tokens per chunk of the kernel (exact for any value: speed only)
        "remat_chunks": 4,  # chunks per rematerialisation group
        "window": 128,  # sliding-window attention of hybrid "swa"
    }

    def __init__(self, cfg, layer_index: int, *, shared=None, rngs: nnx.Rngs):
        p = cfg[self.block_name]
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        self.hybrid = p.hybrid
        self.mixer_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.mixer = DeltaRuleMixer(p, cfg, rngs=rngs)
        if p.hybrid == "swa":
            self.attention_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
            self.attention = sublayers.Attention(cfg, window=p.window, rngs=rngs)
        self.mlp_norm = layers.RMSNorm(d, eps=cfg.norm_eps, dtype=dtype)
        self.mlp = sublayers.feed_forward(cfg, rngs=rngs)

    def init_state(self, batch_size: int, max_len: int, dtype) -> dict:
        state = {"mixer": self.mixer.init_state(batch_size, dtype)}
        if self.hybrid == "swa":
            state["attention"] = self.attention.init_state(batch_size, max_len, dtype)
        return state

    def init_carry(self, batch_size: int, dtype) -> dict:
        """Segments carry the delta-rule state alone (the attention of "swa" sees each segment)."""
        return {"mixer": self.mixer.init_state(batch_size, dtype)}

    def __call__(self, x_BxTxD, state=None):
        mixed, mixer_state = self.mixer(self.mixer_norm(x_BxTxD), None if state is None else state["mixer"])
        x_BxTxD = x_BxTxD + mixed
        new_state = None if state is None else {**state, "mixer": mixer_state}
        if self.hybrid == "swa":
            attended, attn_state = self.attention(self.attention_norm(x_BxTxD),
                                                  None if state is None else state.get("attention"))
            x_BxTxD = x_BxTxD + attended
            if attn_state is not None:
                new_state["attention"] = attn_state
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return x_BxTxD, new_state

    @classmethod
    def validate(cls, cfg, require) -> None:
        name = cls.block_name
        p, d = cfg.model[name], cfg.model.d_model
        field = f"model.{name}"
        require(p.hybrid in HYBRIDS, f"{field}.hybrid", f"{p.hybrid!r} is not one of {list(HYBRIDS)}")
        require(p.heads > 0, f"{field}.heads", f"must be positive, got {p.heads}")
        require(p.head_dim >= 0, f"{field}.head_dim", f"must be >= 0, got {p.head_dim}")
        if p.heads > 0 and not p.head_dim:
            require(d % p.heads == 0, f"{field}.heads",
                    f"{p.heads} heads do not divide model.d_model={d} (or set {field}.head_dim)")
        require(p.value_expansion >= 1, f"{field}.value_expansion", f"must be >= 1, got {p.value_expansion}")
        require(p.householder >= 1, f"{field}.householder", f"must be >= 1, got {p.householder}")
        require(0 < p.beta_max <= 2, f"{field}.beta_max",
                f"must lie in (0, 2] (beyond 2, I - beta k k^T expands the state), got {p.beta_max}")
        require(p.conv_kernel >= 0, f"{field}.conv_kernel", f"must be >= 0, got {p.conv_kernel}")
        require(p.chunk >= 1, f"{field}.chunk", f"must be >= 1, got {p.chunk}")
        require(p.remat_chunks >= 1, f"{field}.remat_chunks", f"must be >= 1, got {p.remat_chunks}")
        if p.hybrid == "swa":
            require(0 < p.window <= cfg.train.seq_len, f"{field}.window",
                    f"must lie in [1, train.seq_len={cfg.train.seq_len}], got {p.window}")

    @classmethod
    def flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """The chunked delta rule's non-parameter work (3x its forward: forward and backward), per head
        and delta step, plus, for "swa", attention scores over the window (12 x d_model per key)."""
        p, d = model_cfg[cls.block_name], model_cfg.d_model
        dk = p.head_dim or d // p.heads
        chunk = min(p.chunk, seq_len) * p.householder
        steps = delta_rule.forward_flops_per_step(chunk, dk, p.value_expansion * dk)
        total = 3.0 * p.heads * p.householder * steps
        if p.hybrid == "swa":
            total += 12.0 * d * min(p.window, seq_len)
        return total


    @staticmethod
    def eval_metrics(graphdef, params, batches) -> dict[str, float]:
        """Per delta-rule layer, averaged over evaluation batches: memory/layer<i>/beta and alpha (the mean
        step size and decay per delta step and token) and state_norm (the mean Frobenius norm of a head's
        state S after the batch's sequences)."""
        return batch_mean(_captured_diagnostics, graphdef, params, batches)


def delta_layers(model) -> list[tuple[int, DeltaRuleBlock]]:
    return [(i, block) for i, block in enumerate(model.blocks) if isinstance(block, DeltaRuleBlock)]


def _switch_on_recording(model) -> None:
    for _, block in delta_layers(model):
        block.mixer.record = True


def _captured_diagnostics(graphdef, params, inputs_BxT) -> dict:
    model, captured = capture(graphdef, params, inputs_BxT, _switch_on_recording)
    return {f"memory/layer{i}/{name}": jnp.mean(jnp.stack([record[name] for record in
                                                          captured["blocks"][i]["mixer"]["diagnostics"]]))
            for i, _ in delta_layers(model) for name in ("beta", "alpha", "state_norm")}


def register_delta_block(name: str, **defaults) -> type[DeltaRuleBlock]:
    """Registers the block under `name` with these defaults (the rest: DeltaRuleBlock.defaults)."""
    unknown = set(defaults) - set(DeltaRuleBlock.defaults)
    if unknown:
        raise ValueError(f"{name}: unknown settings {sorted(unknown)}")
    settings = ", ".join(f"{k}={v}" for k, v in defaults.items())
    cls = type(name, (DeltaRuleBlock,), {"defaults": {**DeltaRuleBlock.defaults, **defaults},
                                         "__doc__": f"Delta-rule block {name}: {settings or 'the defaults'}."})
    return register(name)(cls)


GatedDeltaNet = register_delta_block("gated_deltanet")
DeltaNet = register_delta_block("deltanet", gate=False)
DeltaProduct = register_delta_block("deltaproduct", householder=2, beta_max=2.0)
