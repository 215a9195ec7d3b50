"""ATLAS, the Miras models and DeepTransformers on the engine: the reductions of the neural-memory spec,
and every registered neural-memory block in the model (carried state, causality, gradients)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from memjax.kernels.neural_memory import engine
from memjax.memory import neural, titans
from tests.test_titans import (
    VOCAB,
    assert_calls_equal_one_call,
    assert_trees_close,
    build,
    random_problem,
    run_engine,
    variant_config,
)

FAMILIES = ("atlas", "omeganet", "moneta", "yaad", "memora", "deeptransformer", "dot")


def test_atlas_with_one_token_window_identity_features_and_no_newton_schulz_is_titans():
    """The atlas block with c = 1, phi = identity, the momentum optimizer and Titans' memory computes
    exactly what titans_lmm computes with the same parameters."""
    overrides = {"omega_window": 1, "feature_degree": 0, "optimizer": "momentum", "memory_residual": "none",
                 **titans.TITANS_STEP}
    atlas_cfg = variant_config("atlas", **{f"model.atlas.{k}": v for k, v in overrides.items()})
    titans_cfg = variant_config("titans_lmm")
    atlas_graphdef, params = build(atlas_cfg)
    titans_graphdef, titans_params = build(titans_cfg)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(titans_params)
    ids = jax.random.randint(jax.random.key(0), (2, 13), 0, VOCAB)
    run = lambda graphdef: jax.jit(lambda p: nnx.merge(graphdef, p)(ids)[0])(params)
    np.testing.assert_array_equal(run(atlas_graphdef), run(titans_graphdef))


def test_omega_window_gradient_equals_an_explicit_loop_over_the_window():
    """One chunk with theta = 1, no momentum, no decay: A_end = A_0 - sum_t sum_{i = t-c+1..t} gamma_i
    grad l_i(A_0), the banded write matrix against a double loop (tokens before the chunk included)."""
    spec = engine.Spec(depth=2, expansion=2, window=3, chunk=6, optimizer="gd")
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(0), spec, length=6, initial_momentum=False)
        s = {**s, "lr": jnp.ones(6), "keep": jnp.ones(6), "gamma": s["gamma"].at[:2].set(jnp.asarray([0.7, 0.4]))}
        _, end, _, _ = run_engine(spec, weights, momentum, s)
        expected = list(weights)
        for t in range(6):
            for i in range(t, t + spec.window):  # positions in the history-prefixed streams
                grads = jax.grad(lambda ws, i=i: engine.objective_value(
                    spec, engine.apply_fixed(spec, ws, s["k"][i : i + 1]), s["v"][i : i + 1])[0])(weights)
                expected = [e - s["gamma"][i] * g for e, g in zip(expected, grads)]
        assert_trees_close(end, expected, atol=1e-12)


@pytest.mark.parametrize("shape", [(8, 8), (6, 16), (16, 6)])
def test_newton_schulz_is_odd_and_pushes_singular_values_to_one(shape):
    x = jax.random.normal(jax.random.key(1), shape) * 3.0
    out = engine.newton_schulz(x, steps=5)
    np.testing.assert_allclose(engine.newton_schulz(-x, steps=5), -out, atol=1e-6)
    singular = np.linalg.svd(np.asarray(out), compute_uv=False)
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
    before = np.linalg.svd(np.asarray(x), compute_uv=False)
    assert singular.max() / singular.min() < min(2.0, before.max() / before.min())
    # The singular vectors are kept: in x's singular bases, out is diagonal (its values: the map of x's).
    u, _, vt = np.linalg.svd(np.asarray(x), full_matrices=False)
    rotated = u.T @ np.asarray(out) @ vt.T
    np.testing.assert_allclose(rotated, np.diag(np.diag(rotated)), atol=1e-4)
    np.testing.assert_allclose(np.sort(np.diag(rotated)), np.sort(singular), atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 8), (6, 16), (16, 6)])
def test_newton_schulz_on_the_gram_equals_the_iteration_on_the_matrix(shape):
    """nu Q x from newton_schulz_gram(x x^T) (x the wide orientation) is newton_schulz(x) in float64, and
    at x = 0 both the value and the gradient are finite."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(2), shape, jnp.float64)

        def from_gram(x):
            wide = x if x.shape[0] <= x.shape[1] else x.T
            nu, q = engine.newton_schulz_gram(wide @ wide.T, steps=5)
            out = nu * q @ wide
            return out if wide is x else out.T

        np.testing.assert_allclose(from_gram(x), engine.newton_schulz(x, steps=5), atol=1e-12)
        grad = jax.grad(lambda x: jnp.sum(jnp.sin(from_gram(x))))(jnp.zeros(shape))
        assert np.all(np.isfinite(np.asarray(grad)))


def test_newton_schulz_forms_in_float32_against_float64():
    """ATLAS's chunked engine at the benchmark's shapes (273 features, 16-wide values, expansion 2, Omega
    window 4), float32 against float64: the matrix form within 1e-5 of the outputs' scale, the Gram form
    (the default) within 1e-4. The Gram squares the update's condition number, so float32 rounding grows
    as eps / sigma^2 in a direction of singular value sigma; 1e-4 is the bound that the sharded-vs-one-device
    comparisons scale their tolerances by (tests/helpers.py ROUNDING_GROWTH)."""
    rng = np.random.default_rng(10)
    base = engine.Spec(depth=2, expansion=2, residual="add", window=4, optimizer="muon", chunk=16)
    in_dim, out_dim, length, history = 273, 16, 32, 3
    weights = [rng.normal(size=shape) / np.sqrt(shape[0]) for shape in engine.layer_shapes(base, in_dim, out_dim)]
    momentum = [rng.normal(size=w.shape) * 0.1 for w in weights]
    streams = dict(q=rng.normal(size=(length, in_dim)) * 4 / np.sqrt(in_dim),
                   k=rng.normal(size=(history + length, in_dim)) * 4 / np.sqrt(in_dim),
                   v=rng.normal(size=(history + length, out_dim)), lr=rng.uniform(0.01, 0.2, length),
                   mom=rng.uniform(0.5, 0.99, length), keep=rng.uniform(0.9, 1.0, length),
                   gamma=np.concatenate([np.zeros(history), rng.uniform(0.3, 1.0, length)]))
    problem = (weights, momentum, streams)
    with jax.enable_x64(True):
        as64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), problem)
        reference = np.asarray(run_engine(base, *as64)[0])
    scale = np.max(np.abs(reference))
    as32 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), problem)
    for form, bound in (("matrix", 1e-5), ("gram", 1e-4)):
        y = np.asarray(run_engine(engine.Spec(**{**base.__dict__, "ns_form": form}), *as32)[0])
        assert np.max(np.abs(y - reference)) < bound * scale, form


@pytest.mark.parametrize("name, spec, in_dim, out_dim", [
    ("atlas", engine.Spec(depth=2, expansion=2, residual="add", window=4, optimizer="muon", ns_form="gram"), 273, 16),
    ("titans", engine.Spec(depth=2, expansion=4), 64, 64),
])
def test_engine_flops_match_the_compiled_chunk_step(name, spec, in_dim, out_dim):
    """The analytic count of the matmul-dominated paths (Muon's Gram path, the linear path) is within 15%
    of XLA's count for the compiled chunk step (which also counts the elementwise work)."""
    c, k = spec.chunk, spec.chunk + spec.window - 1
    state = [jnp.zeros(shape) for shape in engine.layer_shapes(spec, in_dim, out_dim)]
    chunk = {"q": jnp.zeros((c, in_dim)), "k": jnp.zeros((k, in_dim)), "v": jnp.zeros((k, out_dim)),
             "lr": jnp.zeros(c), "mom": jnp.zeros(c), "keep": jnp.zeros(c), "gamma": jnp.zeros(k)}
    step = jax.jit(lambda state, momentum, chunk: engine.chunk_step(spec, state, momentum, chunk))
    compiled = step.lower(state, state, chunk).compile().cost_analysis()
    compiled = compiled[0] if isinstance(compiled, list) else compiled
    analytic = engine.forward_flops_per_token(spec, in_dim, out_dim)
    assert analytic == pytest.approx(compiled["flops"] / c, rel=0.15), name
    assert analytic == sum(engine.engine_flops(spec, in_dim, out_dim).values())


def test_moneta_with_p_and_q_two_is_l2_gradient_descent_with_decay():
    moneta = engine.Spec(depth=2, expansion=2, residual="norm", objective="lp", p=2.0, retention="qnorm", q=2.0,
                         optimizer="gd", chunk=4)
    l2 = engine.Spec(depth=2, expansion=2, residual="norm", objective="l2", retention="decay", optimizer="gd", chunk=4)
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(2), moneta)
        assert_trees_close(run_engine(moneta, weights, momentum, s)[:3], run_engine(l2, weights, momentum, s)[:3],
                           atol=1e-12)


def test_yaad_below_its_threshold_is_l2_and_above_it_clips_the_step():
    yaad = engine.Spec(depth=2, expansion=2, objective="huber", optimizer="gd", chunk=4)
    l2 = engine.Spec(depth=2, expansion=2, objective="l2", optimizer="gd", chunk=4)
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(3), yaad)
        wide = {**s, "delta": jnp.full_like(s["delta"], 1e6)}
        assert_trees_close(run_engine(yaad, weights, momentum, wide)[:3], run_engine(l2, weights, momentum, s)[:3],
                           atol=1e-12)
        # Above the threshold the output gradient has norm delta (an L1-like step), not ||r||.
        _, deltas, _ = engine.gradient_factors(yaad, weights, s["k"], s["v"] * 100, s["delta"])
        np.testing.assert_allclose(np.linalg.norm(deltas[-1], axis=-1), s["delta"], rtol=1e-6)


def test_memora_weights_stay_on_the_simplex():
    spec = engine.Spec(depth=2, expansion=2, residual="norm", retention="softmax", optimizer="gd", chunk=4)
    weights, momentum, s = random_problem(np.random.default_rng(4), spec, length=16)
    _, state, _, _ = run_engine(spec, weights, momentum, {**s, "lr": s["lr"] * 5})
    for w in engine.effective_weights(spec, state):
        assert np.all(np.asarray(w) >= 0)
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(engine.effective_weights(spec, state)[0], engine.effective_weights(spec, weights)[0])


def test_softmax_read_vjp_equals_autodiff_of_its_definition():
    """The closed-form VJP of `softmax_read` against jax.grad of x softmax(A) written out, in float64."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        a, x, probe = (jnp.asarray(rng.normal(size=shape) * 3) for shape in ((5, 7), (5,), (7,)))
        expected = jax.grad(lambda a, x: jnp.sum(jnp.sin(x @ jax.nn.softmax(a, axis=-1)) * probe), (0, 1))(a, x)
        actual = jax.grad(lambda a, x: jnp.sum(jnp.sin(engine.softmax_read(a, x)) * probe), (0, 1))(a, x)
        assert_trees_close(actual, expected, atol=1e-12)


@pytest.mark.parametrize("read, window, optimizer", [("after", 1, "gd"), ("before", 2, "momentum")])
def test_memora_outer_gradient_matches_finite_differences(read, window, optimizer):
    """The train step's gradient through softmax retention (`chunk_step_softmax` and its custom VJP)."""
    spec = engine.Spec(depth=2, expansion=2, residual="norm", retention="softmax", optimizer=optimizer,
                       window=window, read=read, chunk=3, remat_chunks=2)
    with jax.enable_x64(True):
        weights, momentum, s = random_problem(np.random.default_rng(8), spec, dim=3, length=6)
        probe = jnp.asarray(np.random.default_rng(9).normal(size=(6, 3)))

        def objective(weights, s):
            y, w, m, _ = run_engine(spec, weights, momentum, s)
            return jnp.sum(y * probe) + sum(jnp.sum(jnp.sin(x)) for x in w + m)

        check_grads(objective, (weights, s), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_linear_hebbian_memory_with_truncated_exp_features_is_unnormalised_softmax_attention(degree):
    """M_0 = 0, theta = 1, no decay: y_t = phi(q_t) sum_{i<=t} phi(k_i)^T v_i = sum_{i<=t} kappa(q_t, k_i) v_i
    with kappa(q, k) = sum_{j<=p} (q . k)^j / j!."""
    spec = engine.Spec(depth=1, objective="dot", optimizer="gd", chunk=4)
    dim, length = 3, 8
    coefficients = [1 / math.sqrt(math.factorial(i)) for i in range(degree + 1)]
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        q, k, v = (rng.normal(size=(length, dim)) for _ in range(3))
        width = neural.feature_dim(dim, degree)
        s = {"q": neural.features(jnp.asarray(q), coefficients, degree),
             "k": neural.features(jnp.asarray(k), coefficients, degree),
             "v": jnp.asarray(v), "lr": jnp.ones(length), "mom": jnp.zeros(length), "keep": jnp.ones(length),
             "gamma": jnp.ones(length)}
        y, _, _, _ = run_engine(spec, [jnp.zeros((width, dim))], [jnp.zeros((width, dim))], s)
        dots = q @ k.T
        kernel = sum(dots**j / math.factorial(j) for j in range(degree + 1))
        np.testing.assert_allclose(y, np.tril(kernel) @ v, atol=1e-10)


# --- the blocks in the model --------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_any_split_and_token_by_token_decoding_equal_one_call(name):
    assert_calls_equal_one_call(name, length=11, splits=[(0, 5), (5, 6), (6, 11)])


@pytest.mark.parametrize("name", FAMILIES)
def test_causality_and_gradients_of_every_family(name):
    graphdef, params = build(variant_config(name))
    ids = jax.random.randint(jax.random.key(7), (2, 13), 0, VOCAB)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids)[0])
    logits = forward(params, ids)
    for t in (0, 6, 12):
        changed = forward(params, ids.at[:, t].set((ids[:, t] + 1) % VOCAB))
        np.testing.assert_array_equal(np.asarray(changed[:, :t]), np.asarray(logits[:, :t]))
        assert not np.allclose(changed[:, t:], logits[:, t:])
    grads = jax.jit(jax.grad(lambda p: jnp.mean(forward(p, ids) ** 2)))(params)
    memory = grads["blocks"][0]["memory"]
    for path, g in jax.tree_util.tree_leaves_with_path(memory):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


@pytest.mark.parametrize("hybrid", ["mag", "mal", "mac"])
def test_atlas_in_each_hybrid(hybrid):
    cfg = variant_config("atlas", **{"model.atlas.hybrid": hybrid, "model.atlas.persistent_tokens": 2})
    graphdef, params = build(cfg)
    assert "attention" in params["blocks"][0]
    ids = jax.random.randint(jax.random.key(8), (1, 10), 0, VOCAB)
    logits = jax.jit(lambda p: nnx.merge(graphdef, p)(ids)[0])(params)
    assert np.isfinite(np.asarray(logits)).all()
