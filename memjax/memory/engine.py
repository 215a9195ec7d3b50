"""The test-time memory engine: a memory whose weights are trained inside the forward pass.

Per head and token t, with k_t, v_t, q_t the token's key, value and query and theta_t, eta_t, alpha_t
its gates (step size, momentum, forgetting):

  u_t = grad_M l(M; k_t, v_t)                  the inner gradient ("surprise")
  S_t = eta_t S_{t-1} - theta_t u_t            momentum
  M_t = (1 - alpha_t) M_{t-1} + S_t            retention by weight decay
  y_t = M_t(q_t)  (read after write)  or  M_{t-1}(q_t)  (read before write)

with M an MLP of `depth` linear maps (depth 1: a linear memory), optionally in the residual form
x + LN(MLP(x)), and l the inner objective (`objective_value`).

Chunked parallel form. The sequence is cut into chunks of C tokens and inside a chunk every u_t is taken
at the chunk-start state M_0 (C = 1 is the exact recurrence). Then:

- Each u_t is a sum of outer products: for linear map l of the memory, u_t[l] = h_t[l]^T d_t[l], where
  h_t[l] is the map's input and d_t[l] the loss gradient at its output, both at M_0 for key k_t
  (`gradient_factors`).
- (S_t, M_t) is a linear function of (S_0, M_0, u_1..u_C); its coefficients follow a 2-state linear
  recurrence solved with jax.lax.associative_scan (`chunk_coefficients`), so
  M_t = A_t M_0 + B_t S_0 + sum_i G_ti u_i with scalars A, B and a lower-triangular C x C matrix G.
- Reading with those weights never forms them: h W_t = A_t (h W_0) + B_t (h S_0) + sum_i G_ti (h . h_i) d_i,
  matmuls against the chunk's factors only (`chunk_step`). The chunk-end state is formed once per chunk.

jax.lax.scan carries (M, S) over chunks, in remat groups of `remat_chunks` chunks, so the backward
stores one state per group. No per-token copy of the memory weights is ever materialised.

All functions here work on one sequence and one head; callers vmap over batch and heads.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp

ACTIVATIONS = {"gelu": partial(jax.nn.gelu, approximate=False), "silu": jax.nn.silu}
OBJECTIVES = ("l2",)
READS = ("after", "before")


@dataclasses.dataclass(frozen=True)
class Spec:
    """The engine's static choices (hashable: part of the jitted computation's structure)."""

    depth: int = 2  # linear maps in the memory; 1 = linear memory M(x) = x W
    expansion: int = 4  # hidden width of an MLP memory, in multiples of the head dim
    activation: str = "gelu"  # exact GELU (not the tanh approximation) or SiLU
    residual: bool = False  # M(x) = x + LN(MLP(x)), LN without parameters
    objective: str = "l2"
    read: str = "after"
    chunk: int = 16
    remat_chunks: int = 4  # chunks per rematerialisation group
    eps: float = 1e-6


def layer_shapes(spec: Spec, dim: int) -> list[tuple[int, int]]:
    """(in, out) of each linear map of a memory over `dim`-wide keys and values."""
    widths = [dim] + [dim * spec.expansion] * (spec.depth - 1) + [dim]
    return [(widths[i], widths[i + 1]) for i in range(spec.depth)]


def layer_norm(x, eps: float):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def memory_apply(spec: Spec, linear, x_CxD):
    """M(x), where `linear(l, h)` applies linear map l: the same code reads fixed weights, weights that
    change per token inside a chunk, and records the factors of the inner gradient."""
    h = x_CxD
    for layer in range(spec.depth):
        h = linear(layer, h)
        if layer < spec.depth - 1:
            h = ACTIVATIONS[spec.activation](h)
    if spec.residual:
        h = x_CxD + layer_norm(h, spec.eps)
    return h


def apply_fixed(spec: Spec, weights, x_CxD):
    return memory_apply(spec, lambda layer, h: h @ weights[layer], x_CxD)


def objective_value(spec: Spec, pred_CxD, target_CxD):
    """Per-token inner loss. "l2": 1/2 ||M(k) - v||^2 (the 1/2 makes theta the delta rule's beta)."""
    return 0.5 * jnp.sum((pred_CxD - target_CxD) ** 2, axis=-1)


def gradient_factors(spec: Spec, weights, k_CxD, v_CxD):
    """Inputs h[l] [C, in] and output gradients d[l] [C, out] of every linear map at `weights`, such that
    token i's inner gradient for map l is h[l][i]^T d[l][i]; and the per-token loss [C].

    d[l] is the gradient of the summed loss with respect to a zero perturbation added to map l's output:
    token i's loss depends only on its own perturbation, so row i is token i's own gradient.
    """

    def summed_loss(perturbations):
        inputs = []

        def linear(layer, h):
            inputs.append(h)
            return h @ weights[layer] + perturbations[layer]

        losses_C = objective_value(spec, memory_apply(spec, linear, k_CxD), v_CxD)
        return jnp.sum(losses_C), (inputs, losses_C)

    zeros = [jnp.zeros((k_CxD.shape[0], w.shape[1]), k_CxD.dtype) for w in weights]
    deltas, (inputs, losses_C) = jax.grad(summed_loss, has_aux=True)(zeros)
    return inputs, deltas, losses_C


def chunk_coefficients(lr_C, mom_C, keep_C):
    """Coefficients of S_t (row 0) and M_t (row 1) on (S_0, M_0, u_1, .., u_C), for t = 0..C: [C+1, 2, C+2].

    Token t maps (S, M) to (eta_t S - theta_t u_t, keep_t M + eta_t S - theta_t u_t), an affine map whose
    composition over the chunk is an associative scan of (2x2 matrix, 2 x (C+2) offset) pairs.
    """
    c = lr_C.shape[0]
    dtype = lr_C.dtype
    zero = jnp.zeros_like(mom_C)
    transition_Cx2x2 = jnp.stack([jnp.stack([mom_C, zero], -1), jnp.stack([mom_C, keep_C], -1)], -2)
    write_CxC = jnp.diag(-lr_C)  # token t writes -theta_t u_t into both S and M
    offset_Cx2xK = jnp.concatenate(
        [jnp.zeros((c, 2, 2), dtype), jnp.broadcast_to(write_CxC[:, None, :], (c, 2, c))], axis=-1
    )

    def compose(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return jnp.einsum("...ij,...jk->...ik", a2, a1), jnp.einsum("...ij,...jk->...ik", a2, b1) + b2

    prefix_Cx2x2, offsets_Cx2xK = jax.lax.associative_scan(compose, (transition_Cx2x2, offset_Cx2xK))
    start_2xK = jnp.zeros((2, c + 2), dtype).at[0, 0].set(1.0).at[1, 1].set(1.0)
    after_Cx2xK = jnp.einsum("cij,jk->cik", prefix_Cx2x2, start_2xK) + offsets_Cx2xK
    return jnp.concatenate([start_2xK[None], after_Cx2xK], axis=0)


def chunk_step(spec: Spec, weights, momentum, q_CxD, k_CxD, v_CxD, lr_C, mom_C, keep_C, with_after_loss=False):
    """One chunk from the chunk-start state: outputs [C, D], the chunk-end (weights, momentum) and stats."""
    inputs, deltas, loss_before_C = gradient_factors(spec, weights, k_CxD, v_CxD)
    coef = chunk_coefficients(lr_C, mom_C, keep_C)
    read = coef[1:, 1] if spec.read == "after" else coef[:-1, 1]  # M_t or M_{t-1} for token t: [C, C+2]
    from_s0, from_m0, from_u = read[:, 0:1], read[:, 1:2], read[:, 2:]

    def linear(layer, h_CxI):
        similarity_CxC = h_CxI @ inputs[layer].T
        return (
            from_m0 * (h_CxI @ weights[layer])
            + from_s0 * (h_CxI @ momentum[layer])
            + (from_u * similarity_CxC) @ deltas[layer]
        )

    y_CxD = memory_apply(spec, linear, q_CxD)
    end_s, end_m = coef[-1, 0], coef[-1, 1]

    def state_at_end(row):
        return [
            row[1] * w + row[0] * s + h.T @ (row[2:, None] * d)
            for w, s, h, d in zip(weights, momentum, inputs, deltas)
        ]

    new_weights, new_momentum = state_at_end(end_m), state_at_end(end_s)
    stats = {"loss_before": jnp.mean(loss_before_C)}
    if with_after_loss:
        stats["loss_after"] = jnp.mean(objective_value(spec, apply_fixed(spec, new_weights, k_CxD), v_CxD))
    return y_CxD, new_weights, new_momentum, stats


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def scan_chunks(spec: Spec, weights, momentum, streams, full_N, with_after_loss=False):
    """Runs N chunks for a batch of sequences and heads.

    weights / momentum: lists of [B, H, in, out]; streams: q, k, v [B, H, N*C, D] and lr, mom, keep
    [B, H, N*C]; full_N: bool [N], whether chunk n is complete (an incomplete chunk is read but its end
    state is not kept). Returns y [B, H, N*C, D], the state after the last complete chunk, and stats
    (each [N], averaged over batch and heads).
    """
    c = spec.chunk
    n = full_N.shape[0]

    def per_chunk(x):  # [B, H, N*C, ...] -> [N, B, H, C, ...]
        x = x.reshape(*x.shape[:2], n, c, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    xs = {name: per_chunk(x) for name, x in streams.items()}
    step = partial(chunk_step, spec, with_after_loss=with_after_loss)
    step_bh = jax.vmap(jax.vmap(step))

    def one_chunk(state, chunk):
        inputs, full = chunk
        weights, momentum = state
        y, new_w, new_s, stats = step_bh(
            weights, momentum, inputs["q"], inputs["k"], inputs["v"], inputs["lr"], inputs["mom"], inputs["keep"]
        )
        keep_new = lambda new, old: [jnp.where(full, a, b) for a, b in zip(new, old)]
        stats = jax.tree_util.tree_map(jnp.mean, stats)
        return (keep_new(new_w, weights), keep_new(new_s, momentum)), (y, stats)

    group = _largest_divisor_at_most(n, spec.remat_chunks)

    @jax.checkpoint
    def one_group(state, chunks):
        return jax.lax.scan(one_chunk, state, chunks)

    grouped = jax.tree_util.tree_map(lambda x: x.reshape(n // group, group, *x.shape[1:]), (xs, full_N))
    (weights, momentum), (y, stats) = jax.lax.scan(one_group, (weights, momentum), grouped)
    y = y.reshape(n, *y.shape[2:])  # [N, B, H, C, D]
    y = jnp.moveaxis(y, 0, 2).reshape(*y.shape[1:3], n * c, y.shape[-1])
    stats = jax.tree_util.tree_map(lambda s: s.reshape(n), stats)
    return y, weights, momentum, stats


def num_chunks(length: int, chunk: int) -> int:
    return max(1, math.ceil(length / chunk))


def forward_flops_per_token(spec: Spec, dim: int) -> float:
    """Forward FLOPs per token and head of the chunked algorithm (for analytic MFU): the keys' forward
    and backward at the chunk-start state, the read (two matmuls against the state, the chunk's
    similarities and mixing), the chunk-end state (weights and momentum) and the coefficient scan."""
    c = spec.chunk
    total = 0.0
    for fan_in, fan_out in layer_shapes(spec, dim):
        total += 2 * fan_in * fan_out * 2  # keys: forward, and backward to the map's input
        total += 2 * fan_in * fan_out * 2 + 2 * c * (fan_in + fan_out)  # read
        total += 2 * fan_in * fan_out * 2  # chunk-end weights and momentum, amortised over C tokens
    return total + 8.0 * (c + 2) * math.log2(max(c, 2))
