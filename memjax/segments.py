"""Segment recurrence: a long input processed segment by segment with a state carried across them.

One function, `scan_segments`, runs any step `fn(carry, x) -> (carry, y)` over the leading (segment)
axis of `xs` and is what every segment-recurrent piece of memjax uses (the trainer's long-document
mode, HMT's segments inside one call):

- truncated backpropagation: with `bptt = K`, the carry entering segments K, 2K, ... is cut from the
  graph (`stop_gradient`), so a loss on segment s has gradients through segments K*floor(s/K)..s: at
  most K segments, and exactly zero beyond (the segments before the cut contribute nothing);
- document boundaries: `resets` [S, B] marks a lane whose document starts at that segment; its carry is
  replaced by `init` (the carry at a document start) before the segment runs. Leaves without a batch
  axis (e.g. a step counter shared by all lanes) are kept.

A carry is a pytree whose leaves hold the batch on axis 0 (or have no batch axis at all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    import numpy as np


def reset_lanes(carry, init, reset_B) -> Any:
    """`init` where reset_B is true, `carry` elsewhere (per batch lane)."""

    def pick(old, new):
        if old.ndim == 0 or old.shape[0] != reset_B.shape[0]:
            return old
        mask = reset_B.reshape((-1,) + (1,) * (old.ndim - 1))
        return jnp.where(mask, new.astype(old.dtype), old)

    return jax.tree_util.tree_map(pick, carry, init)


def cut(carry, where) -> Any:
    """stop_gradient on the carry where `where` (a traced bool) holds; identity elsewhere."""
    return jax.tree_util.tree_map(lambda c: jnp.where(where, jax.lax.stop_gradient(c), c), carry)


def scan_segments(fn, carry, xs, *, bptt: int = 0, resets=None, init=None, remat: bool = False) -> tuple[Any, Any]:
    """lax.scan of fn over the segments of xs (leading axis), with truncation and resets (see above).

    bptt: 0 = backpropagate through every segment of this call. remat: recompute each segment's
    activations in the backward pass (memory ~ one segment's activations + the carries).
    """
    if (resets is None) != (init is None):
        raise ValueError("resets and init come together")
    step = jax.checkpoint(fn) if remat else fn

    def body(carry, inputs):
        index, x, reset = inputs
        if bptt:
            carry = cut(carry, (index > 0) & (index % bptt == 0))
        if reset is not None:
            carry = reset_lanes(carry, init, reset)
        return step(carry, x)

    num = jax.tree_util.tree_leaves(xs)[0].shape[0]
    return jax.lax.scan(body, carry, (jnp.arange(num), xs, resets))


def batch_segments(batch) -> dict[str, jax.Array]:
    """A document batch ([B, S, L] fields, reset [B, S]) with the segment axis first."""
    return {name: jnp.moveaxis(x, 1, 0) for name, x in batch.items()}


def document_loss_sums(model, batch, carry, *, bptt: int = 0, reset: bool = True, remat: bool = False,
                       token_bytes=None) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """Summed cross-entropy (nats), target count and target bytes (with `token_bytes`, else 0) of a
    document batch (memjax.data.documents) run segment by segment from `carry`, and the carry after
    its last segment. reset=False keeps the memories across document boundaries."""
    import optax  # imported here: the module stays light for callers that only scan

    def one_segment(carry, seg):
        logits_BxLxV, carry = model(seg["inputs"], carry)
        nats_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, seg["targets"])
        n_bytes = 0.0 if token_bytes is None else jnp.sum(jnp.where(seg["mask"], token_bytes[seg["targets"]], 0.0))
        return carry, (jnp.sum(jnp.where(seg["mask"], nats_BxL, 0.0)), jnp.sum(seg["mask"]), n_bytes)

    xs = batch_segments(batch)
    resets = xs.pop("reset")
    init = model.init_carry(batch["inputs"].shape[0]) if reset else None
    carry, sums = scan_segments(one_segment, carry, xs, bptt=bptt, resets=resets if reset else None, init=init,
                                remat=remat)
    return *(jnp.sum(x) for x in sums), carry


def long_nats(graphdef, params, ids_BxN, segment_len: int, *, progress: bool = False) -> np.ndarray:
    """Per-token cross-entropy [B, N - 1] (nats) of sequences of any length N, run segment by segment
    with the model's carry: one jitted segment step, so memory does not grow with N. The tail segment
    is padded (only its valid targets count; a padded tail's writes are never read)."""
    import numpy as np
    import optax
    from flax import nnx
    from tqdm import tqdm

    @jax.jit
    def step(params, inputs_BxL, targets_BxL, carry):
        logits_BxLxV, carry = nnx.merge(graphdef, params)(inputs_BxL, carry)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL), carry

    ids_BxN = np.asarray(ids_BxN)
    batch, n = ids_BxN.shape
    carry = nnx.merge(graphdef, params).init_carry(batch)
    pieces = []
    for start in tqdm(range(0, n - 1, segment_len), disable=not progress, unit="segment"):
        piece = ids_BxN[:, start : start + segment_len + 1]
        valid = piece.shape[1] - 1
        padded = np.pad(piece, ((0, 0), (0, segment_len + 1 - piece.shape[1])))
        nats_BxL, carry = step(params, padded[:, :-1], padded[:, 1:], carry)
        pieces.append(np.asarray(nats_BxL)[:, :valid])
    return np.concatenate(pieces, axis=1)
