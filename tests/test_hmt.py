"""HMT (memjax.models.hmt): the equivalences of the segment-memory spec, causality, BPTT, decoding, configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config, segments, trainer
from memjax.config import load_config
from memjax.metrics import read_jsonl
from memjax.models import factory, hmt
from memjax.sampling import generate
from tests.helpers import config_file, tiny_config

VOCAB = 64
SEG = 8  # tiny configs: segments of 8 tokens, train.seq_len 32 = 4 segments
# float64 compute still has float32 RoPE, attention scores and logits (memjax.models.layers).
X64 = dict(rtol=1e-6, atol=1e-8)


def hmt_config(**overrides):
    settings = {"enabled": True, "segment_len": SEG, "sensory_tokens": 2, "cache_size": 3, "recall_dim": 16}
    settings.update(overrides)
    cfg = tiny_config(**{f"model.hmt.{key}": value for key, value in settings.items()})
    config.validate(cfg)
    return cfg


def build(cfg, x64=False):
    """Graph definition and parameters; x64: float64 compute and parameters (call inside enable_x64)."""
    if x64:
        cfg.model.dtype = "float64"  # after validation, which allows the training dtypes only
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    if x64:
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
    return graphdef, params


def plain_backbone(cfg, params):
    """The DecoderLM of the same config without HMT, holding HMT's backbone parameters."""
    plain = cfg.model.copy_and_resolve_references()
    plain.hmt.enabled = False
    graphdef, _ = factory.abstract(plain, VOCAB)
    return nnx.merge(graphdef, params["backbone"])


def decoder_on_embeddings(decoder, x_BxTxD):
    """Reference: DecoderLM.__call__ after its embedding lookup."""
    for block in decoder.blocks:
        x_BxTxD, _ = block(x_BxTxD, None)
    return decoder.embed.attend(decoder.final_norm(x_BxTxD))


def ids_of(length, batch=2, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB)


# --- the spec's equivalences ----------------------------------------------------------------------


def test_memory_sensory_and_recall_off_equal_the_backbone_on_each_segment():
    with jax.enable_x64(True):
        cfg = hmt_config(memory=False, sensory_tokens=0, recall=False)
        graphdef, params = build(cfg, x64=True)
        ids = ids_of(3 * SEG + 5)  # a ragged last segment too

        @jax.jit
        def run(params):
            decoder = plain_backbone(cfg, params)
            expected = [decoder(ids[:, s : s + SEG])[0] for s in range(0, ids.shape[1], SEG)]
            return nnx.merge(graphdef, params)(ids)[0], jnp.concatenate(expected, 1)

        logits, expected = run(params)
        np.testing.assert_allclose(logits, expected, **X64)


def test_sensory_only_is_the_backbone_on_the_previous_segments_last_k_ids_and_the_segment():
    k = 3
    with jax.enable_x64(True):
        cfg = hmt_config(memory=False, recall=False, sensory_tokens=k)
        graphdef, params = build(cfg, x64=True)
        ids = ids_of(3 * SEG)

        @jax.jit
        def run(params):
            decoder = plain_backbone(cfg, params)
            expected = [decoder(ids[:, n * SEG - k : (n + 1) * SEG])[0][:, k:] for n in (1, 2)]
            # A document's first segment: k zero embeddings in the sensory slots.
            x_BxTxD = decoder.embed(ids[:, :SEG])
            first = decoder_on_embeddings(decoder, jnp.concatenate([jnp.zeros_like(x_BxTxD[:, :k]), x_BxTxD], 1))
            return nnx.merge(graphdef, params)(ids)[0], jnp.concatenate([first[:, k:], *expected], 1)

        logits, expected = run(params)
        np.testing.assert_allclose(logits, expected, **X64)


def test_recall_weights_sum_to_one_over_valid_entries_and_an_empty_cache_gives_the_learned_init():
    n = 5
    with jax.enable_x64(True):
        cfg = hmt_config(cache_size=n)
        graphdef, params = build(cfg, x64=True)
        rng = np.random.default_rng(0)
        d = cfg.model.d_model
        carry = {"cache": jnp.asarray(rng.normal(size=(3, n, d))),
                 "summary": jnp.asarray(rng.normal(size=(3, SEG // 2, d)) * 0.02),
                 "count": jnp.array([0, 2, n], jnp.int32),
                 "sensory": jnp.zeros((3, 2, d))}
        x_BxLxD = jnp.asarray(rng.normal(size=(3, SEG, d)) * 0.02)
        ids = ids_of(2 * SEG)

        @jax.jit
        def run(params):
            model = nnx.merge(graphdef, params)
            p_BxD, a_BxN = model.search(carry, x_BxLxD)
            token = jnp.broadcast_to(params["summary_token"], (3, 1, d))
            s_BxD = hmt.backbone_hidden(model.backbone, jnp.concatenate([token, carry["summary"], token], 1))[:, -1]
            # In a call: the first segment's memory tokens are P_0 around [zero sensory slots; x_0].
            decoder = plain_backbone(cfg, params)
            p0 = jnp.broadcast_to(params["memory_init"], (2, 1, d))
            x = decoder.embed(ids[:, :SEG])
            first = decoder_on_embeddings(decoder, jnp.concatenate([p0, jnp.zeros((2, 2, d)), x, p0], 1))
            return p_BxD, a_BxN, s_BxD, model(ids)[0][:, :SEG], first[:, 3 : 3 + SEG]

        p_BxD, a_BxN, s_BxD, logits, first = run(params)
        np.testing.assert_allclose(a_BxN.sum(-1), [0.0, 1.0, 1.0], **X64)
        np.testing.assert_array_equal(a_BxN[1, : n - 2], 0.0)  # only the 2 newest entries are valid
        assert np.all(np.asarray(a_BxN[1, n - 2 :]) > 0) and np.all(np.asarray(a_BxN[2]) > 0)
        np.testing.assert_allclose(p_BxD[0], params["memory_init"], **X64)
        q = np.asarray(s_BxD) @ np.asarray(params["recall_query"]["kernel"])
        keys = np.asarray(carry["cache"]) @ np.asarray(params["recall_key"]["kernel"])
        for lane, valid in ((1, 2), (2, n)):
            scores = keys[lane, n - valid :] @ q[lane] / np.sqrt(q.shape[-1])
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            np.testing.assert_allclose(a_BxN[lane, n - valid :], weights, **X64)
            np.testing.assert_allclose(p_BxD[lane], weights @ np.asarray(carry["cache"])[lane, n - valid :], **X64)
        np.testing.assert_allclose(logits, first, **X64)


def test_recall_diagnostics_by_distance_sum_to_one():
    cfg = hmt_config(cache_size=3)
    graphdef, params = build(cfg)
    batches = [{"inputs": ids_of(4 * SEG, seed=s)} for s in (1, 2)]
    metrics = hmt.HMT.eval_metrics(graphdef, params, batches)
    assert set(metrics) == {f"memory/hmt/recall_distance_{d}" for d in (1, 2, 3)}
    assert sum(metrics.values()) == pytest.approx(1.0, abs=1e-5)
    # Segment 1 can only recall distance 1: it holds at least a third of the mass.
    assert metrics["memory/hmt/recall_distance_1"] > metrics["memory/hmt/recall_distance_3"]
    assert not nnx.merge(graphdef, params).record
    assert hmt.HMT.eval_metrics(*build(hmt_config(recall=False)), batches) == {}


@pytest.mark.parametrize("bptt, reached", [
    # bptt 2 cuts before segments 2 and 4: segment 3's loss reaches segments 2..3, the ragged fifth's only itself.
    (2, ({2, 3}, {4})),
    (0, ({0, 1, 2, 3}, {0, 1, 2, 3, 4})),
])
def test_bptt_gradient_reaches_earlier_inputs_within_the_depth_and_exactly_zero_beyond(bptt, reached):
    graphdef, params = build(hmt_config(bptt_segments=bptt))
    model = nnx.merge(graphdef, params)
    length = 4 * SEG + 5
    x_BxTxD = model.backbone.embed(ids_of(length))

    def losses(x_BxTxD):
        logits, _ = model.run(x_BxTxD)
        return jnp.stack([jnp.sum(logits[:, s * SEG : (s + 1) * SEG] ** 2) for s in (3, 4)])

    grads = np.abs(np.asarray(jax.jit(jax.jacrev(losses))(x_BxTxD)))
    for grad, segments_reached in zip(grads, reached):
        per_segment = [grad[:, s : s + SEG].sum() for s in range(0, length, SEG)]
        for s, g in enumerate(per_segment):
            assert (g > 0) if s in segments_reached else (g == 0.0), (s, per_segment)


# --- causality, splits, decoding ------------------------------------------------------------------


def test_perturbing_a_token_never_changes_earlier_logits_across_segments():
    graphdef, params = build(hmt_config())
    forward = jax.jit(lambda ids: nnx.merge(graphdef, params)(ids)[0])
    ids = ids_of(3 * SEG + 5)
    logits = forward(ids)
    for t in (0, 2, SEG + 1, SEG + 6, 2 * SEG + 3, 3 * SEG + 1, 3 * SEG + 4):
        changed = forward(ids.at[:, t].set((ids[:, t] + 1) % VOCAB))
        np.testing.assert_array_equal(np.asarray(changed[:, :t]), np.asarray(logits[:, :t]))
        assert not np.allclose(changed[:, t:], logits[:, t:])


@pytest.mark.parametrize("causal", [True, False])
def test_the_paper_variant_leaks_a_segments_first_half_into_its_earlier_positions(causal):
    """causal=False: S_n summarises x_n[:L/2], so the input at 2 SEG + 2 (first half of segment 2) reaches
    the logits of positions 2 SEG and 2 SEG + 1 through the recall weights: a non-zero gradient (small at
    initialisation, where the summary hardly depends on its input), exactly zero in the causal variant.
    (Segment 0 has an empty cache and segment 1 a single memory, whose weight is 1 whatever the query.)"""
    graphdef, params = build(hmt_config(causal=causal))
    model = nnx.merge(graphdef, params)
    t = 2 * SEG + 2
    x_BxTxD = model.backbone.embed(ids_of(3 * SEG))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(model.run(x)[0][:, 2 * SEG : t])))(x_BxTxD)
    leak = float(jnp.abs(grad[:, t:]).max())
    assert (leak == 0.0) if causal else (leak > 0.0), leak
    assert float(jnp.abs(grad[:, :t]).max()) > 0


def test_two_calls_with_the_carry_equal_one_call():
    graphdef, params = build(hmt_config())
    ids = ids_of(4 * SEG)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        whole, _ = model(ids)
        whole_carried, carry_one = model(ids, model.init_carry(2))
        first, carry = model(ids[:, : SEG], model.init_carry(2))
        second, carry = model(ids[:, SEG:], carry)
        return whole, whole_carried, jnp.concatenate([first, second], 1), carry_one, carry

    whole, whole_carried, split, carry_one, carry = run(params)
    np.testing.assert_allclose(whole_carried, whole, atol=1e-6)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    assert set(carry) == {"cache", "count", "sensory", "summary"}
    for key in carry:
        assert carry[key].shape[0] == 2
        np.testing.assert_allclose(carry[key], carry_one[key], atol=1e-5)
    np.testing.assert_array_equal(carry["count"], [3, 3])
    with pytest.raises(ValueError, match="multiple of model.hmt.segment_len=8"):
        nnx.merge(graphdef, params)(ids[:, :12], nnx.merge(graphdef, params).init_carry(2))


def test_document_resets_restart_a_lanes_memory_in_the_segment_scan():
    """The trainer's document mode (memjax.segments) steps the model with its carry, resetting lanes at
    document starts: lane 0 starts a document at the second step, lane 1 runs on."""
    graphdef, params = build(hmt_config())
    ids = ids_of(4 * SEG)
    steps_SxBxT = jnp.moveaxis(ids.reshape(2, 2, 2 * SEG), 1, 0)
    resets_SxB = jnp.array([[True, True], [True, False]])

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)

        def step(carry, ids_BxT):
            logits_BxTxV, carry = model(ids_BxT, carry)
            return carry, logits_BxTxV

        _, logits_SxBxTxV = segments.scan_segments(step, model.init_carry(2), steps_SxBxT, resets=resets_SxB,
                                                   init=model.init_carry(2))
        return logits_SxBxTxV[1], model(ids[:, 2 * SEG :])[0], model(ids)[0][:, 2 * SEG :]

    second, fresh, continued = run(params)
    np.testing.assert_allclose(second[0], fresh[0], atol=1e-5)
    np.testing.assert_allclose(second[1], continued[1], atol=1e-5)
    assert not np.allclose(second[0], continued[0], atol=1e-5)


def test_token_by_token_decoding_equals_the_parallel_call():
    graphdef, params = build(hmt_config())
    ids = ids_of(2 * SEG + 5)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        whole, _ = model(ids)
        prompt, states = model(ids[:, :5], model.init_states(2, ids.shape[1]))

        def decode(states, token_B):
            logits, states = model(token_B[:, None], states)
            return states, logits[:, 0]

        _, decoded = jax.lax.scan(decode, states, ids[:, 5:].T)
        return whole, jnp.concatenate([prompt, jnp.moveaxis(decoded, 0, 1)], 1)

    whole, decoded = run(params)
    np.testing.assert_allclose(decoded, whole, atol=1e-5)
    with pytest.raises(ValueError, match="causal variant"):
        nnx.merge(*build(hmt_config(causal=False))).init_states(2, 8)


def test_greedy_generation_continues_as_the_parallel_model_predicts():
    graphdef, params = build(hmt_config())
    prompt = ids_of(5)
    out = generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=2 * SEG)
    full = jnp.concatenate([prompt, out], 1)
    logits, _ = jax.jit(lambda ids: nnx.merge(graphdef, params)(ids))(full)
    np.testing.assert_array_equal(np.argmax(logits[:, 4:-1], -1), out)


# --- configs, FLOPs, training ---------------------------------------------------------------------


@pytest.mark.parametrize("key, value, message", [
    ("segment_len", 0, "model.hmt.segment_len: must be positive"),
    ("sensory_tokens", 9, r"model.hmt.sensory_tokens: must lie in \[0, model.hmt.segment_len=8\]"),
    ("sensory_tokens", -1, "model.hmt.sensory_tokens"),
    ("cache_size", 0, "model.hmt.cache_size: must be positive"),
    ("recall_dim", 0, "model.hmt.recall_dim: must be positive"),
    ("bptt_segments", -1, "model.hmt.bptt_segments: must be >= 0"),
    ("segment_len", 12, "train.seq_len: 32 is not a multiple of model.hmt.segment_len=12"),
])
def test_validation_names_the_field(key, value, message):
    with pytest.raises(config.ConfigError, match=message):
        hmt_config(**{key: value})




def test_paper_config_validates_and_builds_abstractly_with_the_papers_parameter_overhead():
    cfg = load_config(config_file("hmt_paper"))
    config.validate(cfg)
    _, shapes = factory.abstract(cfg.model, cfg.model.vocab_size)
    total = factory.count_params(shapes)
    backbone = factory.count_params(shapes["backbone"])
    assert 330e6 < backbone < 380e6, backbone  # OPT-350M-sized
    assert 0.005 <= (total - backbone) / backbone <= 0.02  # the paper's 0.5-2% extra parameters
    assert hmt.HMT.flops_per_token(cfg.model, cfg.model.vocab_size, cfg.train.seq_len) > 6 * backbone


def test_quickstart_config_validates_and_builds():
    cfg = load_config(config_file("hmt_quickstart"))
    config.validate(cfg)
    assert cfg.data.tokenizer == "byte" and cfg.train.seq_len % cfg.model.hmt.segment_len == 0
    _, shapes = factory.abstract(cfg.model, 264)
    assert set(shapes) == {"backbone", "summary_token", "memory_init", "recall_query", "recall_key"}
    cfg.model.hmt.recall = False  # stage 1: the same parameters, so stage 2 can start from its checkpoint
    assert jax.tree_util.tree_structure(factory.abstract(cfg.model, 264)[1]) == jax.tree_util.tree_structure(shapes)


def test_flops_with_everything_off_are_the_backbones_on_one_segment():
    cfg = hmt_config(memory=False, sensory_tokens=0, recall=False)
    plain = cfg.model.copy_and_resolve_references()
    plain.hmt.enabled = False
    assert hmt.HMT.flops_per_token(cfg.model, VOCAB, 32) == pytest.approx(factory.flops_per_token(plain, VOCAB, SEG))
    full = hmt.HMT.flops_per_token(hmt_config().model, VOCAB, 32)
    # Memory encoding on 8 + 2 + 2 positions, representation encoding on 4 + 2, per 8 new tokens.
    assert 1.5 < full / factory.flops_per_token(plain, VOCAB, SEG) < 2.5


def test_a_tiny_hmt_trains_through_the_trainer(tmp_path):
    cfg = hmt_config()
    cfg.train.steps = 40
    cfg.train.eval_every = 20
    cfg.train.checkpoint_every = 40
    cfg.optim.groups.embeddings.pattern = r"^(backbone/)?embed/"
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert losses[-1] < losses[0] - 1.0, losses
    assert evals[-1] < evals[0] and np.isfinite(evals).all()
