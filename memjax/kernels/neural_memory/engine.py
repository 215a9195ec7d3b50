"""The test-time memory engine: a memory whose weights are trained inside the forward pass.

Per head and token t, with k_t, v_t, q_t the token's key, value and query, theta_t, eta_t, alpha_t its
gates (step size, momentum, forgetting) and keep_t = 1 - alpha_t:

  u_t = sum_{i = t-c+1..t} gamma_i grad_W l(M; k_i, v_i)   the inner gradient over the Omega window
                                                            (c = 1, gamma = 1: the online rule)
  S_t = eta_t S_{t-1} - theta_t u_t                          momentum (eta = 0: plain gradient descent)
  A_t = keep_t A_{t-1} + S_t                                 retention by decay
  y_t = M_{W_t}(q_t)  (read after write)  or  M_{W_{t-1}}(q_t)  (read before write)

where the memory's weights W are its state A itself ("decay" retention, Titans), A rescaled by
||A||_q^(q-2) ("qnorm", Moneta; the scale is refreshed at chunk boundaries) or softmax(A) along each
row ("softmax", Memora's KL retention: A is the log-weights, shift-invariance makes the log-space
update linear). With the "muon" optimizer (ATLAS) the update is instead
  S_t = eta_t S_{t-1} - u_t,  A_t = keep_t A_{t-1} + theta_t NS_k(S_t)
with NS_k k Newton-Schulz iterations. M is an MLP (`depth` linear maps; 1 = a linear memory) or the
gated MLP W1(s(W2 x) * W3 x), optionally residual (x + f(x), or x + LN(f(x))). Objectives: see
`objective_value`.

Chunked parallel form. The sequence is cut into chunks of C tokens; inside a chunk every gradient is
taken at the chunk-start state (C = 1 is the exact recurrence). Then:

- Token i's gradient for linear map l of the memory is an outer product h_i[l]^T d_i[l] of the map's
  input and the loss gradient at its output, both at the chunk-start weights (`gradient_factors`),
  for the chunk's tokens and the c - 1 before it (the Omega window).
- (S_t, A_t) is linear in (S_0, A_0, g_1..g_K): coefficients from a 2-state linear recurrence solved
  with jax.lax.associative_scan (`chunk_coefficients`); the Omega window is a banded write matrix.
- Linear path (decay, qnorm; GD or momentum): reading never forms per-token weights:
  h W_t = a_t (h A_0) + b_t (h S_0) + sum_i G_ti (h . h_i) d_i: matmuls against the chunk's factors
  (`chunk_step_linear`, also the body of the fused kernels of memjax.kernels.neural_memory). The
  chunk-end state is formed once per chunk.
- Muon with ns_form="gram" (ATLAS, decay or qnorm retention; `chunk_step_muon`): W_t = a_t A_0 + sum_s w_ts NS(S_s) is
  non-linear in the gradients only through NS, and NS(S) = S P(S^T S) for a matrix polynomial P, so
  per token only the Gram of S_t over the smaller side ([m, m], m = min(in, out)) is formed, from the
  chunk's gradient factors, and Newton-Schulz runs on the Gram (`newton_schulz_gram`): the reads and
  the chunk-end state contract the factors, never forming a per-token [in, out] matrix. This is the
  paper's per-token form (NS of every token's momentum; ATLAS's parallel training computes exactly
  these), with O(K (in + out) m + m^3) work per token instead of O(K in out + m^2 max(in, out)).
  The Gram squares the update's condition number: float32 rounding in a direction of singular value
  sigma grows as eps / sigma^2, not eps / sigma (at ATLAS's benchmark shapes 3e-5 of the outputs'
  scale against float64, where "matrix" stays within 2e-6), for about 4x fewer FLOPs. It is the
  default; "matrix" (below) keeps the digits.
- Materialised path (softmax retention, Memora): softmax(A_t) is non-linear in every entry, so every
  token's state is formed (by the recurrence itself, O(c in out) per token) and read through its
  softmax, token by token inside the chunk (`chunk_step_softmax`). Muon with ns_form="matrix" or with
  softmax retention forms each token's S_t and orthogonalises it (Newton-Schulz on all C in parallel,
  `chunk_step_materialised`).

jax.lax.scan carries the state over chunks, in remat groups of `remat_chunks` chunks, so the backward
stores one state per group. All functions work on one sequence and one head; callers vmap.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp


def gelu(x) -> jax.Array:
    """Exact GELU x Phi(x), through erf: Mosaic (the TPU kernels) lowers erf, not the erfc of jax.nn.gelu.
    The two differ by rounding only (at most 1e-6 in float32, where 1 + erf cancels for x << 0)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


ACTIVATIONS = {"gelu": gelu, "silu": jax.nn.silu}
OBJECTIVES = ("l2", "lp", "huber", "dot")
READS = ("after", "before")
OPTIMIZERS = ("gd", "momentum", "muon")
RETENTIONS = ("decay", "qnorm", "softmax")
NS_FORMS = ("matrix", "gram")
MEMORIES = ("mlp", "gated")
RESIDUALS = ("none", "add", "norm")
# Muon's quintic Newton-Schulz coefficients (Jordan et al. 2024): fast to singular values in about [0.7, 1.2].
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The engine's static choices (hashable: part of the jitted computation's structure)."""

    memory: str = "mlp"
    depth: int = 2  # linear maps of an "mlp" memory; 1 = linear memory M(x) = x W
    expansion: int = 4  # hidden width, in multiples of the value width
    activation: str = "gelu"  # exact GELU (not the tanh approximation) or SiLU
    residual: str = "none"  # "add": x + f(x); "norm": x + LN(f(x)), LN without parameters
    objective: str = "l2"
    p: float = 3.0  # exponent of the "lp" objective
    window: int = 1  # Omega window c
    optimizer: str = "momentum"
    ns_steps: int = 5
    # Muon's Newton-Schulz on the Gram of each token's update, from the chunk's factors ("gram",
    # `chunk_step_muon`: about 4x fewer FLOPs at ATLAS's widths; float32 rounding in a singular direction
    # grows as eps / sigma^2 instead of eps / sigma, so ill-conditioned updates lose digits), or on the
    # formed update ("matrix": the digits kept, at the FLOP cost).
    ns_form: str = "gram"
    retention: str = "decay"
    q: float = 4.0  # exponent of "qnorm" retention
    read: str = "after"
    chunk: int = 16
    remat_chunks: int = 4  # chunks per rematerialisation group
    eps: float = 1e-6

    @property
    def materialised(self) -> bool:
        """Not the linear path: per-token weights (softmax retention) or per-token Grams (muon)."""
        return self.optimizer == "muon" or self.retention == "softmax"

    @property
    def window_streams(self) -> tuple[str, ...]:
        """Per-token streams read over the Omega window (the rest are read for the chunk's tokens)."""
        return ("k", "v", "gamma") + (("delta",) if self.objective == "huber" else ())


def layer_shapes(spec: Spec, in_dim: int, out_dim: int | None = None) -> list[tuple[int, int]]:
    """(in, out) of each linear map of a memory from `in_dim` features to `out_dim` values."""
    out_dim = in_dim if out_dim is None else out_dim
    hidden = out_dim * spec.expansion
    if spec.memory == "gated":
        return [(in_dim, hidden), (in_dim, hidden), (hidden, out_dim)]
    widths = [in_dim] + [hidden] * (spec.depth - 1) + [out_dim]
    return [(widths[i], widths[i + 1]) for i in range(spec.depth)]


def layer_norm(x, eps: float) -> jax.Array:
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def memory_apply(spec: Spec, linear, x_CxI) -> jax.Array:
    """M(x), where `linear(l, h)` applies linear map l: the same code reads fixed weights, weights that
    change per token inside a chunk, and records the factors of the inner gradient. The residual adds
    the input's first out-width features (all of them when no feature map widens the keys)."""
    act = ACTIVATIONS[spec.activation]
    if spec.memory == "gated":
        h = linear(2, act(linear(0, x_CxI)) * linear(1, x_CxI))
    else:
        h = x_CxI
        for layer in range(spec.depth):
            h = linear(layer, h)
            if layer < spec.depth - 1:
                h = act(h)
    if spec.residual != "none":
        # Sliced only where a feature map widens the input (kernel bodies may not slice values).
        skip = x_CxI if x_CxI.shape[-1] == h.shape[-1] else x_CxI[..., : h.shape[-1]]
        h = skip + (layer_norm(h, spec.eps) if spec.residual == "norm" else h)
    return h


def apply_fixed(spec: Spec, weights, x_CxI) -> jax.Array:
    return memory_apply(spec, lambda layer, h: h @ weights[layer], x_CxI)


def objective_value(spec: Spec, pred_CxD, target_CxD, delta_C=None) -> jax.Array:
    """Per-token inner loss ("attentional bias"):
    l2: 1/2 ||r||^2 (the 1/2 makes theta the delta rule's beta), r = M(k) - v;
    lp: 1/p sum_j (r_j^2 + eps)^(p/2), a smooth |r|^p (Moneta; p = 2 gives l2's gradient exactly);
    huber: 1/2 ||r||^2 where ||r|| <= delta_t, else delta_t (||r|| - delta_t / 2) (Yaad);
    dot: -<M(k), v>, whose gradient step is the Hebbian write (linear attention, DeepTransformers)."""
    r = pred_CxD - target_CxD
    if spec.objective == "lp":
        return jnp.sum((r * r + spec.eps) ** (spec.p / 2), axis=-1) / spec.p
    if spec.objective == "huber":
        squared = jnp.sum(r * r, axis=-1)
        norm = jnp.sqrt(squared + spec.eps)
        return jnp.where(norm <= delta_C, 0.5 * squared, delta_C * (norm - 0.5 * delta_C))
    if spec.objective == "dot":
        return -jnp.sum(pred_CxD * target_CxD, axis=-1)
    return 0.5 * jnp.sum(r * r, axis=-1)


def gradient_factors(spec: Spec, weights, k_KxI, v_KxD,
                     delta_K=None) -> tuple[list[jax.Array], list[jax.Array], jax.Array]:
    """Inputs h[l] [K, in] and output gradients d[l] [K, out] of every linear map at `weights`, such that
    token i's inner gradient for map l is h[l][i]^T d[l][i]; and the per-token loss [K].

    d[l] is the gradient of the summed loss with respect to a zero perturbation added to map l's output:
    token i's loss depends only on its own perturbation, so row i is token i's own gradient.
    """

    def summed_loss(perturbations):
        inputs = []

        def linear(layer, h):
            inputs.append(h)
            return h @ weights[layer] + perturbations[layer]

        losses_K = objective_value(spec, memory_apply(spec, linear, k_KxI), v_KxD, delta_K)
        return jnp.sum(losses_K), (inputs, losses_K)

    zeros = [jnp.zeros((k_KxI.shape[0], w.shape[1]), k_KxI.dtype) for w in weights]
    deltas, (inputs, losses_K) = jax.grad(summed_loss, has_aux=True)(zeros)
    return inputs, deltas, losses_K


def chunk_coefficients(lr_C, mom_C, keep_C, write_CxK=None) -> jax.Array:
    """Coefficients of S_t (row 0) and A_t (row 1) on (S_0, A_0, g_1, .., g_K), t = 0..C: [C+1, 2, K+2].

    Token t maps (S, A) to (eta_t S + w_t . g, keep_t A + eta_t S + w_t . g), with write row w_t
    (default -theta_t on the token's own gradient): an affine map whose composition over the chunk
    is an associative scan of (2x2 matrix, 2 x (K+2) offset) pairs.
    """
    c = mom_C.shape[0]
    dtype = mom_C.dtype
    write_CxK = jnp.diag(-lr_C) if write_CxK is None else write_CxK
    k = write_CxK.shape[1]
    zero = jnp.zeros_like(mom_C)
    transition_Cx2x2 = jnp.stack([jnp.stack([mom_C, zero], -1), jnp.stack([mom_C, keep_C], -1)], -2)
    offset_Cx2xK = jnp.concatenate(
        [jnp.zeros((c, 2, 2), dtype), jnp.broadcast_to(write_CxK[:, None, :], (c, 2, k))], axis=-1
    )

    def compose(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return jnp.einsum("...ij,...jk->...ik", a2, a1), jnp.einsum("...ij,...jk->...ik", a2, b1) + b2

    prefix_Cx2x2, offsets_Cx2xK = jax.lax.associative_scan(compose, (transition_Cx2x2, offset_Cx2xK))
    start_2xK = jnp.zeros((2, k + 2), dtype).at[0, 0].set(1.0).at[1, 1].set(1.0)
    after_Cx2xK = jnp.einsum("cij,jk->cik", prefix_Cx2x2, start_2xK) + offsets_Cx2xK
    return jnp.concatenate([start_2xK[None], after_Cx2xK], axis=0)


def newton_schulz(x_IxO, steps: int, eps: float = 1e-7) -> jax.Array:
    """k iterations of Muon's quintic Newton-Schulz map: an odd matrix polynomial of x / ||x||_F that
    pushes every singular value towards 1 (about [0.7, 1.2] after 5 steps), keeping the singular vectors."""
    a, b, c = NS_COEFFICIENTS
    tall = x_IxO.shape[0] > x_IxO.shape[1]
    x = x_IxO.T if tall else x_IxO
    x = x * jax.lax.rsqrt(jnp.sum(x * x) + eps)  # smooth at x = 0 (a zero update's gradient is finite)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def newton_schulz_gram(gram_xMxM, steps: int, eps: float = 1e-7) -> tuple[jax.Array, jax.Array]:
    """`newton_schulz` from the Gram matrix alone: for x of shape [m, n] (m <= n) and G = x x^T [m, m]
    (batched over leading axes), (nu, Q) such that NS_k(x) = nu Q x.

    Each step maps x to P(G) x, P = a + bG + cG^2 (a polynomial in G), so every iterate is Q x0 and its
    Gram is P G P^T: the k steps run on [m, m] matrices (4k - 3 matmuls of 2 m^3 FLOPs in all) instead
    of on x (2 m^2 n each for the Gram and for P x), and x itself is never formed when its Gram has a
    cheaper factored form (`chunk_step_muon`)."""
    a, b, c = NS_COEFFICIENTS
    nu = jax.lax.rsqrt(jnp.trace(gram_xMxM, axis1=-2, axis2=-1) + eps)
    g = gram_xMxM * (nu * nu)[..., None, None]
    eye = jnp.eye(g.shape[-1], dtype=g.dtype)
    q = jnp.broadcast_to(eye, g.shape)
    for step in range(steps):
        p = a * eye + b * g + c * (g @ g)
        q = p if step == 0 else p @ q
        if step < steps - 1:
            g = p @ g @ jnp.swapaxes(p, -1, -2)
    return nu, q


def muon_decay(keep_C, lr_C) -> tuple[jax.Array, jax.Array]:
    """Muon's A_t = a_t A_0 + sum_s w_ts NS(S_s) within a chunk: a [C] and w [C, C] (w_ts = theta_s
    prod_{s < j <= t} keep_j for s <= t, else 0)."""
    c = keep_C.shape[0]
    # The products as masked sums of logs: no cancellation, and keep = 0 (padding, or forgetting
    # everything) stays finite in the backward.
    log_keep_C = jnp.log(jnp.maximum(keep_C, jnp.finfo(keep_C.dtype).tiny))
    t, s, j = jnp.arange(c)[:, None, None], jnp.arange(-1, c)[None, :, None], jnp.arange(c)[None, None, :]
    log_decay = jnp.sum(jnp.where((s < j) & (j <= t), log_keep_C, 0.0), axis=-1)  # [C, 1 + C]; s = -1: A_0
    decay = jnp.where(s[..., 0] <= t[..., 0], jnp.exp(log_decay), 0.0)
    return decay[:, 0], decay[:, 1:] * lr_C[None, :]


def chunk_step_muon(spec: Spec, state, momentum, inputs, deltas, coef, chunk) -> tuple[jax.Array, Any, Any]:
    """The materialised path for the "muon" optimizer (ATLAS) without materialising: outputs [C, D] and
    the chunk-end (state, momentum), equal to forming every token's momentum S_t, orthogonalising it and
    reading with A_t = decay A_0 + sum_s decay_ts theta_s NS(S_s) (the paper's per-token form).

    Per map, in the orientation where S is tall (X [n, m], m = min(in, out), X = S or S^T):
    X_t = s_t X_0 + F^T R_t E, with F [K, n], E [K, m] the gradient factors and R_t = diag(row t of the
    write coefficients). Its Gram X_t^T X_t [m, m] is formed from the chunk's small products (X_0^T X_0,
    F X_0, F F^T) in O(K m^2) per token, Newton-Schulz runs on the Gram (`newton_schulz_gram`, NS(X_t) =
    nu_t X_t Q_t^T), and reads and the chunk-end state contract the factors of X_t with the read input
    instead of forming X_t: no [C, in, out] tensor, and O(K (in + out) + m^3) work per token, not
    O(K in out) for forming and O(m^2 max(in, out)) per Newton-Schulz step.
    """
    rows_CxK2 = coef[1:, 0]  # S_t on (S_0, A_0, g): the A_0 column is exactly zero (S never reads A)
    s_C, r_CxK = rows_CxK2[:, 0], rows_CxK2[:, 2:]
    a0_C, written_CxC = muon_decay(chunk["keep"], chunk["lr"])
    if spec.read == "before":  # token t reads A_{t-1}: the rows shifted down, A_0 for the first
        read_a0 = jnp.concatenate([jnp.ones_like(a0_C[:1]), a0_C[:-1]])
        read_written = jnp.concatenate([jnp.zeros_like(written_CxC[:1]), written_CxC[:-1]])
    else:
        read_a0, read_written = a0_C, written_CxC

    # qnorm divides every token's weights by the chunk-start state's scale (`effective_weights`).
    scales = [qnorm_scale(spec, a) for a in state] if spec.retention == "qnorm" else [1.0] * len(state)
    maps = []
    for a, s0, h, d in zip(state, momentum, inputs, deltas):
        tall = a.shape[0] > a.shape[1]  # newton_schulz's orientation: its Gram is over the smaller side
        x0, f, e = (s0, h, d) if tall else (s0.T, d, h)
        fx0_KxM = f @ x0
        cross_CxKxM = s_C[:, None, None] * fx0_KxM[None] + jnp.einsum("kj,tj,jm->tkm", f @ f.T, r_CxK, e)
        gram_CxMxM = (
            (s_C * s_C)[:, None, None] * (x0.T @ x0)[None]
            + jnp.einsum("t,km,tk,kp->tmp", s_C, fx0_KxM, r_CxK, e)
            + jnp.einsum("km,tk,tkp->tmp", e, r_CxK, cross_CxKxM)
        )
        nu_C, q_CxMxM = newton_schulz_gram(gram_CxMxM, spec.ns_steps)
        maps.append((tall, x0, f, e, nu_C, q_CxMxM))

    def linear(layer, h_CxI):
        tall, x0, f, e, nu_C, q_CxMxM = maps[layer]
        mix_CxC = read_written * nu_C[None, :]
        if tall:  # h meets X's long side: (h X_s) Q_s^T with h X_s = s_s (h X_0) + sum_k r_sk (h . F_k) E_k
            hx_CxCxM = (s_C[None, :, None] * (h_CxI @ x0)[:, None, :]
                        + jnp.einsum("tk,sk,km->tsm", h_CxI @ f.T, r_CxK, e))
            read = jnp.einsum("ts,tsm,spm->tp", mix_CxC, hx_CxCxM, q_CxMxM)
        else:  # h meets the short side: (h Q_s) X_s^T = s_s (h Q_s) X_0^T + sum_k r_sk ((h Q_s) . E_k) F_k
            hq_CxCxM = jnp.einsum("ti,sim->tsm", h_CxI, q_CxMxM)
            read = (jnp.einsum("ts,tsm->tm", mix_CxC * s_C[None, :], hq_CxCxM) @ x0.T
                    + jnp.einsum("ts,sk,tsm,km->tk", mix_CxC, r_CxK, hq_CxCxM, e) @ f)
        return (read_a0[:, None] * (h_CxI @ state[layer]) + read) / scales[layer]

    y_CxD = memory_apply(spec, linear, chunk["q"])
    new_state = []
    for a, (tall, x0, f, e, nu_C, q_CxMxM) in zip(state, maps):
        end_C = written_CxC[-1] * nu_C
        end = (x0 @ jnp.einsum("s,spm->mp", end_C * s_C, q_CxMxM)
               + f.T @ jnp.einsum("s,sk,km,spm->kp", end_C, r_CxK, e, q_CxMxM))
        new_state.append(a0_C[-1] * a + (end if tall else end.T))
    end_rows = {"s0": coef[-1:, 0, 0:1], "a0": coef[-1:, 0, 1:2], "g": coef[-1:, 0, 2:]}
    return y_CxD, new_state, _combine(end_rows, state, momentum, inputs, deltas)


def effective_weights(spec: Spec, state, scale_from=None) -> list[jax.Array]:
    """The memory's weights from its state A (per map). qnorm divides by the scale of `scale_from`
    (default: the state itself); inside a chunk that is the chunk-start state."""
    if spec.retention == "softmax":
        return [jax.nn.softmax(a, axis=-1) for a in state]
    if spec.retention == "qnorm":
        scale_from = state if scale_from is None else scale_from
        return [a / qnorm_scale(spec, b) for a, b in zip(state, scale_from)]
    return list(state)


def qnorm_scale(spec: Spec, a) -> jax.Array:
    """||A||_q^(q-2) (entrywise q-norm), Moneta's normaliser, as a [1, 1] array (kernels lower vector
    powers, not scalar ones)."""
    norm = jnp.sum((a * a + spec.eps) ** (spec.q / 2), keepdims=True) ** (1.0 / spec.q)
    return norm ** (spec.q - 2)


def write_matrix(spec: Spec, lr_C, gamma_K) -> jax.Array:
    """Row t: the coefficients of the K = C + c - 1 window gradients in token t's write (-theta_t gamma_i
    over the c tokens ending at t; muon's momentum takes the gradients unscaled: -gamma_i)."""
    c, window = lr_C.shape[0], spec.window
    t, i = jnp.arange(c)[:, None], jnp.arange(c + window - 1)[None, :]
    band_CxK = ((i >= t) & (i <= t + window - 1)).astype(gamma_K.dtype) * gamma_K[None, :]
    scale = jnp.ones_like(lr_C) if spec.optimizer == "muon" else lr_C
    return -scale[:, None] * band_CxK


def chunk_step(spec: Spec, state, momentum, chunk,
               with_after_loss=False) -> tuple[jax.Array, Any, Any, dict[str, jax.Array]]:
    """One chunk from the chunk-start state: outputs [C, D], the chunk-end (state, momentum) and stats.

    chunk: q [C, I], lr / mom / keep [C]; k [K, I], v [K, D], gamma [K] (and delta [K]) over the
    window-extended chunk (the c - 1 tokens before it, then its C tokens).
    """
    coef = chunk_gates(spec, chunk)
    if spec.materialised:
        weights = effective_weights(spec, state)
        inputs, deltas, losses_K = gradient_factors(spec, weights, chunk["k"], chunk["v"], chunk.get("delta"))
        y_CxD, new_state, new_momentum = chunk_step_materialised(spec, state, weights, momentum, inputs, deltas, coef,
                                                                 chunk)
    else:
        y_CxD, new_state, new_momentum, losses_K = chunk_step_linear(spec, state, momentum, chunk,
                                                                     linear_coefficients(spec, coef))
    stats = {"loss_before": chunk_loss(spec, losses_K)}
    if with_after_loss:
        window = spec.window - 1
        after = apply_fixed(spec, effective_weights(spec, new_state), chunk["k"][window:])
        stats["loss_after"] = jnp.mean(objective_value(spec, after, chunk["v"][window:], _tail(chunk, window)))
    return y_CxD, new_state, new_momentum, stats


def chunk_gates(spec: Spec, chunk) -> jax.Array:
    """The chunk's (S_t, A_t) coefficients [C+1, 2, K+2] (`chunk_coefficients`): gates only, no state."""
    mom = jnp.zeros_like(chunk["mom"]) if spec.optimizer == "gd" else chunk["mom"]
    return chunk_coefficients(chunk["lr"], mom, chunk["keep"], write_matrix(spec, chunk["lr"], chunk["gamma"]))


def chunk_loss(spec: Spec, losses_K) -> jax.Array:
    """Mean inner loss over the chunk's own tokens (not the window's earlier ones): a mask, not a slice,
    so that kernel bodies can use it."""
    own_K = jnp.arange(losses_K.shape[0]) >= spec.window - 1
    return jnp.sum(jnp.where(own_K, losses_K, 0.0)) / (losses_K.shape[0] - spec.window + 1)


def _tail(chunk, window):
    return chunk["delta"][window:] if "delta" in chunk else None


def linear_rows(spec: Spec, coef) -> jax.Array:
    """The rows of `coef` that the linear path uses, [C + 2, K + 2]: for each token the coefficients of
    the state it reads (A_t, or A_{t-1} when reading before the write), then those of the chunk-end A_C
    and S_C. Columns: S_0, A_0, then the window's gradients."""
    read = coef[1:, 1] if spec.read == "after" else coef[:-1, 1]
    return jnp.concatenate([read, coef[-1:, 1], coef[-1:, 0]], axis=0)


def linear_rows_layout(c: int) -> dict:
    """Where the pieces of `linear_rows` sit, by what they multiply: "read" s0, a0 [C, 1], g [C, K];
    "state" / "momentum" (A_C / S_C) s0, a0 [1, 1], g [1, K]. Index tuples, so that kernels read the
    pieces straight from a ref."""
    piece = lambda rows: {"s0": (rows, slice(0, 1)), "a0": (rows, slice(1, 2)), "g": (rows, slice(2, None))}
    return {"read": piece(slice(0, c)), "state": piece(slice(c, c + 1)), "momentum": piece(slice(c + 1, c + 2))}


def split_linear_rows(rows, c: int) -> dict:
    return jax.tree_util.tree_map(lambda index: rows[index], linear_rows_layout(c),
                                  is_leaf=lambda x: isinstance(x, tuple))


def linear_coefficients(spec: Spec, coef) -> dict:
    """`linear_rows` split into its pieces (`linear_rows_layout`): what `chunk_step_linear` takes."""
    return split_linear_rows(linear_rows(spec, coef), coef.shape[0] - 1)


def _combine(rows, state, momentum, inputs, deltas):
    """sum of the coefficients times (S_0, A_0, g_1..g_K), per map, without per-token copies."""
    return [rows["a0"] * a + rows["s0"] * s + (h.T * rows["g"]) @ d
            for a, s, h, d in zip(state, momentum, inputs, deltas)]


def chunk_step_linear(spec: Spec, state, momentum, chunk, coef) -> tuple[jax.Array, Any, Any, jax.Array]:
    """The linear path (decay or qnorm retention; GD or momentum) from the chunk-start (state, momentum):
    outputs [C, D], the chunk-end (state, momentum) and the per-token inner loss [K] at the chunk start.
    `coef`: `linear_coefficients`. Matmuls and elementwise ops only: the body of the fused kernels."""
    weights = effective_weights(spec, state)
    inputs, deltas, losses_K = gradient_factors(spec, weights, chunk["k"], chunk["v"], chunk.get("delta"))
    read = coef["read"]
    scales = [qnorm_scale(spec, a) for a in state] if spec.retention == "qnorm" else [1.0] * len(state)

    def linear(layer, h_CxI):
        similarity_CxK = h_CxI @ inputs[layer].T
        mixed = (
            read["a0"] * (h_CxI @ state[layer])
            + read["s0"] * (h_CxI @ momentum[layer])
            + (read["g"] * similarity_CxK) @ deltas[layer]
        )
        return mixed / scales[layer]

    y_CxD = memory_apply(spec, linear, chunk["q"])
    new_state = _combine(coef["state"], state, momentum, inputs, deltas)
    new_momentum = _combine(coef["momentum"], state, momentum, inputs, deltas)
    return y_CxD, new_state, new_momentum, losses_K


def chunk_end_state(spec: Spec, state, momentum, chunk) -> tuple[Any, Any]:
    """The chunk-end (state, momentum) of the linear path without reading the memory (for memories whose
    reads a caller makes elsewhere, e.g. at the chunk-start state: memjax.memory.hope). `chunk` as for
    `chunk_step`, without "q"."""
    if spec.materialised:
        raise ValueError("chunk_end_state runs the linear path (decay or qnorm retention; gd or momentum)")
    inputs, deltas, _ = gradient_factors(spec, effective_weights(spec, state), chunk["k"], chunk["v"],
                                         chunk.get("delta"))
    rows = linear_coefficients(spec, chunk_gates(spec, chunk))
    return (_combine(rows["state"], state, momentum, inputs, deltas),
            _combine(rows["momentum"], state, momentum, inputs, deltas))


def _per_token(rows_CxK2, start, momentum, inputs, deltas):
    """[C, in, out] per map: row t's combination of (S_0, A_0, g) formed for every token of the chunk."""
    return [
        rows_CxK2[:, 1, None, None] * a + rows_CxK2[:, 0, None, None] * s
        + jnp.einsum("tk,ki,ko->tio", rows_CxK2[:, 2:], h, d)
        for a, s, h, d in zip(start, momentum, inputs, deltas)
    ]


@jax.custom_vjp
def softmax_read(a_IxO, x_I) -> jax.Array:
    """x softmax(A), the softmax along each row: one token's read of a softmax-retained memory (Memora).
    The row sums divide x, not every entry. The VJP (closed-form softmax Jacobian) recomputes the
    exponentials from A instead of storing them: chunks are rematerialised anyway, and it made Memora's
    train step 1.3x faster than the autodiff of these steps."""
    e_IxO = _shifted_exp(a_IxO)
    return (x_I / jnp.sum(e_IxO, axis=-1)) @ e_IxO


def _shifted_exp(a_IxO) -> jax.Array:
    """exp(A - the row maxima): softmax's numerator, finite for any A."""
    return jnp.exp(a_IxO - jnp.max(a_IxO, axis=-1, keepdims=True))


def _softmax_read_fwd(a_IxO, x_I):
    return softmax_read(a_IxO, x_I), (a_IxO, x_I)


def _softmax_read_bwd(residuals, dy_O):
    a_IxO, x_I = residuals
    e_IxO = _shifted_exp(a_IxO)
    w_IxO = e_IxO / jnp.sum(e_IxO, axis=-1, keepdims=True)
    dx_I = w_IxO @ dy_O  # each row's softmax-weighted output gradient, also the Jacobian's centring term
    return x_I[:, None] * w_IxO * (dy_O[None, :] - dx_I[:, None]), dx_I


softmax_read.defvjp(_softmax_read_fwd, _softmax_read_bwd)


def chunk_step_softmax(spec: Spec, state, momentum, inputs, deltas, chunk) -> tuple[jax.Array, Any, Any]:
    """Softmax retention (Memora) with gd or momentum: outputs [C, D] and the chunk-end (state, momentum).
    Per map, token by token, the recurrence itself (S_t = eta_t S_{t-1} + the token's window of rank-1
    writes, A_t = keep_t A_{t-1} + S_t: O(c in out) per token, where a closed form would contract all K
    gradients for every token) and the token's read of softmax(A_t) (`softmax_read`), so that neither
    a [C, in, out] stack of states nor one of softmax weights is formed (1.8x faster than forming them)."""
    write_CxK = write_matrix(spec, chunk["lr"], chunk["gamma"])
    mom_C = jnp.zeros_like(chunk["mom"]) if spec.optimizer == "gd" else chunk["mom"]
    ends = {}

    def linear(layer, x_CxI):
        a, s, h, d = state[layer], momentum[layer], inputs[layer], deltas[layer]
        reads = []
        for t in range(write_CxK.shape[0]):
            if spec.read == "before":
                reads.append(softmax_read(a, x_CxI[t]))
            band = slice(t, t + spec.window)
            s = mom_C[t] * s + (h[band].T * write_CxK[t, band]) @ d[band]
            a = chunk["keep"][t] * a + s
            if spec.read == "after":
                reads.append(softmax_read(a, x_CxI[t]))
        ends[layer] = (a, s)
        return jnp.stack(reads)

    y_CxD = memory_apply(spec, linear, chunk["q"])
    layers = range(len(state))
    return y_CxD, [ends[layer][0] for layer in layers], [ends[layer][1] for layer in layers]


def chunk_step_materialised(spec: Spec, state, weights, momentum, inputs, deltas, coef,
                            chunk) -> tuple[jax.Array, Any, Any]:
    if spec.optimizer == "muon" and spec.retention != "softmax" and spec.ns_form == "gram":
        return chunk_step_muon(spec, state, momentum, inputs, deltas, coef, chunk)
    if spec.optimizer != "muon":
        return chunk_step_softmax(spec, state, momentum, inputs, deltas, chunk)
    # Muon with ns_form="matrix", or with softmax retention: each token's update formed and orthogonalised.
    s_t = _per_token(coef[1:, 0], state, momentum, inputs, deltas)
    orthogonal = [jax.vmap(partial(newton_schulz, steps=spec.ns_steps))(s) for s in s_t]
    a0_C, written_CxC = muon_decay(chunk["keep"], chunk["lr"])
    a_t = [a0_C[:, None, None] * a + jnp.einsum("ts,sio->tio", written_CxC, n) for a, n in zip(state, orthogonal)]
    new_momentum = [x[-1] for x in s_t]
    new_state = [x[-1] for x in a_t]
    w_t = [jax.vmap(lambda a, a0=a0: effective_weights(spec, [a], [a0])[0])(x) for x, a0 in zip(a_t, state)]
    if spec.read == "before":
        w_t = [jnp.concatenate([w[None], x[:-1]], axis=0) for w, x in zip(weights, w_t)]
    y_CxD = memory_apply(spec, lambda layer, h: jnp.einsum("ti,tio->to", h, w_t[layer]), chunk["q"])
    return y_CxD, new_state, new_momentum


def remat_group(spec: Spec, n: int) -> int:
    """Chunks per rematerialisation group for N chunks: the largest divisor of N up to remat_chunks."""
    return max(d for d in range(1, max(1, min(n, spec.remat_chunks)) + 1) if n % d == 0)


def chunk_streams(spec: Spec, streams, n: int) -> dict[str, jax.Array]:
    """Streams [B, H, time, ...] (see `scan_chunks`) cut into N chunks: [B, H, N, C, ...], and the window
    streams [B, H, N, C + c - 1, ...] (each chunk with the c - 1 tokens before it)."""
    c, window = spec.chunk, spec.window - 1
    extended = jnp.arange(n)[:, None] * c + jnp.arange(c + window)[None, :]  # [N, C + c - 1]

    def per_chunk(name, x):
        if window and name in spec.window_streams:
            return jnp.take(x, extended, axis=2)
        return x.reshape(*x.shape[:2], n, c, *x.shape[3:])  # a reshape, not a gather: no copy

    return {name: per_chunk(name, x) for name, x in streams.items()}


def scan_chunks(spec: Spec, state, momentum, streams, full_N,
                with_after_loss=False) -> tuple[jax.Array, Any, Any, dict[str, jax.Array]]:
    """Runs N chunks for a batch of sequences and heads.

    state / momentum: lists of [B, H, in, out]. streams: q [B, H, N*C, I] and lr, mom, keep [B, H, N*C]
    over the chunks' tokens; k [B, H, c-1 + N*C, I], v [..., D], gamma (and delta) [B, H, c-1 + N*C] over
    the c - 1 tokens before the first chunk and then the chunks' tokens (Omega window c). full_N: bool
    [N], whether chunk n is complete (an incomplete chunk is read but its end state is not kept).
    Returns y [B, H, N*C, D], the state after the last complete chunk, and stats (each [N], averaged
    over batch and heads).
    """
    c, n = spec.chunk, full_N.shape[0]
    xs = {name: jnp.moveaxis(x, 2, 0) for name, x in chunk_streams(spec, streams, n).items()}  # [N, B, H, ...]
    step_bh = jax.vmap(jax.vmap(partial(chunk_step, spec, with_after_loss=with_after_loss)))

    def one_chunk(carry, chunk):
        inputs, full = chunk
        state, momentum = carry
        y, new_state, new_momentum, stats = step_bh(state, momentum, inputs)
        keep_new = lambda new, old: [jnp.where(full, a, b) for a, b in zip(new, old)]
        stats = jax.tree_util.tree_map(jnp.mean, stats)
        return (keep_new(new_state, state), keep_new(new_momentum, momentum)), (y, stats)

    group = remat_group(spec, n)

    @jax.checkpoint
    def one_group(carry, chunks):
        return jax.lax.scan(one_chunk, carry, chunks)

    grouped = jax.tree_util.tree_map(lambda x: x.reshape(n // group, group, *x.shape[1:]), (xs, full_N))
    (state, momentum), (y, stats) = jax.lax.scan(one_group, (state, momentum), grouped)
    y = y.reshape(n, *y.shape[2:])  # [N, B, H, C, D]
    y = jnp.moveaxis(y, 0, 2).reshape(*y.shape[1:3], n * c, y.shape[-1])
    stats = jax.tree_util.tree_map(lambda s: s.reshape(n), stats)
    return y, state, momentum, stats


def num_chunks(length: int, chunk: int) -> int:
    return max(1, math.ceil(length / chunk))


def engine_flops(spec: Spec, in_dim: int, out_dim: int) -> dict[str, float]:
    """Forward FLOPs per token and head of the chunked algorithm as implemented, by part (multiply-adds
    count 2; elementwise work on per-token weights 1 per entry and op; the [C, C] gate algebra is left out
    where it is O(C) per token):

    gradient: the inner gradient's factors (the memory on the window's K = C + c - 1 keys at the
    chunk-start weights, and the backward to each map's output); gates: the coefficient scan; read: the
    outputs; write: what turns gradients into state (the linear path's chunk-end state and momentum; the
    materialised path's per-token weights, or Muon's per-token Grams and chunk-end state);
    newton_schulz: Muon's orthogonalisation; retention: softmax over per-token weights (Memora).
    The outer backward (the training step's gradient) is not included: about 2x the forward."""
    c, k = spec.chunk, spec.chunk + spec.window - 1
    parts = dict.fromkeys(("gradient", "gates", "read", "write", "newton_schulz", "retention"), 0.0)
    parts["gates"] = 8.0 * (k + 2) * math.log2(max(c, 2))
    for index, (fan_in, fan_out) in enumerate(layer_shapes(spec, in_dim, out_dim)):
        mat = 2.0 * fan_in * fan_out
        # Every map's forward on the window's keys; the backward reaches every map's output but the last's
        # input-side matmul is needed only for maps after the first.
        parts["gradient"] += mat * k / c * (2 if index > 0 or spec.memory == "gated" else 1)
        parts["write"] += mat * k / c  # the chunk-end momentum (S_C), on every path
        n, m = max(fan_in, fan_out), min(fan_in, fan_out)
        if spec.optimizer == "muon" and spec.retention != "softmax" and spec.ns_form == "gram":  # chunk_step_muon
            parts["write"] += 2.0 * k * k * m + 4.0 * k * m * m + 2.0 * (k * n * m + k * k * n + n * m * m) / c
            parts["write"] += 2.0 * k * m * m + 2.0 * (n * m * m + k * n * m) / c  # the chunk-end state
            parts["newton_schulz"] += max(4 * spec.ns_steps - 3, 0) * 2.0 * m**3
            parts["read"] += mat + 2.0 * n * m + 2.0 * k * n + 2.0 * c * k * m + 2.0 * c * m * m
        elif spec.materialised:  # per-token weights [C, in, out], formed and read
            parts["read"] += mat
            if spec.optimizer == "muon":  # each token's S_t formed, orthogonalised, then the decayed mix
                parts["write"] += 2.0 * k * fan_in * fan_out + 2 * mat + c * mat
                parts["newton_schulz"] += spec.ns_steps * (4.0 * m * m * n + 2.0 * m**3)
                if spec.retention == "softmax":  # max, subtract, exp, sum, divide
                    parts["retention"] += 5.0 * fan_in * fan_out
            else:  # chunk_step_softmax: the window's rank-1 writes, then the momentum and decay updates
                parts["write"] += (2.0 * spec.window + 4.0) * fan_in * fan_out
                # softmax_read: max, subtract, exp, sum (x, not every entry, is divided by the row sums)
                parts["retention"] += 4.0 * fan_in * fan_out
        else:  # chunk_step_linear
            parts["read"] += 2 * mat + 2.0 * k * (fan_in + fan_out)
            parts["write"] += mat * k / c  # the chunk-end state
    return parts


def forward_flops_per_token(spec: Spec, in_dim: int, out_dim: int) -> float:
    """Forward FLOPs per token and head of the chunked algorithm (for analytic MFU): `engine_flops`'s sum."""
    return sum(engine_flops(spec, in_dim, out_dim).values())
