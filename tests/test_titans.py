"""The test-time memory engine and the Titans blocks: the equivalences of the neural-memory spec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from memjax import config
from memjax.kernels.neural_memory import engine
from memjax.memory import titans
from memjax.models import factory
from tests.helpers import split_and_decoded_logits, tiny_config

VOCAB = 64
VARIANTS = ("titans_lmm", "titans_mag", "titans_mal", "titans_mac")
ARCHITECTURES = {
    "linear": dict(depth=1),
    "mlp2": dict(depth=2, expansion=2),
    "mlp3_silu": dict(depth=3, expansion=2, activation="silu"),
    "residual_mlp2": dict(depth=2, expansion=2, residual="norm"),
    "atlas_mlp2": dict(depth=2, expansion=2, residual="add"),
    "gated": dict(memory="gated", expansion=2, residual="add"),
}
# Inner objective x optimizer x retention x window combinations (ATLAS, Miras, DeepTransformers).
RULES = {
    "titans": dict(),
    "omega": dict(window=3),
    "atlas_muon": dict(window=3, optimizer="muon", ns_form="matrix"),
    "atlas_muon_gram": dict(window=3, optimizer="muon", ns_form="gram"),
    "moneta": dict(objective="lp", p=3.0, retention="qnorm", optimizer="gd"),
    "yaad": dict(objective="huber", optimizer="gd"),
    "memora": dict(retention="softmax", optimizer="gd"),
    "memora_momentum": dict(retention="softmax"),
    "hebbian": dict(objective="dot", optimizer="gd"),
}


def random_problem(rng, spec, dim=4, length=12, initial_momentum=True):
    """Random state and streams for one sequence and head; k, v, gamma, delta carry the window's c - 1
    earlier tokens first (zero weight, as at the start of a sequence)."""
    shapes = engine.layer_shapes(spec, dim)
    weights = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[0])) for s in shapes]
    momentum = [jnp.asarray(rng.normal(size=s) * (0.1 if initial_momentum else 0.0)) for s in shapes]
    history = spec.window - 1
    q = jnp.asarray(rng.normal(size=(length, dim)))
    k, v = (jnp.asarray(rng.normal(size=(history + length, dim))) for _ in range(2))
    lr = jnp.asarray(rng.uniform(0.05, 0.5, size=length))
    mom, keep = (jnp.asarray(rng.uniform(0.1, 0.9, size=length)) for _ in range(2))
    gamma = jnp.asarray(np.concatenate([np.zeros(history), rng.uniform(0.3, 1.0, size=length)]))
    delta = jnp.asarray(rng.uniform(0.5, 2.0, size=history + length))
    return weights, momentum, dict(q=q, k=k, v=v, lr=lr, mom=mom, keep=keep, gamma=gamma, delta=delta)


def reference_loop(spec, state, momentum, s, freeze_every):
    """The recurrence token by token (see memjax.kernels.neural_memory.engine); inner gradients, and qnorm's scale, at
    the state of the last multiple of `freeze_every` tokens (1: the exact recurrence)."""
    a, m, ys = list(state), list(momentum), []
    history = spec.window - 1
    for t in range(s["q"].shape[0]):
        if t % freeze_every == 0:
            frozen = list(a)
        window = slice(t, t + history + 1)  # in the history-prefixed k, v, gamma, delta

        def window_loss(ws, window=window):
            pred = engine.apply_fixed(spec, ws, s["k"][window])
            losses = engine.objective_value(spec, pred, s["v"][window], s["delta"][window])
            return jnp.sum(s["gamma"][window] * losses)

        grads = jax.grad(window_loss)(engine.effective_weights(spec, frozen))
        eta = 0.0 if spec.optimizer == "gd" else s["mom"][t]
        previous = a
        if spec.optimizer == "muon":
            m = [eta * mi - g for mi, g in zip(m, grads)]
            a = [s["keep"][t] * ai + s["lr"][t] * engine.newton_schulz(mi, spec.ns_steps) for ai, mi in zip(a, m)]
        else:
            m = [eta * mi - s["lr"][t] * g for mi, g in zip(m, grads)]
            a = [s["keep"][t] * ai + mi for ai, mi in zip(a, m)]
        read_from = engine.effective_weights(spec, a if spec.read == "after" else previous, frozen)
        if spec.read == "before" and t % freeze_every == 0:
            read_from = engine.effective_weights(spec, previous)
        ys.append(engine.apply_fixed(spec, read_from, s["q"][t : t + 1])[0])
    return jnp.stack(ys), a, m


def run_engine(spec, weights, momentum, s):
    """scan_chunks on one sequence and head (length a multiple of the chunk)."""
    one = lambda x: x[None, None]
    n = s["q"].shape[0] // spec.chunk
    streams = {k: one(x) for k, x in s.items() if k in spec.window_streams or k in ("q", "lr", "mom", "keep")}
    y, w, m, stats = engine.scan_chunks(
        spec, [one(x) for x in weights], [one(x) for x in momentum], streams, jnp.ones((n,), bool),
        with_after_loss=True,
    )
    return y[0, 0], [x[0, 0] for x in w], [x[0, 0] for x in m], stats


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


# --- the engine ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch, objective", [(a, "l2") for a in sorted(ARCHITECTURES)]
                         + [("mlp2", o) for o in engine.OBJECTIVES if o != "l2"])
def test_factored_inner_gradients_equal_jax_grad_per_token(arch, objective):
    spec = engine.Spec(**ARCHITECTURES[arch], objective=objective)
    with jax.enable_x64(True):
        weights, _, s = random_problem(np.random.default_rng(0), spec)
        inputs, deltas, losses = engine.gradient_factors(spec, weights, s["k"], s["v"], s["delta"])
        for t in range(s["k"].shape[0]):
            expected = jax.grad(lambda ws, t=t: engine.objective_value(
                spec, engine.apply_fixed(spec, ws, s["k"][t : t + 1]), s["v"][t : t + 1], s["delta"][t : t + 1])[0]
            )(weights)
            factored = [jnp.outer(h[t], d[t]) for h, d in zip(inputs, deltas)]
            assert_trees_close(factored, expected, atol=1e-12)
        np.testing.assert_allclose(
            losses, engine.objective_value(spec, engine.apply_fixed(spec, weights, s["k"]), s["v"], s["delta"]),
            atol=1e-12
        )


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("read", engine.READS)
def test_chunk_one_equals_the_token_loop_in_float64(arch, read):
    spec = engine.Spec(**ARCHITECTURES[arch], read=read, chunk=1, remat_chunks=3)
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(1), spec)
        y, w, m, _ = run_engine(spec, weights, momentum, s)
        y_ref, w_ref, m_ref = reference_loop(spec, weights, momentum, s, freeze_every=1)
        assert_trees_close((y, w, m), (y_ref, w_ref, m_ref), atol=1e-10)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_chunk_b_equals_the_chunk_start_frozen_loop_and_differs_from_the_exact_one(arch):
    spec = engine.Spec(**ARCHITECTURES[arch], chunk=4, remat_chunks=2)
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(2), spec)
        y, w, m, _ = run_engine(spec, weights, momentum, s)
        assert_trees_close((y, w, m), reference_loop(spec, weights, momentum, s, freeze_every=4), atol=1e-10)
        y_exact, _, _ = reference_loop(spec, weights, momentum, s, freeze_every=1)
        assert np.abs(np.asarray(y - y_exact)).max() > 1e-3


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("chunk", [1, 4])
def test_every_objective_optimizer_and_retention_equals_its_loop(rule, chunk):
    """Chunk 1 equals the exact recurrence and chunk 4 the chunk-start-frozen loop (float64), for the
    Omega window, Muon, q-norm, softmax retention, l_p, Huber and Hebbian rules."""
    spec = engine.Spec(**ARCHITECTURES["atlas_mlp2"], **RULES[rule], chunk=chunk, remat_chunks=2)
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(10), spec)
        if spec.optimizer == "muon":
            momentum = [jnp.zeros_like(m) for m in momentum]
        y, w, m, _ = run_engine(spec, weights, momentum, s)
        assert_trees_close((y, w, m), reference_loop(spec, weights, momentum, s, freeze_every=chunk), atol=1e-9)


def test_associative_scan_coefficients_equal_the_sequential_recurrence():
    """Row t of chunk_coefficients, applied to (S_0, M_0, u_1..u_C) as vectors, is the loop's (S_t, M_t)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        c, dim = 7, 3
        lr, mom, keep = (jnp.asarray(rng.uniform(0, 1, c)) for _ in range(3))
        s0, m0 = rng.normal(size=dim), rng.normal(size=dim)
        u = rng.normal(size=(c, dim))
        coef = np.asarray(engine.chunk_coefficients(lr, mom, keep))
        basis = np.concatenate([s0[None], m0[None], u])
        s, m = s0, m0
        for t in range(c + 1):
            np.testing.assert_allclose(coef[t] @ basis, np.stack([s, m]), atol=1e-12)
            if t < c:
                s = float(mom[t]) * s - float(lr[t]) * u[t]
                m = float(keep[t]) * m + s


def test_linear_memory_without_momentum_is_the_delta_rule():
    """eta = 0: S_t = (1 - alpha_t) S_{t-1} - theta_t (S_{t-1} k_t - v_t) k_t^T with S = M^T, y = S q.
    With alpha = 0 as well this is DeltaNet, S(I - theta k k^T) + theta v k^T. (Gated DeltaNet decays
    before the gradient, a S (I - beta k k^T) + beta v k^T; Titans decays after it, as here.)"""
    spec = engine.Spec(depth=1, chunk=1)
    with jax.enable_x64(True):
        weights, _, s = random_problem(np.random.default_rng(4), spec, initial_momentum=False)
        for decay in (True, False):
            s = {**s, "mom": jnp.zeros_like(s["mom"]), "keep": s["keep"] if decay else jnp.ones_like(s["keep"]),
                 "gamma": jnp.ones_like(s["gamma"])}
            y, _, _, _ = run_engine(spec, weights, [jnp.zeros_like(weights[0])], s)
            state, eye = np.asarray(weights[0]).T, np.eye(4)
            for t in range(s["q"].shape[0]):
                k, v, theta, a = (np.asarray(s[name][t]) for name in ("k", "v", "lr", "keep"))
                if decay:
                    state = a * state - theta * np.outer(state @ k - v, k)
                else:
                    state = state @ (eye - theta * np.outer(k, k)) + theta * np.outer(v, k)
                np.testing.assert_allclose(y[t], state @ np.asarray(s["q"][t]), atol=1e-12)


@pytest.mark.parametrize("arch", ["linear", "residual_mlp2"])
def test_outer_gradient_through_the_chunked_algorithm_matches_finite_differences(arch):
    spec = engine.Spec(**ARCHITECTURES[arch], chunk=3, remat_chunks=2)
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(5), spec, dim=3, length=6)
        probe = jnp.asarray(np.random.default_rng(6).normal(size=(6, 3)))

        def objective(weights, s):
            y, w, _, _ = run_engine(spec, weights, momentum, s)
            return jnp.sum(y * probe) + sum(jnp.sum(x) for x in w)

        check_grads(objective, (weights, s), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch, step, sweeps", [("linear", 1.0, 2), ("mlp2", 0.1, 8)])
def test_the_memory_stores_key_value_pairs_and_reads_them_back(arch, step, sweeps):
    """Write 16 random unit keys -> random values with fixed gates (no momentum, no decay; a few sweeps),
    then query every key with writing off: the read-out's nearest value is the key's own (chance: 1/16)
    and the read-out is close to it; before the writes it is not."""
    dim, pairs = 32, 16
    spec = engine.Spec(**ARCHITECTURES[arch], chunk=1)
    rng = np.random.default_rng(7)
    keys = rng.normal(size=(pairs, dim))
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
    values = rng.normal(size=(pairs, dim))
    k = np.concatenate([np.tile(keys, (sweeps, 1)), keys])
    v = np.concatenate([np.tile(values, (sweeps, 1)), values])
    steps = np.concatenate([np.full(sweeps * pairs, step), np.zeros(pairs)])
    s = {"q": jnp.asarray(k, jnp.float32), "k": jnp.asarray(k, jnp.float32), "v": jnp.asarray(v, jnp.float32),
         "lr": jnp.asarray(steps, jnp.float32), "mom": jnp.zeros(len(k)), "keep": jnp.ones(len(k)),
         "gamma": jnp.ones(len(k))}
    weights = [jnp.asarray(rng.normal(size=sh) / np.sqrt(sh[0]), jnp.float32) for sh in engine.layer_shapes(spec, dim)]
    y, _, _, _ = run_engine(spec, weights, [jnp.zeros_like(w) for w in weights], s)

    def recall(read):
        distances = np.linalg.norm(read[:, None, :] - values[None], axis=-1)
        return np.mean(distances.argmin(-1) == np.arange(pairs)), np.linalg.norm(read - values) / np.linalg.norm(values)

    accuracy, error = recall(np.asarray(y[-pairs:]))
    assert accuracy >= 0.9 and error < 0.5, (accuracy, error)
    accuracy_before, error_before = recall(
        np.asarray(engine.apply_fixed(spec, weights, jnp.asarray(keys, jnp.float32))))
    assert accuracy_before <= 0.25 and error_before > 0.9, (accuracy_before, error_before)


def test_inner_loss_falls_over_a_chunk():
    spec = engine.Spec(depth=2, expansion=2, chunk=8)
    weights, momentum, s = random_problem(np.random.default_rng(8), spec, dim=8, length=16, initial_momentum=False)
    s = {**s, "k": s["k"] / jnp.linalg.norm(s["k"], axis=-1, keepdims=True), "mom": jnp.zeros(16),
         "keep": jnp.ones(16), "lr": jnp.full(16, 0.2), "gamma": jnp.ones(16)}
    _, _, _, stats = run_engine(spec, weights, momentum, s)
    assert np.all(np.asarray(stats["loss_after"]) < np.asarray(stats["loss_before"]))


# --- the blocks in the model --------------------------------------------------------------------


def variant_config(name, **overrides):
    section = {f"model.{name}.chunk": 4, f"model.{name}.segment": 8, f"model.{name}.window": 8,
               f"model.{name}.heads": 2}
    cfg = tiny_config(**{"model.block_pattern": name, **section, **overrides})
    config.validate(cfg)
    return cfg


def build(cfg):
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    return graphdef, params


@pytest.mark.parametrize("name", VARIANTS)
def test_any_split_into_calls_and_token_by_token_decoding_equal_one_parallel_call(name):
    """Carried state: the memory's pending tokens, conv history, KV caches and (MAC) segment state make
    any split, including one token at a time, equal to the whole sequence in one call."""
    assert_calls_equal_one_call(name, length=19, splits=[(0, 7), (7, 8), (8, 13), (13, 19)])


@pytest.mark.parametrize("persistent", [3, 6])
def test_mac_persistent_tokens_off_the_chunk_grid_decode_as_one_call(persistent):
    """The persistent tokens leave persistent % chunk tokens pending in the memory: the one-call (training)
    path must keep them, so its chunk grid is decoding's. A larger inner step than Titans' makes a shifted
    grid show well above float32 rounding (about 1e-3 on these logits of about 0.5)."""
    section = {"persistent_tokens": persistent, "theta_max": 0.5, "theta_init": 0.25}
    assert_calls_equal_one_call("titans_mac", length=19, splits=[(0, 5), (5, 19)],
                                **{f"model.titans_mac.{key}": value for key, value in section.items()})


def assert_calls_equal_one_call(name, length, splits, **overrides):
    """Logits of one call == of `splits` calls with carried state == of decoding token by token."""
    graphdef, params = build(variant_config(name, **overrides))
    ids = jax.random.randint(jax.random.key(1), (2, length), 0, VOCAB)
    whole, outs = split_and_decoded_logits(graphdef, params, ids, splits)
    for label, logits in outs.items():
        np.testing.assert_allclose(logits, whole, atol=2e-5, err_msg=label)


def test_state_carried_across_a_chunk_boundary_split_equals_one_call_for_the_memory_alone():
    cfg = variant_config("titans_lmm", **{"model.titans_lmm.persistent_tokens": 3})
    graphdef, params = build(cfg)
    x = jax.random.normal(jax.random.key(2), (2, 16, cfg.model.d_model))

    @jax.jit
    def run(params):
        block = nnx.merge(graphdef, params).blocks[0]
        whole, _ = block(x)
        first, state = block(x[:, :8], block.init_state(2, 16, jnp.float32))
        second, state = block(x[:, 8:], state)
        return whole, first, second, state

    whole, first, second, state = run(params)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=1e-5)
    assert int(state["memory"]["count"]) == (3 + 16) % 4  # persistent tokens shift the chunk grid


@pytest.mark.parametrize("name", VARIANTS)
def test_perturbing_a_future_token_never_changes_earlier_outputs(name):
    graphdef, params = build(variant_config(name))
    forward = jax.jit(lambda ids: nnx.merge(graphdef, params)(ids)[0])
    ids = jax.random.randint(jax.random.key(3), (2, 21), 0, VOCAB)
    logits = forward(ids)
    for t in (0, 5, 8, 20):
        changed = forward(ids.at[:, t].set((ids[:, t] + 1) % VOCAB))
        np.testing.assert_array_equal(np.asarray(changed[:, :t]), np.asarray(logits[:, :t]))
        assert not np.allclose(changed[:, t:], logits[:, t:])


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_reach_every_parameter(name):
    cfg = variant_config(name, **{f"model.{name}.persistent_tokens": 2})
    graphdef, params = build(cfg)
    ids = jax.random.randint(jax.random.key(4), (2, 16), 0, VOCAB)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(ids)[0] ** 2)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_ragged_lengths_are_padded_and_masked():
    """A length that is not a multiple of the chunk (or of MAC's segment) gives the prefix of a longer run."""
    for name in ("titans_lmm", "titans_mac"):
        graphdef, params = build(variant_config(name))
        forward = jax.jit(lambda ids: nnx.merge(graphdef, params)(ids)[0])  # noqa: B023 (used in this iteration only)
        ids = jax.random.randint(jax.random.key(5), (1, 24), 0, VOCAB)
        np.testing.assert_allclose(forward(ids[:, :13]), forward(ids)[:, :13], atol=1e-5)


def test_diagnostics_per_layer():
    cfg = variant_config("titans_mag", **{"model.num_layers": 2, "model.block_pattern": "attention,titans_mag"})
    graphdef, params = build(cfg)
    ids = jax.random.randint(jax.random.key(6), (2, 16), 0, VOCAB)
    metrics = titans.memory_diagnostics(graphdef, params, [{"inputs": ids}, {"inputs": ids}])
    expected = {"inner_loss_before", "inner_loss_after", "theta", "eta", "alpha", "weight_norm", "gate"}
    assert set(metrics) == {f"memory/layer1/{key}" for key in expected}
    p = cfg.model.titans_mag
    assert metrics["memory/layer1/theta"] == pytest.approx(p.theta_init, rel=0.2)
    assert metrics["memory/layer1/eta"] == pytest.approx(p.eta_init, rel=0.05)
    assert metrics["memory/layer1/alpha"] == pytest.approx(p.alpha_init, rel=0.2)
    assert 0 < metrics["memory/layer1/gate"] < 1 and metrics["memory/layer1/weight_norm"] > 0
    assert not nnx.merge(graphdef, params).blocks[1].memory.record  # the caller's model is untouched


def test_flops_count_the_engine_and_the_attention_window():
    cfg = variant_config("titans_mag")
    p, d = cfg.model.titans_mag, cfg.model.d_model
    base = titans.TitansMAG.flops_per_token(cfg.model, 32)
    cfg.model.titans_mag.window = 4
    assert base - titans.TitansMAG.flops_per_token(cfg.model, 32) == 12.0 * d * 4
    assert titans.TitansLMM.flops_per_token(variant_config("titans_lmm").model, 32) > 0
    assert p.chunk == 4


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("heads", 3, "model.titans_lmm.heads: 3 heads do not divide"),
        ("chunk", 0, "model.titans_lmm.chunk: must be >= 1"),
        ("read", "during", "model.titans_lmm.read: 'during' is not one of"),
        ("hybrid", "mat", "model.titans_lmm.hybrid: 'mat' is not one of"),
        ("activation", "relu6", "model.titans_lmm.activation"),
        ("eta_init", 1.0, "model.titans_lmm.eta_init: must lie in"),
    ],
)
def test_validation_names_the_field(field, value, message):
    with pytest.raises(config.ConfigError, match=message):
        variant_config("titans_lmm", **{f"model.titans_lmm.{field}": value})


def test_mac_segment_must_be_a_multiple_of_the_chunk_and_windows_fit_the_sequence():
    with pytest.raises(config.ConfigError, match="model.titans_mac.segment: must be a positive multiple"):
        variant_config("titans_mac", **{"model.titans_mac.segment": 6})
    with pytest.raises(config.ConfigError, match="model.titans_mag.window"):
        variant_config("titans_mag", **{"model.titans_mag.window": 64})


def test_model_flops_count_the_engine_not_the_memory_initial_state_as_matmuls():
    cfg = variant_config("titans_lmm", **{"model.titans_lmm.persistent_tokens": 2})
    _, params = build(cfg)
    leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(params)]
    matmul = sum(x.size for path, x in leaves
                 if x.ndim >= 2 and "initial_state" not in path and "persistent" not in path)
    per_block = titans.TitansLMM.flops_per_token(cfg.model, 32)
    assert factory.flops_per_token(cfg.model, VOCAB, 32) == 6 * matmul + cfg.model.num_layers * per_block
