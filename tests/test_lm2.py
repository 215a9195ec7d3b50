"""The LM2 block (memjax.memory.lm2): the equivalences of the segment-memory spec, strict causality of the
segment writes, carried state, validation, FLOPs, a smoke train and the configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config, trainer
from memjax.config import load_config
from memjax.memory import lm2
from memjax.metrics import read_jsonl
from memjax.models import factory, lm, registry
from tests.helpers import config_file, split_and_decoded_logits, tiny_config

VOCAB = 64
# Memory kernels and their number of input dims; `build` re-draws them at unit gain so that the memory
# path moves the outputs by O(1), well above the tolerances (at init_std it is ~1e-4).
MEMORY_KERNELS = {"read_query": 1, "read_key": 1, "read_value": 1, "read_out": 2, "out_gate": 2,
                  "write_query": 1, "write_key": 1, "write_value": 1, "write_out": 2, "in_gate": 1, "forget_gate": 1}


def lm2_config(**overrides):
    """N = 3 slots of width K = 5 in a d_model = 32 model, segments of 4: all sizes distinct."""
    section = {"model.lm2.slots": 3, "model.lm2.slot_width": 5, "model.lm2.heads": 2, "model.lm2.segment": 4}
    cfg = tiny_config(**{"model.block_pattern": "lm2", **section, **overrides})
    config.validate(cfg)
    return cfg


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def build(cfg, *, float64=False, loud=True, seed=0):
    """Graph and parameters; float64 compute (inside the x64 fixture) and loud memory kernels."""
    if float64:
        cfg.model.dtype = "float64"  # after validation: a test-only compute dtype
    with jax.enable_x64(False):  # float32 parameters as always (and their init programs compiled once)
        graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(seed))
    if loud:
        rng = np.random.default_rng(seed)
        for block in params["blocks"].values():
            for name, n_in in MEMORY_KERNELS.items():
                shape = block[name]["kernel"].shape
                block[name]["kernel"] = jnp.asarray(rng.normal(size=shape) / np.prod(shape[:n_in]) ** 0.5, jnp.float32)
    if float64:
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
    return graphdef, params


def set_gates(params, **values):
    """Closes or opens gates in every block: gate=(kernel value, bias value)."""
    names = {"out": ("out_gate", "out_bias"), "in": ("in_gate", "in_bias"), "forget": ("forget_gate", "forget_bias")}
    for block in params["blocks"].values():
        for gate, (kernel, bias) in values.items():
            k, b = names[gate]
            block[k]["kernel"] = jnp.full_like(block[k]["kernel"], kernel)
            block[b] = jnp.full_like(block[b], bias)
    return params


def block_fn(graphdef, fn):
    """jit of fn(block, params, *args) on layer 0."""
    return jax.jit(lambda params, *args: fn(nnx.merge(graphdef, params).blocks[0], *args))


# --- equivalences -------------------------------------------------------------------------------


def test_closed_output_gate_is_the_vanilla_decoder_exactly(x64):
    """g_out = 0 (out-gate kernel 0, bias -1e3): a 2-layer LM2 model equals the 'attention' model with the
    same embeddings, attention and FFN weights, bit for bit, while its memory is active otherwise."""
    cfg = lm2_config()
    graphdef, params = build(cfg, float64=True)
    vanilla_cfg = lm2_config(**{"model.block_pattern": "attention"})
    vanilla_graphdef, vanilla = build(vanilla_cfg, float64=True, loud=False, seed=1)
    vanilla = {**vanilla, "embed": params["embed"], "final_norm": params["final_norm"]}
    for i, block in params["blocks"].items():
        vanilla["blocks"][i] = {"attn_norm": block["attn_norm"], "qkv": block["attention"]["qkv"],
                                "out": block["attention"]["out"], "mlp_norm": block["mlp_norm"], "mlp": block["mlp"]}
    ids = jax.random.randint(jax.random.key(1), (2, 13), 0, VOCAB)
    expected = jax.jit(lambda p: nnx.merge(vanilla_graphdef, p)(ids)[0])(vanilla)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(ids)[0])
    closed = forward(set_gates(jax.tree_util.tree_map(jnp.copy, params), out=(0.0, -1e3)))
    np.testing.assert_array_equal(np.asarray(closed), np.asarray(expected))
    assert np.abs(np.asarray(forward(params) - expected)).max() > 1e-2


def test_pass_through_write_keeps_the_initial_memory_exactly(x64):
    """g_in = 0, g_forget = 1: the memory after any number of segments, carried or decoded, is M0."""
    graphdef, params = build(lm2_config(), float64=True)
    x = jax.random.normal(jax.random.key(2), (2, 12, 32), jnp.float64)

    def run(block, x):
        carry = block.init_carry(2, jnp.float64)
        for _ in range(2):  # 2 x 3 segments
            _, carry = block(x, carry)
        _, decoded = block(x[:, :9], block.init_state(2, 9, jnp.float64))
        return carry["memory"], decoded["memory"], block.initial_memory[...]

    carried, decoded, m0 = block_fn(graphdef, run)(set_gates(params, **{"in": (0.0, -1e3), "forget": (0.0, 1e3)}), x)
    for memory in (carried, decoded):
        np.testing.assert_array_equal(np.asarray(memory), np.broadcast_to(np.asarray(m0), memory.shape))
    carried, _, m0 = block_fn(graphdef, run)(build(lm2_config(), float64=True)[1], x)
    assert np.abs(np.asarray(carried - m0)).max() > 1e-2  # the default gates do write


# --- causality ----------------------------------------------------------------------------------


def test_perturbing_a_future_token_never_changes_earlier_logits():
    graphdef, params = build(lm2_config())
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids)[0])
    ids = jax.random.randint(jax.random.key(3), (2, 21), 0, VOCAB)  # 5 segments and a ragged tail
    logits = forward(params, ids)
    for t in (0, 3, 4, 5, 8, 20):
        changed = forward(params, ids.at[:, t].set((ids[:, t] + 1) % VOCAB))
        np.testing.assert_array_equal(np.asarray(changed[:, :t]), np.asarray(logits[:, :t]))
        assert not np.allclose(changed[:, t:], logits[:, t:])


def test_a_segment_reads_only_the_memory_written_before_it():
    """Segment 0 reads M0 (changing M0 changes it) and nothing any write produced (changing the write
    weights does not); with the attention's output zeroed, a token's only path to another is the memory,
    and a token reaches no token of its own segment, only those of later segments."""
    graphdef, params = build(lm2_config())
    forward = block_fn(graphdef, lambda block, x: block(x)[0])
    x = jax.random.normal(jax.random.key(4), (2, 12, 32))
    out = np.asarray(forward(params, x))

    rewritten = jax.tree_util.tree_map(jnp.copy, params)
    block = rewritten["blocks"][0]
    block["in_gate"]["kernel"] = -block["in_gate"]["kernel"]
    block["write_query"]["kernel"] = 2.0 * block["write_query"]["kernel"]
    changed = np.asarray(forward(rewritten, x))
    np.testing.assert_array_equal(changed[:, :4], out[:, :4])
    assert np.abs(changed[:, 4:] - out[:, 4:]).max() > 1e-3

    other_m0 = jax.tree_util.tree_map(jnp.copy, params)
    other_m0["blocks"][0]["initial_memory"] = jnp.roll(other_m0["blocks"][0]["initial_memory"], 1, axis=1)
    assert np.abs(np.asarray(forward(other_m0, x))[:, :4] - out[:, :4]).max() > 1e-3

    local = jax.tree_util.tree_map(jnp.copy, params)
    local["blocks"][0]["attention"]["out"]["kernel"] = jnp.zeros_like(local["blocks"][0]["attention"]["out"]["kernel"])
    base = np.asarray(forward(local, x))
    moved = np.asarray(forward(local, x.at[:, 5].add(1.0)))  # token 5 of segment 1 (tokens 4..7)
    np.testing.assert_array_equal(moved[:, [0, 1, 2, 3, 4, 6, 7]], base[:, [0, 1, 2, 3, 4, 6, 7]])
    assert np.abs(moved[:, 8:] - base[:, 8:]).max() > 1e-3


# --- carried state ------------------------------------------------------------------------------


@pytest.mark.parametrize("segment, length, splits", [
    (4, 19, [(0, 7), (7, 8), (8, 13), (13, 19)]),  # ragged tail; calls start mid-segment
    (3, 11, [(0, 2), (2, 9), (9, 11)]),  # N = 3, K = 5, d_model = 32, T = 11, segment 3; one layer
])
def test_any_split_and_token_by_token_decoding_equal_one_call(x64, segment, length, splits):
    layers = 2 if segment == 4 else 1
    graphdef, params = build(lm2_config(**{"model.lm2.segment": segment, "model.num_layers": layers}), float64=True)
    ids = jax.random.randint(jax.random.key(5), (2, length), 0, VOCAB)
    whole, outs = split_and_decoded_logits(graphdef, params, ids, splits)
    for label, logits in outs.items():
        np.testing.assert_allclose(logits, whole, atol=1e-5, rtol=0, err_msg=label)


def test_carried_memory_equals_one_call(x64):
    """init_carry holds only the memory [B, N, K]. With the attention's output zeroed (the only path that
    carry mode cuts), carrying it across three calls equals one call, outputs and final memory; with
    attention, one carried call equals the decoding state's call on the same tokens."""
    graphdef, params = build(lm2_config(), float64=True)
    x = jax.random.normal(jax.random.key(6), (2, 12, 32), jnp.float64)

    def run(block, x):
        carry = block.init_carry(2, jnp.float64)
        whole, whole_carry = block(x, carry)
        pieces = []
        for a in (0, 4, 8):
            out, carry = block(x[:, a:a + 4], carry)
            pieces.append(out)
        decoded, state = block(x, block.init_state(2, 12, jnp.float64))
        return whole, whole_carry, jnp.concatenate(pieces, 1), carry, decoded, state

    whole, whole_carry, pieces, carry, decoded, state = block_fn(graphdef, run)(params, x)
    assert set(carry) == {"memory"} and carry["memory"].shape == (2, 3, 5)
    assert state["pending"].shape == (2, 4, 32)
    np.testing.assert_allclose(decoded, whole, atol=1e-12, rtol=0)
    np.testing.assert_allclose(state["memory"], whole_carry["memory"], atol=1e-12, rtol=0)
    assert not np.allclose(pieces, whole)  # the attention in carry mode sees each call alone

    local = jax.tree_util.tree_map(jnp.copy, params)
    local["blocks"][0]["attention"]["out"]["kernel"] = jnp.zeros_like(local["blocks"][0]["attention"]["out"]["kernel"])
    whole, whole_carry, pieces, carry, _, _ = block_fn(graphdef, run)(local, x)
    np.testing.assert_allclose(pieces, whole, atol=1e-12, rtol=0)
    np.testing.assert_allclose(carry["memory"], whole_carry["memory"], atol=1e-12, rtol=0)


def test_the_decoder_carries_the_memory_across_calls():
    graphdef, params = build(lm2_config())
    ids = jax.random.randint(jax.random.key(7), (2, 16), 0, VOCAB)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        carry = model.init_carry(2)
        _, carry = model(ids[:, :8], carry)
        second, carry = model(ids[:, 8:], carry)
        return second, carry, model(ids[:, 8:])[0]

    second, carry, fresh = run(params)
    assert [set(c) for c in carry] == [{"memory"}] * 2
    assert not np.allclose(second, fresh)  # the second call reads the first call's memory


# --- protocol -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"model.lm2.slots": 0}, "model.lm2.slots: must be positive"),
    ({"model.lm2.slot_width": 0}, "model.lm2.slot_width: must be positive"),
    ({"model.lm2.heads": 3}, "model.lm2.heads: 3 heads do not divide"),
    ({"model.lm2.segment": 0}, "model.lm2.segment: must be positive"),
    ({"model.lm2.segment": 64}, "model.lm2.segment: 64 exceeds train.seq_len=32"),
    ({"model.lm2.segment": 5, "train.segments_per_step": 2}, "model.lm2.segment: 5 must divide train.seq_len=32"),
    ({"model.lm2.forget_gate_init": 1.0}, "model.lm2.forget_gate_init: must lie in"),
    ({"model.lm2.slot_init_scale": 0.0}, "model.lm2.slot_init_scale: must be positive"),
])
def test_validation_names_the_field(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        lm2_config(**overrides)
    lm2_config(**{"model.lm2.segment": 5})  # a ragged segment grid is fine without segment recurrence


def test_flops_count_attention_read_write_and_the_slot_side_projections():
    cfg = lm2_config()
    m, d = cfg.model, cfg.model.d_model
    base = lm2.LM2Block.flops_per_token(m, 32)
    assert np.isfinite(base) and base > 12.0 * d * 32
    k = m.lm2.slot_width
    slot_params = 4 * k * d + 2 * k * k
    # 32 tokens = 8 segments of 4: each segment moves its 3 slots through the slot-side projections.
    expected = 12.0 * d * 32 + 2 * 12.0 * d * 3 + 6.0 * slot_params * (3 * 8 / 32 - 1.0)
    assert base == pytest.approx(expected)
    model_flops = factory.flops_per_token(m, VOCAB, 32)
    assert np.isfinite(model_flops) and model_flops > 0


def test_model_flops_do_not_count_the_initial_memory_as_a_matmul():
    cfg = lm2_config()
    _, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(params)]
    matmul = sum(x.size for path, x in leaves if x.ndim >= 2 and "initial_memory" not in path)
    per_block = lm2.LM2Block.flops_per_token(cfg.model, 32)
    assert factory.flops_per_token(cfg.model, VOCAB, 32) == pytest.approx(6 * matmul + cfg.model.num_layers * per_block)


def test_gradients_reach_every_parameter():
    graphdef, params = build(lm2_config())
    ids = jax.random.randint(jax.random.key(8), (2, 16), 0, VOCAB)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(ids)[0] ** 2)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_every_parameter_has_logical_axes_and_m0_is_identity_like():
    cfg = lm2_config(**{"model.lm2.slots": 7, "model.lm2.slot_init_scale": 0.5})
    model = nnx.eval_shape(lambda: lm.DecoderLM(cfg.model, VOCAB, rngs=nnx.Rngs(params=0)))
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = leaf.get_metadata().get("logical_axes")
        assert axes and len(axes) == len(leaf.shape), path
    assert model.blocks[0].initial_memory.get_metadata()["logical_axes"] == ("lm2_slots", "lm2_width")
    _, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    m0 = np.asarray(params["blocks"][0]["initial_memory"])
    np.testing.assert_array_equal(m0, 0.5 * np.eye(5)[np.arange(7) % 5])


def test_gate_diagnostics_per_layer():
    cfg = lm2_config(**{"model.block_pattern": "attention,lm2"})
    graphdef, params = build(cfg, loud=False)
    ids = jax.random.randint(jax.random.key(9), (2, 16), 0, VOCAB)
    metrics = factory.eval_metrics(cfg.model, graphdef, params, [{"inputs": ids}, {"inputs": ids}])
    assert set(metrics) == {f"memory/layer1/{gate}" for gate in lm2.GATES}
    for gate in lm2.GATES:  # at initialisation every gate is near its configured value
        assert metrics[f"memory/layer1/{gate}"] == pytest.approx(0.5, abs=0.05)
    assert not nnx.merge(graphdef, params).blocks[1].record


def test_a_tiny_model_trains_and_logs_its_gates(tmp_path):
    cfg = lm2_config(**{"model.lm2.segment": 8,
                        "train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 0})
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0
    assert len(evals) == 2 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    for record in evals:
        for layer in range(cfg.model.num_layers):
            for gate in lm2.GATES:
                assert 0 < record[f"memory/layer{layer}/{gate}"] < 1, (record["step"], layer, gate)


# --- configs ------------------------------------------------------------------------------------


def test_quickstart_is_cpu_sized_and_validates():
    cfg = load_config(config_file("lm2_quickstart"))
    config.validate(cfg)
    m, t = cfg.model, cfg.train
    assert registry.block_names(m) == ["lm2"] * 4
    assert (m.d_model, m.dtype, cfg.data.tokenizer, t.seq_len) == (128, "float32", "byte", 256)
    flops = factory.flops_per_token(m, 264, t.seq_len)
    assert np.isfinite(flops) and flops > 0


def test_paper_config_builds_abstractly_at_its_size():
    cfg = load_config(config_file("lm2_paper"))
    config.validate(cfg)
    m = cfg.model
    assert (m.d_model, m.num_layers, m.num_heads, m.d_ff) == (2048, 16, 32, 8192)
    assert (m.lm2.slots, m.lm2.slot_width) == (2048, 2048)
    assert cfg.data.tokenizer == "bpe" and cfg.data.bpe_vocab_size == 32768 and cfg.train.seq_len == 4096
    _, params = factory.abstract(m, 32768)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(params))
    n = factory.count_params(params)
    assert 1.85e9 < n < 2.05e9, f"{n:,} parameters"
    flops = factory.flops_per_token(m, 32768, cfg.train.seq_len)
    assert np.isfinite(flops) and flops > 6 * (n - 32768 * m.d_model - 16 * 2048 * 2048)
