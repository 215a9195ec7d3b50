"""The delta-rule blocks (memjax.memory.deltanet) and their kernel (memjax.kernels.delta_rule): the chunked
form against token-by-token float64 loops of the papers' equations (values and gradients), DeltaProduct
against an explicit product of Householder factors, the reductions (alpha = 1 is DeltaNet, n_h = 1 is
Gated DeltaNet), chunk-size invariance and decoding in float64, validation, FLOPs, a smoke train and the
configs. Causality, sharding and segment carry: tests/test_conformance.py, which runs every registered
block."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from memjax import config, trainer
from memjax.config import load_config
from memjax.kernels import delta_rule
from memjax.memory import deltanet
from memjax.metrics import read_jsonl
from memjax.models import factory, registry
from tests.helpers import config_file, split_and_decoded_logits, tiny_config

NAMES = ("gated_deltanet", "deltanet", "deltaproduct")
VOCAB = 64


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# --- references: the papers' recurrences, token by token ----------------------------------------------


def issue_loop(q_TxK, k_TxK, v_TxV, beta_T, log_decay_T, state_VxK):
    """Gated DeltaNet as written in the issue and the paper, the state [V, K]:
    S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t."""
    eye = jnp.eye(k_TxK.shape[-1], dtype=k_TxK.dtype)

    def step(s, token):
        q, k, v, beta, log_decay = token
        s = jnp.exp(log_decay) * s @ (eye - beta * jnp.outer(k, k)) + beta * jnp.outer(v, k)
        return s, s @ q

    state_VxK, o_TxV = jax.lax.scan(step, state_VxK, (q_TxK, k_TxK, v_TxV, beta_T, log_decay_T))
    return o_TxV, state_VxK


def householder_loop(q_TxK, k_TxnxK, v_TxnxV, beta_Txn, log_decay_T, state_VxK):
    """DeltaProduct (Siems et al. 2025), the state [V, K]: S_t = S_{t-1} A_t + B_t with
    A_t = alpha_t H_1 .. H_n, B_t = sum_j beta_j v_j k_j^T H_{j+1} .. H_n, H_j = I - beta_j k_j k_j^T; o_t = S_t q_t."""
    n, dk = k_TxnxK.shape[1], k_TxnxK.shape[2]
    eye = jnp.eye(dk, dtype=k_TxnxK.dtype)
    outs = []
    for t in range(k_TxnxK.shape[0]):
        factors = [eye - beta_Txn[t, j] * jnp.outer(k_TxnxK[t, j], k_TxnxK[t, j]) for j in range(n)]
        product = eye
        for factor in factors:
            product = product @ factor
        written = 0.0
        for j in range(n):
            tail = eye
            for factor in factors[j + 1:]:
                tail = tail @ factor
            written = written + beta_Txn[t, j] * jnp.outer(v_TxnxV[t, j], k_TxnxK[t, j]) @ tail
        state_VxK = state_VxK @ (jnp.exp(log_decay_T[t]) * product) + written
        outs.append(state_VxK @ q_TxK[t])
    return jnp.stack(outs), state_VxK


per_head = lambda fn: jax.vmap(jax.vmap(fn))  # over [B, H]


def random_problem(rng, b=2, h=3, t=13, dk=4, dv=5, decay=True):
    """float64 streams [B, H, T, ...] as the layer makes them (unit keys, beta in (0, 1)) and a state [B, H, K, V]."""
    k = rng.normal(size=(b, h, t, dk))
    s = {"q": rng.normal(size=(b, h, t, dk)), "k": k / np.linalg.norm(k, axis=-1, keepdims=True),
         "v": rng.normal(size=(b, h, t, dv)), "beta": rng.uniform(0, 1, size=(b, h, t)),
         "log_decay": -rng.uniform(0, 2, size=(b, h, t)) if decay else np.zeros((b, h, t))}
    return {name: jnp.asarray(x) for name, x in s.items()}, jnp.asarray(rng.normal(size=(b, h, dk, dv)))


def kernel(s, state, chunk, remat_chunks=2):
    return delta_rule.delta_rule(s["q"], s["k"], s["v"], s["beta"], s["log_decay"], state, chunk=chunk,
                                 remat_chunks=remat_chunks)


def reference(s, state_KxV):
    o, state_VxK = per_head(issue_loop)(s["q"], s["k"], s["v"], s["beta"], s["log_decay"],
                                        jnp.swapaxes(state_KxV, -1, -2))
    return o, jnp.swapaxes(state_VxK, -1, -2)


# --- the kernel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [True, False], ids=["gated", "deltanet"])
@pytest.mark.parametrize("chunk, remat_chunks", [(1, 1), (3, 2), (4, 3), (16, 4)])
def test_chunked_kernel_equals_the_token_loop(x64, chunk, remat_chunks, decay):
    """T = 13 is a multiple of no chunk but 1 (and of no remat group): the padded steps must be identity
    steps. The initial state is a carried one, not zeros."""
    s, state = random_problem(np.random.default_rng(chunk), decay=decay)
    o, end = jax.jit(kernel, static_argnums=(2, 3))(s, state, chunk, remat_chunks)
    o_ref, end_ref = reference(s, state)
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(end, end_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("c", [1, 2, 5, 8, 13])
def test_the_unit_triangular_inverse_is_exact(x64, c):
    a = jnp.tril(jnp.asarray(np.random.default_rng(c).normal(size=(3, c, c))), -1)
    np.testing.assert_allclose(delta_rule.unit_lower_inverse(a) @ (jnp.eye(c) + a), np.broadcast_to(np.eye(c), a.shape),
                               rtol=0, atol=1e-9)


def test_strong_decay_stays_finite_and_exact(x64):
    """log decays of -50 per step (ratios exp(+-650) across a chunk if formed carelessly)."""
    s, state = random_problem(np.random.default_rng(7), t=16)
    s["log_decay"] = s["log_decay"] * 25.0
    o, end = kernel(s, state, chunk=16)
    o_ref, end_ref = reference(s, state)
    assert np.isfinite(o).all()
    np.testing.assert_allclose(o, o_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(end, end_ref, rtol=0, atol=1e-12)


def test_gradients_through_the_chunks_equal_the_loops(x64):
    s, state = random_problem(np.random.default_rng(3), t=11)
    rng = np.random.default_rng(4)
    o_weights, end_weights = rng.normal(size=(2, 3, 11, 5)), rng.normal(size=(2, 3, 4, 5))

    def loss(fn, s, state):
        o, end = fn(s, state)
        return jnp.sum(o * o_weights) + jnp.sum(end * end_weights)

    chunked = jax.grad(lambda s, state: loss(lambda a, b: kernel(a, b, chunk=4), s, state), argnums=(0, 1))(s, state)
    looped = jax.grad(lambda s, state: loss(reference, s, state), argnums=(0, 1))(s, state)
    for name in s:
        np.testing.assert_allclose(chunked[0][name], looped[0][name], rtol=0, atol=1e-10, err_msg=name)
    np.testing.assert_allclose(chunked[1], looped[1], rtol=0, atol=1e-10)
    assert all(np.abs(np.asarray(g)).max() > 1e-3 for g in jax.tree_util.tree_leaves(chunked))


# --- the mixer: DeltaProduct's interleaving -------------------------------------------------------------


def mixer_settings(**overrides):
    p = ml_collections.ConfigDict(dict(registry.load()["gated_deltanet"].defaults))
    p.update(heads=2, chunk=3, **overrides)
    return p


def float64_mixer(p, d_model=16, seed=0):
    model_cfg = tiny_config(**{"model.d_model": d_model}).model
    model_cfg.dtype = "float64"  # a test-only compute dtype
    mixer = deltanet.DeltaRuleMixer(p, model_cfg, rngs=nnx.Rngs(params=seed))
    graphdef, params = nnx.split(mixer)
    rng = np.random.default_rng(seed)

    def loud(path, x):  # unit-gain kernels: the layer's terms are O(1), far above the tolerances
        if getattr(path[-2], "key", None) == "kernel" or getattr(path[-1], "key", None) == "kernel":
            return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[0]), jnp.float64)
        return x.astype(jnp.float64)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(loud, params))


@pytest.mark.parametrize("householder, beta_max, gate", [(3, 2.0, True), (2, 1.0, False), (1, 1.0, True)])
def test_deltaproduct_equals_the_product_of_householder_factors(x64, householder, beta_max, gate):
    p = mixer_settings(householder=householder, beta_max=beta_max, gate=gate)
    mixer = float64_mixer(p)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 16)))
    s, _ = mixer.streams(x, mixer.init_state(2, jnp.float64)["conv"])
    state_BxHxKxV = jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, mixer.key_dim, mixer.value_dim)))
    o, end = mixer.recur(s, state_BxHxKxV)
    heads_first = lambda x, axis: jnp.moveaxis(x, axis, 1)  # the head axis of each stream to position 1
    o_ref, end_ref = per_head(householder_loop)(
        heads_first(s["q"], 2), heads_first(s["k"], 3), heads_first(s["v"], 3), heads_first(s["beta"], 3),
        heads_first(s["log_decay"], 2), jnp.swapaxes(state_BxHxKxV, -1, -2))
    np.testing.assert_allclose(o, jnp.moveaxis(o_ref, 1, 2), rtol=0, atol=1e-11)
    np.testing.assert_allclose(end, jnp.swapaxes(end_ref, -1, -2), rtol=0, atol=1e-11)
    assert (np.asarray(s["beta"]).max() > 1.0) == (beta_max == 2.0)  # negative eigenvalues reached


# --- the blocks -----------------------------------------------------------------------------------------


def build(name, *, seed=0, **settings):
    """A 2-layer float64 model of block `name` with unit-gain mixer kernels (inside the x64 fixture)."""
    cfg = tiny_config(**{"model.block_pattern": name, **{f"model.{name}.{k}": v for k, v in settings.items()}})
    config.validate(cfg)
    cfg.model.dtype = "float64"
    with jax.enable_x64(False):  # float32 parameters as always
        graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    for block in params["blocks"].values():
        for layer in ("q", "k", "v", "beta", "alpha", "out_gate"):
            if layer in block["mixer"]:
                shape = block["mixer"][layer]["kernel"].shape
                block["mixer"][layer]["kernel"] = jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]))
    return cfg, graphdef, jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)


def logits(graphdef, params, ids):
    return jax.jit(lambda params: nnx.merge(graphdef, params)(ids)[0])(params)


def ids_of(length, seed=1):
    return jax.random.randint(jax.random.key(seed), (2, length), 0, VOCAB)


def test_gated_deltanet_with_alpha_one_is_deltanet(x64):
    """A_log = -inf makes alpha = exp(-0) = 1; the gated model's other parameters in the deltanet model."""
    _, gated_graph, gated = build("gated_deltanet")
    _, delta_graph, _ = build("deltanet")
    shared = jax.tree_util.tree_map(lambda x: x, gated)
    for block in shared["blocks"].values():
        for name in ("alpha", "a_log", "dt_bias"):
            del block["mixer"][name]
    ids = ids_of(19)
    ungated = jax.tree_util.tree_map(lambda x: x, gated)
    for block in ungated["blocks"].values():
        block["mixer"]["a_log"] = jnp.full_like(block["mixer"]["a_log"], -jnp.inf)
    reference = logits(delta_graph, shared, ids)
    np.testing.assert_allclose(logits(gated_graph, ungated, ids), reference, rtol=0, atol=1e-12)
    assert np.abs(np.asarray(logits(gated_graph, gated, ids) - reference)).max() > 1e-4  # the gate matters


def test_deltaproduct_with_one_householder_step_is_gated_deltanet(x64):
    _, gated_graph, gated = build("gated_deltanet")
    _, product_graph, _ = build("deltaproduct", householder=1, beta_max=1.0)
    ids = ids_of(19)
    np.testing.assert_allclose(logits(product_graph, gated, ids), logits(gated_graph, gated, ids), rtol=0, atol=1e-12)
    _, two_graph, two = build("deltaproduct")
    assert two["blocks"][0]["mixer"]["k"]["kernel"].shape[1] == 2  # two keys per token by default


@pytest.mark.parametrize("name", NAMES)
def test_any_chunk_split_or_decoding_gives_the_one_call_logits(x64, name):
    """The chunked form is exact: chunk 1, 4 and 64 (longer than the sequence), calls of 5 + 14 tokens
    with the carried state, and token-by-token decoding agree to float64 rounding."""
    ids = ids_of(19)
    cfg, graphdef, params = build(name, chunk=4)
    whole, decoded = split_and_decoded_logits(graphdef, params, ids, [(0, 5), (5, 19)])
    for chunk in (1, 64):
        _, other_graph, _ = build(name, chunk=chunk)
        np.testing.assert_allclose(logits(other_graph, params, ids), whole, rtol=0, atol=1e-10,
                                   err_msg=f"chunk {chunk}")
    np.testing.assert_allclose(decoded["split"], whole, rtol=0, atol=1e-10)
    np.testing.assert_allclose(decoded["tokens"], whole, rtol=0, atol=1e-10)


def test_the_swa_hybrid_decodes_as_one_call(x64):
    cfg, graphdef, params = build("gated_deltanet", hybrid="swa", window=6)
    assert "attention" in params["blocks"][0]
    whole, decoded = split_and_decoded_logits(graphdef, params, ids_of(19), [(0, 5), (5, 19)])
    np.testing.assert_allclose(decoded["split"], whole, rtol=0, atol=1e-10)
    np.testing.assert_allclose(decoded["tokens"], whole, rtol=0, atol=1e-10)


@pytest.mark.parametrize("field, value, message", [
    ("hybrid", "mag", "is not one of"),
    ("heads", 3, "do not divide model.d_model"),
    ("value_expansion", 0, ">= 1"),
    ("householder", 0, ">= 1"),
    ("beta_max", 2.5, "must lie in \\(0, 2\\]"),
    ("chunk", 0, ">= 1"),
    ("conv_kernel", -1, ">= 0"),
    ("window", 64, "train.seq_len"),
])
def test_bad_settings_name_their_field(field, value, message):
    cfg = tiny_config(**{"model.block_pattern": "deltaproduct", "model.deltaproduct.hybrid": "swa",
                         "model.deltaproduct.window": 16})
    cfg.model.deltaproduct[field] = value
    with pytest.raises(ValueError, match=f"model.deltaproduct.{field}.*{message}"):
        config.validate(cfg)


def test_a_head_dim_lifts_the_divisibility_requirement():
    cfg = tiny_config(**{"model.block_pattern": "gated_deltanet", "model.gated_deltanet.heads": 3,
                         "model.gated_deltanet.head_dim": 8, "model.gated_deltanet.value_expansion": 2})
    config.validate(cfg)
    _, params = factory.abstract(cfg.model, VOCAB)
    assert params["blocks"][0]["mixer"]["out"]["kernel"].shape == (3, 16, 32)


def test_flops_count_the_chunked_work_per_delta_step():
    cfg = tiny_config(**{"model.block_pattern": "gated_deltanet"})
    gated, product = registry.load()["gated_deltanet"], registry.load()["deltaproduct"]
    dk = 32 // 4
    # Chunk min(64, 32) = 32 tokens: 4 C K + 2 C (K + V) + 2 C^2 / 3 + 2 C V + 6 K V + 4 C per step, 3x (fwd +
    # bwd), 4 heads.
    per_step = 4 * 32 * dk + 2 * 32 * 2 * dk + 2 * 32 * 32 / 3 + 2 * 32 * dk + 6 * dk * dk + 4 * 32
    assert gated.flops_per_token(cfg.model, 32) == 3 * 4 * per_step
    # Two steps per token, chunks of 64 steps: more than twice the work.
    assert product.flops_per_token(cfg.model, 32) > 2 * gated.flops_per_token(cfg.model, 32)


@pytest.mark.parametrize("name", NAMES)
def test_a_tiny_model_trains(tmp_path, name):
    cfg = tiny_config(**{"model.block_pattern": name, f"model.{name}.chunk": 8, "train.steps": 40,
                         "train.eval_every": 20, "train.checkpoint_every": 0})
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0
    assert len(evals) == 2 and evals[-1] < evals[0]


# --- configs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_quickstart_validates_and_uses_its_block(name):
    cfg = load_config(config_file(f"{name}_quickstart"))
    config.validate(cfg)
    assert registry.block_names(cfg.model) == [name] * cfg.model.num_layers


# name -> (parameter range, d_model, layers)
PAPER = {"gated_deltanet_340m": ((320e6, 370e6), 1024, 21), "gated_deltanet_1p3b": ((1.2e9, 1.45e9), 2048, 21)}


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_builds_abstractly_at_its_size(name):
    (low, high), d_model, layers = PAPER[name]
    cfg = load_config(config_file(name))
    config.validate(cfg)
    m = cfg.model
    assert (m.d_model, m.num_layers) == (d_model, layers)
    p = m.gated_deltanet
    assert (p.head_dim, p.value_expansion, p.conv_kernel) == (256, 2, 4)
    assert p.heads * p.head_dim == 3 * d_model // 4  # the paper's 0.75 d_model of keys
    _, params = factory.abstract(m, cfg.data.bpe_vocab_size)
    n = factory.count_params(params)
    assert low < n < high, f"{name}: {n:,} parameters"
    flops = factory.flops_per_token(m, cfg.data.bpe_vocab_size, cfg.train.seq_len)
    assert np.isfinite(flops) and flops > 6 * (n - cfg.data.bpe_vocab_size * d_model)


def test_evaluation_logs_step_sizes_decays_and_state_norms():
    cfg = tiny_config(**{"model.block_pattern": "gated_deltanet,deltanet"})
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    ids = ids_of(32)
    metrics = factory.eval_metrics(cfg.model, graphdef, params, [{"inputs": ids}, {"inputs": ids}])
    assert set(metrics) == {f"memory/layer{i}/{name}" for i in (0, 1) for name in ("beta", "alpha", "state_norm")}
    assert 0.4 < metrics["memory/layer0/beta"] < 0.6  # sigmoid of near-zero logits at initialisation
    assert 0.5 < metrics["memory/layer0/alpha"] < 1.0 and metrics["memory/layer1/alpha"] == 1.0  # no decay
    assert metrics["memory/layer0/state_norm"] > 0
    assert not nnx.merge(graphdef, params).blocks[0].mixer.record
