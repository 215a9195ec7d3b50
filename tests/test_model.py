import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax.models import factory, layers
from tests.helpers import tiny_config

VOCAB = 64


def make_model(**overrides):
    cfg = tiny_config(**overrides)
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    return nnx.merge(graphdef, params), cfg


def test_rope_preserves_norm_and_encodes_relative_position():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 2, 8)), jnp.float32)
    rotated = layers.rope(q, jnp.array([[5]]), 10_000.0)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(layers.rope(q, jnp.array([[0]]), 10_000.0), q, rtol=1e-6)

    def score(i, j):
        return jnp.sum(layers.rope(q, jnp.array([[i]]), 1e4) * layers.rope(k, jnp.array([[j]]), 1e4), axis=-1)

    np.testing.assert_allclose(score(7, 3), score(14, 10), rtol=1e-4)  # depends on i - j only
    assert not np.allclose(score(7, 3), score(7, 4))


def test_masks_causal_and_sliding_window():
    pos = jnp.arange(6)[None]
    full = np.asarray(layers.attention_mask(pos, pos, 0)[0])
    np.testing.assert_array_equal(full, np.tril(np.ones((6, 6), bool)))
    window = np.asarray(layers.attention_mask(pos, pos, 3)[0])
    expected = np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), k=-3)
    np.testing.assert_array_equal(window, expected)
    assert window.sum(axis=1).tolist() == [1, 2, 3, 3, 3, 3]


@pytest.mark.parametrize("t, window, prefix", [(37, 8, 0), (64, 16, 3), (33, 1, 0), (16, 16, 2)])
def test_blocked_sliding_window_attention_equals_the_masked_full_one(t, window, prefix):
    """local_attend (blocks of `window` queries over their block and the previous one) == attend with
    the T x T sliding-window mask, persistent prefix keys included; ragged T."""
    rng = np.random.default_rng(t)
    q, k, v = (jnp.asarray(rng.normal(size=(2, t, 3, 4)), jnp.float32) for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(t), (2, t))
    mask = layers.attention_mask(pos, pos, window)
    pk = pv = None
    if prefix:
        pk, pv = (jnp.asarray(rng.normal(size=(2, prefix, 3, 4)), jnp.float32) for _ in range(2))
        expected = layers.attend(q, jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1),
                                 jnp.concatenate([jnp.ones((2, t, prefix), bool), mask], -1))
    else:
        expected = layers.attend(q, k, v, mask)
    np.testing.assert_allclose(layers.local_attend(q, k, v, window, pk, pv), expected, atol=2e-6)


@pytest.mark.parametrize("pattern", ["attention", "swa", "swa,attention"])
def test_perturbing_a_future_token_never_changes_earlier_logits(pattern):
    model, _ = make_model(**{"model.block_pattern": pattern})
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, VOCAB)
    logits, _ = model(ids)
    for t in (0, 9, 23):
        perturbed = ids.at[:, t].set((ids[:, t] + 1) % VOCAB)
        logits_p, _ = model(perturbed)
        np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits_p[:, :t]))
        assert not np.allclose(logits[:, t:], logits_p[:, t:])


def test_sliding_window_ignores_tokens_beyond_the_window():
    model, cfg = make_model(**{"model.block_pattern": "swa", "model.num_layers": 1})
    window = cfg.model.swa.window
    ids = jax.random.randint(jax.random.key(2), (1, 20), 0, VOCAB)
    logits, _ = model(ids)
    perturbed = ids.at[:, 3].set((ids[:, 3] + 1) % VOCAB)
    logits_p, _ = model(perturbed)
    # With one layer, position t sees tokens t-window+1..t: token 3 is out of reach from 3+window on.
    np.testing.assert_array_equal(np.asarray(logits[:, 3 + window:]), np.asarray(logits_p[:, 3 + window:]))
    assert not np.allclose(logits[:, 3 + window - 1], logits_p[:, 3 + window - 1])


@pytest.mark.parametrize("pattern", ["attention", "swa"])
def test_decoding_with_carried_state_matches_full_forward(pattern):
    model, _ = make_model(**{"model.block_pattern": pattern})
    ids = jax.random.randint(jax.random.key(3), (2, 20), 0, VOCAB)
    logits, _ = model(ids)
    states = model.init_states(2, 20)
    chunks = []
    for start, stop in [(0, 11), (11, 12), (12, 16), (16, 20)]:
        out, states = model(ids[:, start:stop], states)
        chunks.append(out)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), logits, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model, _ = make_model(**{"model.dtype": "bfloat16"})
    _, params = nnx.split(model, nnx.Param)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    logits, _ = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_untied_head_and_flops_count():
    cfg = tiny_config(**{"model.tie_embeddings": False})
    _, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    assert params["head"]["kernel"].shape == (cfg.model.d_model, VOCAB)
    d, layers_, ff = 32, 2, layers.swiglu_width(32, 0)
    matmuls = layers_ * (4 * d * d + 3 * d * ff) + d * VOCAB
    assert factory.flops_per_token(cfg.model, VOCAB, 32) == 6 * matmuls + layers_ * 12 * d * 32
    cfg.model.block_pattern = "swa"
    assert factory.flops_per_token(cfg.model, VOCAB, 32) == 6 * matmuls + layers_ * 12 * d * 8
