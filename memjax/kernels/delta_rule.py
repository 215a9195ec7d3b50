"""The (gated) delta rule in its exact chunkwise-parallel form (pure JAX).

Per sequence and head, with S_t [K, V] the state (key-first: S here is the transpose of the issue's
and papers' [V, K] state), q_t, k_t [K], v_t [V], beta_t a step size and a_t = exp(log_decay_t):

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

a_t = 1 is DeltaNet, a_t in (0, 1] Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464);
several steps per token with the decay on the first and the read after the last is DeltaProduct (the
caller interleaves them: memjax.memory.deltanet).

Chunked form (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length", with the gate of Gated DeltaNet). Inside a chunk of C steps, with g_i the cumulative log decay
from the chunk start (gamma_i = exp(g_i)) and S_0 the chunk-start state, unrolling the recurrence gives
S_i = gamma_i S_0 + sum_{j <= i} (gamma_i / gamma_j) k_j u_j^T, where the pseudo-values u solve the
unit lower-triangular system

    (I + A) U = diag(beta) V - diag(beta gamma) K S_0,   A_ij = beta_i (gamma_i / gamma_j) k_i . k_j  (i > j)

(the UT / WY representation). So per chunk, all in parallel over batch, heads and chunks: the inverse of
the unit triangular I + A (`unit_lower_inverse`) gives U~ = (I + A)^-1 diag(beta) V and
W = (I + A)^-1 diag(beta gamma) K; then the chunk-to-chunk scan needs only matmuls: U = U~ - W S_0,
o_i = gamma_i q_i S_0 + sum_{j <= i} (gamma_i / gamma_j) (q_i . k_j) u_j,
S_C = gamma_C S_0 + sum_j (gamma_C / gamma_j) k_j u_j^T.

This is an exact reformulation of the recurrence: any chunk size, 1 included, computes the same outputs
and final state up to rounding. (The Titans engine's chunking, memjax.kernels.neural_memory, is not: it
takes a chunk's gradients at the chunk-start state, an approximation that changes with the chunk size.)
Hence a call may take any length: the last chunk is padded with beta = 0 and log decay 0 (identity
steps), and the carried state is S alone. Every ratio gamma_i / gamma_j used has i >= j, so it lies in
(0, 1]: nothing overflows however strong the decay.

Everything is matmuls (no LAPACK call). The scan carries S over chunks in rematerialisation groups of
`remat_chunks` chunks (the backward stores one state per group, as the neural-memory engine does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unit_lower_inverse(a_xCxC) -> jax.Array:
    """(I + A)^-1 for a strictly lower-triangular A [.., C, C], by recursive doubling: the inverses of the
    diagonal blocks of size s give those of size 2s, [[T1, 0], [A21, T2]]^-1 = [[T1^-1, 0],
    [-T2^-1 A21 T1^-1, T2^-1]], so log2(C) levels of batched matmuls (C padded to a power of two with
    identity rows). Not jax.lax.linalg.triangular_solve: on CPU it calls LAPACK's trsm from XLA's thread
    pool, and OpenBLAS' own threads then hung a training run (observed with scipy's OpenBLAS)."""
    c = a_xCxC.shape[-1]
    p = 1 << max(c - 1, 0).bit_length()
    batch = a_xCxC.shape[:-2]
    a = jnp.pad(a_xCxC, [(0, 0)] * len(batch) + [(0, p - c), (0, p - c)])
    blocks = jnp.ones((*batch, p, 1, 1), a.dtype)  # the inverses of the 1 x 1 diagonal blocks
    s = 1
    while s < p:
        n = p // (2 * s)
        diagonal = jnp.moveaxis(jnp.diagonal(a.reshape(*batch, n, 2 * s, n, 2 * s), axis1=-4, axis2=-2), -1, -3)
        first, second = blocks[..., 0::2, :, :], blocks[..., 1::2, :, :]
        lower = -jnp.einsum("...ij,...jk,...kl->...il", second, diagonal[..., s:, :s], first)
        top = jnp.concatenate([first, jnp.zeros_like(first)], axis=-1)
        blocks = jnp.concatenate([top, jnp.concatenate([lower, second], axis=-1)], axis=-2)
        s *= 2
    return blocks[..., 0, :c, :c]


def chunk_terms(q_xCxK, k_xCxK, v_xCxV, beta_xC, log_decay_xC) -> dict[str, jax.Array]:
    """The chunk-local quantities (leading axes are batch-like: [B, H, N]) that the scan combines with the
    chunk-start state: U~ [.., C, V], W [.., C, K], the decayed query q_i gamma_i, the keys decayed to the
    chunk end k_j gamma_C / gamma_j, the causal intra-chunk read matrix [.., C, C] and gamma_C."""
    c = k_xCxK.shape[-2]
    g_xC = jnp.cumsum(log_decay_xC, axis=-1)
    causal_CxC = jnp.tril(jnp.ones((c, c), bool))
    # exp(g_i - g_j) only where i >= j (the masked entries could overflow, so they never reach exp).
    ratio_xCxC = jnp.exp(jnp.where(causal_CxC, g_xC[..., :, None] - g_xC[..., None, :], -jnp.inf))
    strict_CxC = jnp.tril(jnp.ones((c, c), bool), -1)
    kk_xCxC = jnp.einsum("...ik,...jk->...ij", k_xCxK, k_xCxK)
    a_xCxC = jnp.where(strict_CxC, beta_xC[..., :, None] * ratio_xCxC * kk_xCxC, 0.0)
    gamma_xC = jnp.exp(g_xC)
    rhs = jnp.concatenate([beta_xC[..., None] * v_xCxV, (beta_xC * gamma_xC)[..., None] * k_xCxK], axis=-1)
    solved = jnp.einsum("...ij,...jd->...id", unit_lower_inverse(a_xCxC), rhs)
    dv = v_xCxV.shape[-1]
    return {
        "u": solved[..., :dv],
        "w": solved[..., dv:],
        "q_decayed": gamma_xC[..., None] * q_xCxK,
        "k_to_end": jnp.exp(g_xC[..., -1:] - g_xC)[..., None] * k_xCxK,
        "read": ratio_xCxC * jnp.einsum("...ik,...jk->...ij", q_xCxK, k_xCxK),  # zero above the diagonal
        "chunk_decay": gamma_xC[..., -1],
    }


def chunk_step(state_xKxV, terms) -> tuple[jax.Array, jax.Array]:
    """One chunk from its start state: (outputs [.., C, V], end state [.., K, V])."""
    u_xCxV = terms["u"] - jnp.einsum("...ck,...kv->...cv", terms["w"], state_xKxV)
    o_xCxV = (jnp.einsum("...ck,...kv->...cv", terms["q_decayed"], state_xKxV)
              + jnp.einsum("...ij,...jv->...iv", terms["read"], u_xCxV))
    end_xKxV = (terms["chunk_decay"][..., None, None] * state_xKxV
                + jnp.einsum("...ck,...cv->...kv", terms["k_to_end"], u_xCxV))
    return o_xCxV, end_xKxV


def delta_rule(q_BxHxTxK, k_BxHxTxK, v_BxHxTxV, beta_BxHxT, log_decay_BxHxT, state_BxHxKxV, *, chunk: int,
               remat_chunks: int = 4) -> tuple[jax.Array, jax.Array]:
    """Outputs o [B, H, T, V] and the state after the last step, from `state` (S_0), by chunks of
    min(chunk, T) steps (any T: see the module docstring). All inputs in one float dtype."""
    b, h, t, _ = k_BxHxTxK.shape
    c = max(1, min(chunk, t))
    n = -(-t // c)
    group = max(1, min(remat_chunks, n))
    n = -(-n // group) * group  # whole groups: the padding is identity steps
    pad = n * c - t

    def chunked(x):
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        return jnp.moveaxis(x.reshape(b, h, n, c, *x.shape[3:]), 2, 0)  # [N, B, H, C, ...]

    terms = chunk_terms(*map(chunked, (q_BxHxTxK, k_BxHxTxK, v_BxHxTxV, beta_BxHxT, log_decay_BxHxT)))

    def one_chunk(state, terms):
        o, state = chunk_step(state, terms)
        return state, o

    @jax.checkpoint
    def one_group(state, terms):
        return jax.lax.scan(one_chunk, state, terms)

    grouped = jax.tree_util.tree_map(lambda x: x.reshape(n // group, group, *x.shape[1:]), terms)
    state, o = jax.lax.scan(one_group, state_BxHxKxV, grouped)
    o_BxHxTxV = jnp.moveaxis(o.reshape(n, b, h, c, -1), 0, 2).reshape(b, h, n * c, -1)[:, :, :t]
    return o_BxHxTxV, state


def forward_flops_per_step(chunk: int, key_dim: int, value_dim: int) -> float:
    """Forward FLOPs per step and head of `delta_rule` at this chunk size: the chunk's k.k and q.k
    matrices (2 C K each per step), applying the triangular inverse (2 C (K + V) per step; forming it
by recursive doubling adds about 2 C^2 / 3), the intra-chunk read
    (2 C V), three state products per step (W S_0, q S_0, the chunk-end update: 2 K V each) and the
    decay ratios and masks of the C x C matrices (about 4 C)."""
    c, k, v = chunk, key_dim, value_dim
    return 4.0 * c * k + 2.0 * c * (k + v) + 2.0 * c * c / 3.0 + 2.0 * c * v + 6.0 * k * v + 4.0 * c
