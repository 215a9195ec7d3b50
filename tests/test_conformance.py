"""Conformance: every registered block, and the HMT wrapper, keeps the block protocol's promises.

Each case is one model: `model.block_pattern` set to the block (HMT: around the attention backbone), at
two sizes:
- "shrunk": the registered defaults with every size setting (windows, segments, chunks, slots, codebooks,
  HMT's lengths) divided by 8, as the model's width (256 -> 32) and training length (256 -> 32);
- "odd": 3 heads everywhere, chunks, segments and persistent tokens that divide neither each other nor
  the sequence lengths (chunk 3, MAC segment 6, LM2 segment 5, window 5, 5 persistent tokens, ...).

Properties, float32:
(a) one call == the same ids as calls of 5 + rest tokens carrying the decoding state == token by token
    decoding, all from `init_states` (tolerance: float32 rounding of sums in another order);
(b) causality: changing token t leaves the logits of positions < t bit-identical;
(c) on 8 fake CPU devices (data 2 x fsdp 2 x tensor 2, parameters laid out by the trainer's rules),
    one call and token-by-token decoding equal one device's (1e-5 of the logits' scale: a sharded
    reduction sums in another order; ROUNDING_GROWTH times that for a block whose algorithm amplifies
    rounding); at the odd sizes (SHARDED_SIZES);
(d) segment carry, through memjax.segments.scan_segments as the trainer's document mode runs it (two
    segments, then the second and the first again, each from a reset lane). The first segment from
    init_carry == the first half of the one call (a fresh start, causal), and a reset lane's rerun of it
    is bit-identical to it; what the second must equal depends on what the block carries (`carry_family`):
    - "recurrent" (neural memory without attention, MAC, HMT, HOPE): the carry is the whole state, so the
      second segment == the second half of the one call, and differs from the fresh run (MAC: its
      attention never crosses its own segments, on whose grid the carried segments lie);
    - "local" (no init_carry: attention, swa, pkm): nothing crosses: the second == the fresh run, and
      differs from the one call's second half (whose attention saw the first);
    - "memory+attention" (MAG, MAL, LM2): the attention sees each segment alone and the memory
      crosses: the second differs from both; where the attention only adds to the residual (MAL, LM2),
      zeroing its output projection leaves the memory recurrence alone, and then two segments == one call;
(e) weight decay: every parameter the optimizer decays is a weight matrix (ndim >= 2) multiplied by the
    tokens (no logical axis of a block's `state_axes`: initial states, lookup tables,
    persistent tokens; nor a norm's scale).

One jitted program per case computes (a), (b) and (d) on one device; (c) compiles its sharded twin. The
models have one layer: the properties are the blocks'.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config, optim, parallel, segments, trainer
from memjax.data import ByteTokenizer
from memjax.models import factory, registry
from tests.helpers import ROUNDING_GROWTH, split_calls, tiny_config, token_by_token
from tests.test_sharding import MESHES, with_mesh

VOCAB = -(-ByteTokenizer().vocab_size // 8) * 8  # what (c)'s trainer.setup sizes the embedding to
SHRINK = 8
# Settings that are lengths or counts of slots: divided by SHRINK for the "shrunk" size.
SIZE_KEYS = ("window", "segment", "chunk", "n_keys", "k", "k_dim", "slots", "slot_width")
HMT_SIZE_KEYS = ("segment_len", "sensory_tokens", "cache_size", "recall_dim")
ODD = {  # per setting name, its odd value wherever a block has that setting
    "heads": 3, "chunk": 3, "segment": 6, "window": 5, "persistent_tokens": 5,
    "n_keys": 7, "k": 3, "k_dim": 6, "slots": 3, "slot_width": 5,
}
ODD_LM2 = {"segment": 5}  # LM2's segment needs no chunk multiple: one that divides nothing
ODD_HMT = {"segment_len": 6, "sensory_tokens": 5, "cache_size": 3, "recall_dim": 7}
BATCH = 4  # splits over the mixed mesh's 4 batch shards

NAMES = sorted(registry.load()) + ["hmt"]
SIZES = ("shrunk", "odd")
CASES = [(name, size) for name in NAMES for size in SIZES]


def block_settings(name: str, size: str) -> dict:
    if name == "hmt":
        defaults, keys, odd = config.base_config().model.hmt, HMT_SIZE_KEYS, ODD_HMT
        section = "model.hmt"
    else:
        defaults, keys, odd = registry.load()[name].defaults, SIZE_KEYS, {**ODD, **(ODD_LM2 if name == "lm2" else {})}
        section = f"model.{name}"
    if size == "shrunk":
        values = {key: max(1, defaults[key] // SHRINK) for key in keys if key in defaults}
    else:
        values = {key: value for key, value in odd.items() if key in defaults}
    return {f"{section}.{key}": value for key, value in values.items()}


def case_config(name: str, size: str):
    # One layer (4 / 8, rounded up): the properties are the block's; DecoderLM's stacking of blocks and
    # their states is tests/test_model.py's, and a second layer would double every compile here.
    base = {"model.num_layers": 1}
    base.update({"model.num_heads": 4} if size == "shrunk" else
                {"model.d_model": 24, "model.num_heads": 3, "model.swa.window": 5, "train.seq_len": 24})
    if name == "hmt":
        base.update({"model.block_pattern": "attention", "model.hmt.enabled": True})
    else:
        base["model.block_pattern"] = name
    if size == "shrunk":
        base["model.swa.window"] = registry.load()["swa"].defaults["window"] // SHRINK
    cfg = tiny_config(**{**base, **block_settings(name, size), "train.batch_size": BATCH})
    config.validate(cfg)
    return cfg


def carry_family(name: str, cfg) -> str:
    if name in ("hmt", "hope"):  # hope: memories only (self-modifying Titans, CMS levels), no attention
        return "recurrent"
    block = registry.load()[name]
    if block.init_carry is registry.Block.init_carry:  # the base's: the block carries nothing
        return "local"
    if cfg.model[name].get("hybrid") in ("none", "mac"):
        return "recurrent"
    return "memory+attention"


def carry_length(name: str, cfg) -> int:
    """Tokens per carried segment: whole segments of whatever the block writes per segment (LM2 writes
    complete segments only, HMT takes whole ones, the neural memory whole chunks), at least 12.
    The cases run 2 such segments: (a)'s
    splits then start mid-segment and mid-chunk, and (shrunk) the one-call run is longer than the
    sliding windows (16), so it takes the blocked path that the cache never does."""
    settings = cfg.model.hmt if name == "hmt" else cfg.model.get(name, {})
    # Whole chunks too, as the configs' validation requires of document-mode segments (see NeuralMemoryBlock).
    steps = [settings[key] for key in ("segment", "segment_len", "chunk") if key in settings]
    step = math.lcm(1, *steps)
    return step * -(-12 // step)


def ids_of(length: int, seed: int):
    return jax.random.randint(jax.random.key(seed), (BATCH, length), 0, VOCAB)


def perturbed_positions(length: int, splits) -> tuple[int, ...]:
    return tuple(sorted({0, *(a for a, _ in splits[1:]), length // 2, length - 1}))


def zero_attention_output(params):
    """The params with every attention sublayer's output projection (`.../attention/out/kernel`) zeroed."""
    def zero(path, x):
        keys = [getattr(k, "key", None) for k in path]
        return jnp.zeros_like(x) if keys[-3:] == ["attention", "out", "kernel"] else x

    return jax.tree_util.tree_map_with_path(zero, params)


@functools.cache
def built(name: str, size: str):
    """Config, graph definition, parameters and the ids of a case: 2 carry segments, split 5 + rest (the
    token-by-token run has the one-token calls)."""
    cfg = case_config(name, size)
    graphdef, _ = factory.abstract(cfg.model, VOCAB)
    params = jax.jit(lambda key: factory.build(cfg.model, VOCAB, key)[1])(jax.random.key(0))
    length = 2 * carry_length(name, cfg)
    return cfg, graphdef, params, ids_of(length, seed=1), [(0, 5), (5, length)]


def one_device(name: str, size: str) -> dict:
    """Everything (a), (b) and (d) compare, from one compiled program on one device."""
    cfg, graphdef, params, ids, splits = built(name, size)
    length = ids.shape[1]
    positions = perturbed_positions(length, splits)
    perturbed = jnp.stack([ids] + [ids.at[:, t].set((ids[:, t] + 1) % VOCAB) for t in positions])

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        # One loop body runs the original and every perturbed input: bit-identity is only promised
        # between runs of one executable.
        calls = jax.lax.map(lambda ids_BxT: model(ids_BxT)[0], perturbed)
        split, tokens = split_calls(model, ids, splits), token_by_token(model, ids)
        segments_SxBxL = jnp.moveaxis(ids.reshape(BATCH, 2, length // 2), 1, 0)

        def step(carry, ids_BxL):
            logits, carry = model(ids_BxL, carry)
            return carry, logits

        # Segments 1, 2, then 2 and 1 again each from a document start (every lane reset): the fresh runs
        # from the same compiled step.
        resets_SxB = jnp.zeros((4, BATCH), bool).at[2:].set(True)
        carry, carried = segments.scan_segments(step, model.init_carry(BATCH), segments_SxBxL[jnp.array([0, 1, 1, 0])],
                                                resets=resets_SxB, init=model.init_carry(BATCH))
        return {"calls": calls, "split": split, "tokens": tokens, "carried": carried, "carry": carry}

    out = run(params)
    if name in ("titans_mal", "lm2"):
        quiet = run(zero_attention_output(params))
        out.update({"quiet_carried": quiet["carried"], "quiet_whole": quiet["calls"][0]})
    return {**jax.device_get(out), "positions": positions}


def case_ids(case):
    return f"{case[0]}-{case[1]}"


# Float32, sums in another order (chunked vs token-by-token recurrences, blocked vs masked attention).
TOLERANCE = dict(rtol=0, atol=3e-5)


def check_a_calls_and_decoding(name, size, out):
    whole = out["calls"][0]
    assert np.isfinite(whole).all()
    np.testing.assert_allclose(out["split"], whole, **TOLERANCE, err_msg="calls of 5 + rest with the state")
    np.testing.assert_allclose(out["tokens"], whole, **TOLERANCE, err_msg="token by token")


def check_b_causality(name, size, out):
    whole = out["calls"][0]
    for t, changed in zip(out["positions"], out["calls"][1:]):
        np.testing.assert_array_equal(changed[:, :t], whole[:, :t], err_msg=f"token {t} changed")
        assert not np.allclose(changed[:, t:], whole[:, t:]), f"token {t} reached no later logit"


# At the odd sizes only: tests/test_sharding.py checks every block's training loss and gradients on this
# mesh at tiny sizes; here, heads (3) that the tensor axis (2) cannot split, and decoding.
SHARDED_SIZES = ("odd",)


def check_c_sharded(name, size, out):
    if size not in SHARDED_SIZES:
        return
    cfg, graphdef, params, ids, _ = built(name, size)
    run = trainer.setup(with_mesh(cfg.copy_and_resolve_references(), MESHES["mixed"]), None,
                        tokenizer=ByteTokenizer())
    assert run.vocab_size == VOCAB

    def forward(params, ids_BxT):
        model = nnx.merge(graphdef, params)
        return model(ids_BxT)[0], token_by_token(model, ids_BxT)

    with jax.set_mesh(run.mesh):
        params = jax.device_put(params, run.shardings["params"])
        ids = jax.device_put(ids, parallel.batch_sharding(run.mesh))
        whole, tokens = jax.device_get(jax.jit(forward)(params, ids))
    assert sum(any(a is not None for a in x.sharding.spec) for x in jax.tree_util.tree_leaves(params)) > 0, \
        "no parameter is sharded: the comparison would prove nothing"
    atol = 1e-5 * float(np.max(np.abs(out["calls"][0]))) * ROUNDING_GROWTH.get(name, 1.0)
    np.testing.assert_allclose(whole, out["calls"][0], rtol=0, atol=atol, err_msg="one call")
    np.testing.assert_allclose(tokens, out["tokens"], rtol=0, atol=atol, err_msg="token by token")


def check_d_segment_carry(name, size, out):
    """Segments 1 and 2 with the carry (scan_segments), then 2 and 1 again from reset carries."""
    family = carry_family(name, built(name, size)[0])
    first, second, fresh, first_again = out["carried"]
    whole_first, whole_second = np.split(out["calls"][0], 2, axis=1)
    # Causal blocks: a call on segment 1 alone gives the first half of the one call's logits.
    np.testing.assert_allclose(first, whole_first, **TOLERANCE, err_msg="segment 1 from init_carry")
    np.testing.assert_array_equal(first_again, first, err_msg="a lane reset after two segments: not a fresh start")
    if family == "recurrent":
        np.testing.assert_allclose(second, whole_second, **TOLERANCE, err_msg="segment 2 with the carry")
        assert not np.allclose(fresh, second, **TOLERANCE), "the carry made no difference to segment 2"
    elif family == "local":
        assert all(c is None for c in out["carry"])
        np.testing.assert_array_equal(second, fresh, err_msg="segment 2 with the carry vs alone")
        assert not np.allclose(second, whole_second, **TOLERANCE), "segment 2 saw segment 1"
    else:
        assert not np.allclose(second, fresh, **TOLERANCE), "the carried memory never reached segment 2"
        assert not np.allclose(second, whole_second, **TOLERANCE), "segment 2's attention saw segment 1"
        if "quiet_carried" in out:
            np.testing.assert_allclose(np.concatenate(out["quiet_carried"][:2], axis=1), out["quiet_whole"],
                                       **TOLERANCE, err_msg="attention output zeroed: 2 carried segments vs one call")


CHECKS = (check_a_calls_and_decoding, check_b_causality, check_c_sharded, check_d_segment_carry)


@pytest.mark.parametrize("name, size", CASES, ids=list(map(case_ids, CASES)))
def test_block_conforms(name, size):
    """(a) to (d) from one compiled program per case (plus (c)'s sharded twin); every property is
    checked and every failure reported, one case being one test so that parallel workers never compile
    a case twice."""
    out = one_device(name, size)
    failures = []
    for check in CHECKS:
        try:
            check(name, size, out)
        except AssertionError as err:
            failures.append(f"{check.__name__}: {err}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------ decay


# Axes of parameters that are not weights multiplied by tokens: the blocks' state_axes (initial states,
# lookup tables, persistent tokens), and "branch": MAG's / MAC's two branch norms' scales, stored [2, D].
NOT_TOKEN_MATRICES = frozenset().union(*(cls.state_axes for cls in registry.load().values())) | {"branch"}


def decayed_paths(cfg, params) -> set[str]:
    """Paths of the parameters the optimizer of `cfg` decays: its update for zero gradients (Adam's part
    is then zero) is the decay alone."""
    cfg.optim.warmup_steps = 0  # else the first step's learning rate, hence its update, is zero
    tx = optim.make(cfg.optim, factory.abstract_model(cfg.model, VOCAB), cfg.train.steps)

    @jax.jit
    def first_update(params):
        updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
        return updates

    updates = jax.device_get(first_update(params))
    return {optim.path_str(path) for path, u in jax.tree_util.tree_leaves_with_path(updates) if np.any(u != 0)}


def logical_axes(cfg) -> dict[str, tuple]:
    model = nnx.eval_shape(lambda: factory.make_model(cfg.model, VOCAB, nnx.Rngs(params=0)))
    return {"/".join(map(str, path)): tuple(x.get_metadata().get("logical_axes") or ())
            for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("name, size", CASES, ids=list(map(case_ids, CASES)))
def test_e_weight_decay_only_on_token_matrices(name, size):
    cfg, _, params, _, _ = built(name, size)
    cfg = cfg.copy_and_resolve_references()
    axes = logical_axes(cfg)
    decayed = decayed_paths(cfg, params)
    assert decayed, "nothing decayed: the check would prove nothing"
    assert decayed <= set(axes), decayed - set(axes)
    wrong = {path: axes[path] for path in decayed if len(axes[path]) < 2 or NOT_TOKEN_MATRICES & set(axes[path])}
    assert not wrong, f"decayed, but not a weight matrix multiplied by tokens: {wrong}"
