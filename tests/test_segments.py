"""Segment recurrence: truncated backpropagation, lane resets, the whole-document segment iterator,
segment-by-segment evaluation of long inputs, and the trainer's long-document mode."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memjax import config, segments, trainer
from memjax.data import ByteTokenizer, make_document_iterator
from memjax.metrics import read_jsonl
from memjax.models import factory
from tests.helpers import tiny_config


def linear_recurrence(carry, x):
    carry = 0.9 * carry + jnp.tanh(x)
    return carry, jnp.sum(carry**2)


@pytest.mark.parametrize("bptt", [1, 2, 3])
def test_truncation_cuts_gradients_exactly_beyond_the_depth(bptt):
    """Six segments, cuts before segments bptt, 2 bptt, ...: the last segment's loss has a non-zero
    gradient w.r.t. the inputs of its own truncation group and exactly zero before it."""
    xs = jax.random.normal(jax.random.key(0), (6, 3))

    def last_loss(xs):
        _, losses = segments.scan_segments(linear_recurrence, jnp.zeros(3), xs, bptt=bptt)
        return losses[-1]

    grads = np.asarray(jax.grad(last_loss)(xs))
    group_start = (5 // bptt) * bptt
    assert np.all(grads[:group_start] == 0.0)
    assert np.all(np.abs(grads[group_start:]).sum(axis=1) > 0)
    full = np.asarray(jax.grad(lambda xs: segments.scan_segments(linear_recurrence, jnp.zeros(3), xs)[1][-1])(xs))
    assert np.all(np.abs(full).sum(axis=1) > 0)  # bptt=0: every segment


def test_resets_restart_only_the_marked_lanes():
    carry = {"memory": jnp.arange(6.0).reshape(3, 2), "count": jnp.array(7)}
    init = {"memory": jnp.full((3, 2), -1.0), "count": jnp.array(0)}
    out = segments.reset_lanes(carry, init, jnp.array([False, True, False]))
    np.testing.assert_array_equal(out["memory"], [[0, 1], [-1, -1], [4, 5]])
    assert int(out["count"]) == 7  # no batch axis: shared by the lanes, kept


def document_config(**overrides):
    return tiny_config(**{"train.seq_len": 16, "train.segments_per_step": 3, "train.batch_size": 2, **overrides})


def test_document_segments_rebuild_each_document_in_order(tmp_path):
    """Concatenating a lane's segments (from each reset on) gives back [EOS] + document + [EOS] of the
    split's documents, each exactly once, whatever their lengths relative to the segment."""
    texts = [("x" * n) + f"doc{n}" for n in (0, 3, 11, 16, 29, 40, 47, 70)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    cfg = document_config(**{"data.source": "text", "data.paths": str(tmp_path / "*.txt"), "data.val_fraction": 0.0})
    tokenizer = ByteTokenizer()
    iterator = make_document_iterator(cfg.data, tokenizer, "train", seq_len=16, segments=3, batch_size=2,
                                      seed=0, shuffle=False, repeat=False)
    lanes = [[], []]
    for batch in iterator:
        assert batch["inputs"].shape == (2, 3, 16) and batch["reset"].shape == (2, 3)
        inside = batch["mask"][..., 1:]  # within one segment, targets are the inputs shifted by one
        np.testing.assert_array_equal(batch["targets"][..., :-1][inside], batch["inputs"][..., 1:][inside])
        for lane in range(2):
            for s in range(3):
                if batch["reset"][lane, s]:
                    lanes[lane].append([int(batch["inputs"][lane, s, 0])])
                lanes[lane][-1].extend(batch["targets"][lane, s][batch["mask"][lane, s]].tolist())
    documents = [doc for lane in lanes for doc in lane]
    # The final partial batch is dropped, so each lane's last document may be cut short.
    complete = [doc for doc in documents if len(doc) > 1 and doc[-1] == tokenizer.eos_id]
    expected = {tuple([tokenizer.eos_id, *text.encode(), tokenizer.eos_id]) for text in texts}
    assert len(complete) >= 5 and len({tuple(d) for d in complete}) == len(complete)
    assert {tuple(d) for d in complete} <= expected


def test_document_iterator_resumes_from_its_state():
    cfg = document_config()
    make = lambda: make_document_iterator(cfg.data, ByteTokenizer(), "train", seq_len=16, segments=3,
                                          batch_size=2, seed=3)
    reference = make()
    batches = [next(reference) for _ in range(8)]
    resumed = make()
    for _ in range(3):
        next(resumed)
    state = resumed.get_state()
    fresh = make()
    fresh.set_state(state)
    for expected in batches[3:]:
        got = next(fresh)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("block, settings", [
    ("titans_lmm", {"chunk": 4}),
    ("atlas", {"chunk": 4, "heads": 4}),
    ("titans_mac", {"chunk": 4, "segment": 8}),
    ("titans_mac", {"chunk": 4, "segment": 8, "persistent_tokens": 3}),  # the carry holds pending tokens
    ("hmt", {}),
])
def test_long_input_in_segments_equals_one_call(block, settings):
    """Where a model is a pure recurrence over segments (a memory alone; MAC, whose attention sees one
    memory segment; HMT, whose backbone sees one segment), evaluating a long input segment by segment
    with the carry gives the one-call losses. (LM2, MAG and MAL attend across a whole call, so there
    the two differ by design.)"""
    overrides = {f"model.{block}.{k}": v for k, v in settings.items()}
    if block == "hmt":
        block, overrides = "attention", {"model.hmt.enabled": True, "model.hmt.segment_len": 16,
                                         "model.hmt.sensory_tokens": 4, "model.hmt.cache_size": 3}
    cfg = tiny_config(**{"model.block_pattern": block, **overrides})
    graphdef, params = factory.build(cfg.model, 64, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (2, 61), 0, 64)
    logits, _ = nnx.merge(graphdef, params)(ids[:, :-1])
    one_call = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
    np.testing.assert_allclose(segments.long_nats(graphdef, params, ids, 16), one_call, atol=2e-5)


def test_segment_mode_validation():
    with pytest.raises(config.ConfigError, match="train.grad_accum_steps"):
        config.validate(document_config(**{"train.grad_accum_steps": 2}))
    with pytest.raises(config.ConfigError, match="train.bptt_segments"):
        config.validate(document_config(**{"train.bptt_segments": 4}))
    with pytest.raises(config.ConfigError, match="train.bptt_segments.*segments_per_step > 0"):
        config.validate(tiny_config(**{"train.bptt_segments": 2}))
    with pytest.raises(config.ConfigError, match="model.titans_mac.segment"):
        config.validate(document_config(**{"model.block_pattern": "titans_mac", "model.titans_mac.chunk": 4,
                                           "model.titans_mac.segment": 12}))
    # A segment of 16 tokens is not whole chunks of 6: a lane reset at a document start would misread
    # the pending-token count that all lanes share (tests/test_conformance.py checks resets restart).
    with pytest.raises(config.ConfigError, match="model.titans_lmm.chunk: must divide train.seq_len=16"):
        config.validate(document_config(**{"model.block_pattern": "titans_lmm", "model.titans_lmm.chunk": 6}))


def test_long_document_training_carries_memory_resets_and_resumes_exactly(tmp_path):
    """titans_lmm on whole documents, 3 segments a step, BPTT over 2: the loss falls; the carried
    memory is part of the checkpoint, so 6 steps + resume + 6 steps == 12 steps."""
    overrides = {"model.block_pattern": "titans_lmm", "model.titans_lmm.chunk": 4, "train.steps": 12,
                 "train.eval_every": 6, "train.checkpoint_every": 6, "train.bptt_segments": 2}
    trainer.train(document_config(**overrides), str(tmp_path / "straight"))
    trainer.train(document_config(**overrides, **{"train.stop_at_step": 6}), str(tmp_path / "resumed"))
    trainer.train(document_config(**overrides), str(tmp_path / "resumed"))
    records = read_jsonl(str(tmp_path / "straight" / "metrics.jsonl"))
    losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    assert losses[-1] < losses[0]
    assert any("memory/layer0/inner_loss_before" in r for r in records)

    run = trainer.setup(document_config(**overrides), None)
    from memjax import checkpoint
    abstract = trainer.abstract_state(run)
    straight = checkpoint.load_params(str(tmp_path / "straight"), abstract["params"])[0]
    resumed = checkpoint.load_params(str(tmp_path / "resumed"), abstract["params"])[0]
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("overrides", [
    {"model.block_pattern": "lm2", "model.lm2.segment": 8},
    {"model.hmt.enabled": True, "model.hmt.segment_len": 8, "model.hmt.sensory_tokens": 2,
     "model.hmt.cache_size": 4},
], ids=["lm2", "hmt"])
def test_lm2_and_hmt_train_on_long_documents(tmp_path, overrides):
    cfg = document_config(**overrides, **{"train.steps": 16, "train.eval_every": 16, "train.checkpoint_every": 0,
                                          "train.log_every": 4, "train.bptt_segments": 2})
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
    assert any(key.startswith("memory/") for r in records for key in r)
