"""Autoregressive decoding through the blocks' carried state (KV caches, memory states)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def generate(graphdef, params, prompt_BxP, key, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0) -> jax.Array:
    """Token ids [B, max_new_tokens] continuing `prompt_BxP`: greedy at temperature 0, else sampled."""
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_BxP.shape
    states = model.init_states(batch, prompt_len + max_new_tokens)
    logits_BxPxV, states = model(prompt_BxP, states)

    def pick(logits_BxV, step_key):
        if temperature == 0.0:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        logits_BxV = logits_BxV / temperature
        if top_k:
            kth_B1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
            logits_BxV = jnp.where(logits_BxV < kth_B1, -jnp.inf, logits_BxV)
        return jax.random.categorical(step_key, logits_BxV).astype(jnp.int32)

    def decode(carry, step_key):
        token_B, states = carry
        logits_Bx1xV, states = model(token_B[:, None], states)
        next_B = pick(logits_Bx1xV[:, 0], step_key)
        return (next_B, states), token_B

    keys = jax.random.split(key, max_new_tokens)
    first_B = pick(logits_BxPxV[:, -1], keys[0])
    (last_B, _), tokens = jax.lax.scan(decode, (first_B, states), keys[1:])
    return jnp.concatenate([tokens.T, last_B[:, None]], axis=1) if max_new_tokens > 1 else first_B[:, None]
