"""HOPE (memjax.memory.hope): the self-modifying Titans and the continuum memory system against float64
loops written from the paper's equations (not from the implementation), the reduction to Titans LMM, and
validation. Causality, calls == one call == decoding, segment carry and sharding: tests/test_conformance.py."""

import copy
import importlib.util
from functools import partial

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from memjax import config, trainer
from memjax.config import load_config
from memjax.memory import hope
from memjax.metrics import read_jsonl
from memjax.models import factory, layers, registry
from tests.helpers import config_file, split_calls, tiny_config, token_by_token

VOCAB = 64


def _quickstart():
    """configs/hope_quickstart.py as a module (config files load by path): its HOPE settings."""
    spec = importlib.util.spec_from_file_location("hope_quickstart", config_file("hope_quickstart"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


QUICKSTART = _quickstart()


def hope_settings(**overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({**hope.HopeBlock.defaults, **overrides})


def float64_model_cfg(d_model=12):
    return tiny_config(**{"model.d_model": d_model, "model.dtype": "float64"}).model


# ------------------------------------------------------------------ the paper's equations, token by token


@partial(jax.jit, static_argnums=2)  # jitted: the loops call it thousands of times
def mlp(ws, x, residual):
    """M(x) = x W (one map) or W1 GELU(W2 x), plus x where residual ("add")."""
    h = x
    for i, w in enumerate(ws):
        h = h @ w
        if i < len(ws) - 1:
            h = jax.nn.gelu(h, approximate=False)
    return x + h if residual == "add" else h


def l2(x, eps):
    return x / jnp.sqrt(jnp.sum(x * x) + eps)


@partial(jax.jit, static_argnums=3)
def inner_grad(ws, k, target, residual):
    return jax.grad(lambda w: 0.5 * jnp.sum((mlp(w, k, residual) - target) ** 2))(ws)


def smt_reference(module: hope.SelfModifyingTitans, p, x_BxTxD, chunk: int):
    """Self-modifying Titans per batch row and head, token by token:
    k = l2(M_k(x)), v = l2(M_v(x)) (value_norm), q = l2(M_q(x)), eta = theta_max sig(w . M_eta(x) + b),
    keep = 1 - sig(w . M_alpha(x) + b); every adaptive M: M <- keep M - eta grad 1/2 ||M(k) - M(v)||^2; the main
    memory likewise with target M(v) (self_target) or v; y = M_memory before (read "before") or after the write.
    With chunk > 1 every read of a projection memory, every self-generated value and every gradient uses the
    state at the last multiple of `chunk` tokens (the chunk-start approximation); chunk 1: the recurrence."""
    eps, theta_max = module.eps, p.theta_max
    adaptive = hope.parse_adaptive(p.adaptive)
    b_count, t_count, _ = x_BxTxD.shape
    xh = jnp.einsum("btd,dhk->bthk", x_BxTxD, module.project_in.kernel[...])
    y = np.zeros((b_count, t_count, module.heads, module.head_dim))
    for b in range(b_count):
        for h in range(module.heads):
            proj = {name: [w[...][h] for w in module.projections[name]] for name in hope.PROJECTIONS}
            memory = [w[...][h] for w in module.initial_state]
            w_gate, b_gate = module.readout[...][:, h], module.gate_bias[...][:, h]
            for t in range(t_count):
                if t % chunk == 0:
                    proj0, memory0 = copy.copy(proj), list(memory)
                x = xh[b, t, h]
                read = {name: mlp(proj0[name], x, p.projection_residual) for name in hope.PROJECTIONS}
                k, v, q = l2(read["k"], eps), read["v"], l2(read["q"], eps)
                v = l2(v, eps) if p.value_norm else v
                eta = theta_max * jax.nn.sigmoid(read["eta"] @ w_gate[0] + b_gate[0])
                keep = 1.0 - jax.nn.sigmoid(read["alpha"] @ w_gate[1] + b_gate[1])
                for name in adaptive:
                    target = mlp(proj0[name], v, p.projection_residual)
                    grads = inner_grad(proj0[name], k, target, p.projection_residual)
                    proj[name] = [keep * w - eta * g for w, g in zip(proj[name], grads)]
                target = mlp(memory0, v, p.memory_residual) if p.self_target else v
                grads = inner_grad(memory0, k, target, p.memory_residual)
                before = memory
                memory = [keep * w - eta * g for w, g in zip(memory, grads)]
                y[b, t, h] = mlp(before if p.read == "before" else memory, q, p.memory_residual)
    y = layers.rms_normalize(jnp.asarray(y), eps) * module.out_norm[...]
    return module.out(y * jax.nn.silu(module.out_gate(x_BxTxD)))


SMT_CASES = {
    "paper": dict(),
    "linear_projections_read_after": dict(projection_depth=1, projection_residual="none", read="after"),
    "static_projections_titans_target": dict(adaptive="", self_target=False),
    "keys_and_values_only": dict(adaptive="k,v", memory_residual="none"),
    "unnormalised_values": dict(value_norm=False),
}


def smt_problem(case, chunk):
    p = hope_settings(heads=2, chunk=chunk, remat_chunks=2, memory_expansion=2, theta_max=0.8, theta_init=0.4,
                      alpha_init=0.1, **SMT_CASES[case])
    module = hope.SelfModifyingTitans(p, float64_model_cfg(), rngs=nnx.Rngs(params=0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 12)))
    return p, module, x


@pytest.mark.parametrize("case", sorted(SMT_CASES))
def test_self_modifying_titans_at_chunk_one_is_the_papers_recurrence_in_float64(case):
    with jax.enable_x64(True):
        p, module, x = smt_problem(case, chunk=1)
        out, _ = module(x)
        np.testing.assert_allclose(out, smt_reference(module, p, x, chunk=1), rtol=0, atol=1e-10)


def test_self_modifying_titans_at_chunk_three_is_the_chunk_start_loop_and_not_the_exact_one():
    with jax.enable_x64(True):
        p, module, x = smt_problem("paper", chunk=3)
        out, _ = module(x)
        np.testing.assert_allclose(out, smt_reference(module, p, x, chunk=3), rtol=0, atol=1e-10)
        assert np.abs(np.asarray(out - smt_reference(module, p, x, chunk=1))).max() > 1e-4


def test_self_modification_changes_the_output():
    """The adaptive projections and self-generated values matter (the loops above would pass for a
    recurrence that ignored them only if they had no effect)."""
    with jax.enable_x64(True):
        p, module, x = smt_problem("paper", chunk=1)
        static = hope.SelfModifyingTitans(hope_settings(**{**p.to_dict(), "adaptive": "", "self_target": False}),
                                          float64_model_cfg(), rngs=nnx.Rngs(params=0))
        assert np.abs(np.asarray(module(x)[0] - static(x)[0])).max() > 1e-4


# ------------------------------------------------------------------------------ continuum memory system


def swiglu(ws, k):
    gate, up, down = ws
    return (jax.nn.silu(k @ gate) * (k @ up)) @ down


@jax.jit
def swiglu_grad(ws, k, v):
    return jax.grad(lambda w: 0.5 * jnp.sum((swiglu(w, k) - v) ** 2))(ws)


def cms_reference(level: hope.CMSLevel, x_BxTxD, chunk: int, theta_max: float):
    """y_t = x_t + f_W(k_t), f_W(k) = down(SiLU(k gate) * k up), with W fixed in each block of `chunk` tokens;
    at the block's end W <- W - sum_i lr_i grad 1/2 ||f_W(k_i) - v_i||^2 (at the block-start W);
    k = norm(x), v = k W_v, lr = theta_max sig(k w + b) / d_model."""
    out = np.zeros(x_BxTxD.shape)
    for b in range(x_BxTxD.shape[0]):
        weights = level.weights(jnp.float64)
        accumulated = [jnp.zeros_like(w) for w in weights]
        for t in range(x_BxTxD.shape[1]):
            k = level.norm(x_BxTxD[b, t])
            v = k @ level.value.kernel[...]
            lr = theta_max / k.shape[-1] * jax.nn.sigmoid(k @ level.lr_gate.kernel[...][:, 0] + level.lr_bias[...][0])
            out[b, t] = x_BxTxD[b, t] + swiglu(weights, k)
            grads = swiglu_grad(weights, k, v)
            accumulated = [a - lr * g for a, g in zip(accumulated, grads)]
            if (t + 1) % chunk == 0:
                weights = [w + a for w, a in zip(weights, accumulated)]
                accumulated = [jnp.zeros_like(a) for a in accumulated]
    return out


CMS_THETA = 6.0  # x sigmoid / d_model (12): steps of about 0.1 per token


def cms_problem(chunk):
    # Weights of std 0.3 (not init_std): the updates then move the outputs visibly.
    model_cfg = tiny_config(**{"model.d_model": 12, "model.dtype": "float64", "model.init_std": 0.3}).model
    level = hope.CMSLevel(model_cfg, chunk, width=16, theta_max=CMS_THETA, theta_init=0.1,
                          rngs=nnx.Rngs(params=1))
    return level, jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 12)))


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_cms_level_updates_every_chunk_tokens_from_its_accumulated_gradients(chunk):
    with jax.enable_x64(True):
        level, x = cms_problem(chunk)
        out, _ = level(x)
        np.testing.assert_allclose(out, cms_reference(level, x, chunk, CMS_THETA), rtol=0, atol=1e-10)
        # The updates matter: a level that never updates (chunk beyond the sequence) differs after the first block.
        never = cms_reference(level, x, 100, CMS_THETA)
        np.testing.assert_allclose(out[:, :chunk], never[:, :chunk], rtol=0, atol=1e-10)
        assert np.abs(np.asarray(out[:, chunk:] - never[:, chunk:])).max() > 1e-4


def test_cms_level_carries_its_accumulated_gradient_across_calls():
    """Calls split inside a block (the accumulator and the position cross the call) give the one call."""
    with jax.enable_x64(True):
        level, x = cms_problem(4)
        whole, _ = level(x)
        state, pieces = level.init_state(2, jnp.float64), []
        for a, b in ((0, 2), (2, 7), (7, 8), (8, 11)):
            y, state = level(x[:, a:b], state)
            pieces.append(y)
        np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), whole, rtol=0, atol=1e-12)
        assert int(state["count"]) == 11 % 4


def test_static_level_is_the_swiglu_ffn():
    with jax.enable_x64(True):
        level = hope.CMSLevel(float64_model_cfg(), 0, width=16, theta_max=1.0, theta_init=0.5, rngs=nnx.Rngs(params=1))
        x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, 12)))
        np.testing.assert_allclose(level(x)[0], x + level.mlp(level.norm(x)), rtol=0, atol=0)
        assert level.init_state(2) is None


# ----------------------------------------------------------------------------------------- the block


def hope_config(**overrides):
    section = {"model.hope.chunk": 4, "model.hope.heads": 2, "model.hope.cms_chunks": "4,0"}
    cfg = tiny_config(**{"model.block_pattern": "hope", **section, **overrides})
    config.validate(cfg)
    return cfg


def test_hope_with_one_static_level_and_no_self_modification_is_titans_lmm():
    """The same weights in titans_lmm (its FFN = the static level) give the same logits."""
    shared = {"chunk": 4, "heads": 2, "theta_max": 0.01, "theta_init": 0.005, "read": "after",
              "memory_residual": "none"}
    cfg = hope_config(**{f"model.hope.{k}": v for k, v in shared.items()},
                      **{"model.hope.self_modifying": False, "model.hope.cms_chunks": "0"})
    titans_cfg = tiny_config(**{"model.block_pattern": "titans_lmm", "model.titans_lmm.chunk": 4,
                                "model.titans_lmm.heads": 2})
    config.validate(titans_cfg)
    titans_graph, titans_params = factory.build(titans_cfg.model, VOCAB, jax.random.key(0))
    hope_graph, hope_params = factory.build(cfg.model, VOCAB, jax.random.key(1))
    for i, block_t in titans_params["blocks"].items():
        block_h = hope_params["blocks"][i]
        block_h["memory"], block_h["memory_norm"] = block_t["memory"], block_t["memory_norm"]
        block_h["levels"][0] = {"mlp": block_t["mlp"], "norm": block_t["mlp_norm"]}
    hope_params["embed"], hope_params["final_norm"] = titans_params["embed"], titans_params["final_norm"]
    assert jax.tree_util.tree_structure(hope_params["blocks"][0]["memory"]) == \
        jax.tree_util.tree_structure(titans_params["blocks"][0]["memory"])
    ids = jax.random.randint(jax.random.key(2), (2, 19), 0, VOCAB)
    expected = nnx.merge(titans_graph, titans_params)(ids)[0]
    np.testing.assert_allclose(nnx.merge(hope_graph, hope_params)(ids)[0], expected, rtol=0, atol=1e-6)
    # ... and with self-modification on (same everything else), the logits differ.
    on_cfg = hope_config(**{f"model.hope.{k}": v for k, v in shared.items()}, **{"model.hope.cms_chunks": "0"})
    on_graph, on_params = factory.build(on_cfg.model, VOCAB, jax.random.key(1))
    assert not np.allclose(nnx.merge(on_graph, on_params)(ids)[0], expected, atol=1e-3)


def test_split_calls_and_decoding_equal_one_call_off_every_grid():
    """Chunk 4 and CMS levels of 3 and 5 tokens: splits at 5 and 11 fall inside chunks and blocks."""
    cfg = hope_config(**{"model.hope.cms_chunks": "3,5", "model.num_layers": 1})
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(3), (2, 17), 0, VOCAB)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        return model(ids)[0], split_calls(model, ids, [(0, 5), (5, 11), (11, 17)]), token_by_token(model, ids)

    whole, split, tokens = run(params)
    np.testing.assert_allclose(split, whole, rtol=0, atol=3e-5)
    np.testing.assert_allclose(tokens, whole, rtol=0, atol=3e-5)


def test_gradients_reach_every_parameter_and_are_finite():
    cfg = hope_config(**{"model.num_layers": 1})
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(4), (2, 16), 0, VOCAB)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(ids)[0] ** 2)))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def test_model_flops_count_the_inner_loops_not_the_initial_states_as_matmuls():
    cfg = hope_config()
    _, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    leaves = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(params)]
    matmul = sum(x.size for path, x in leaves if x.ndim >= 2 and "initial_state" not in path
                 and "projections" not in path)
    per_block = hope.HopeBlock.flops_per_token(cfg.model, 32)
    assert per_block > 0
    assert factory.flops_per_token(cfg.model, VOCAB, 32) == 6 * matmul + cfg.model.num_layers * per_block
    static = hope_config(**{"model.hope.cms_chunks": "0"})
    assert hope.HopeBlock.flops_per_token(static.model, 32) < per_block


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("heads", 3, "model.hope.heads: 3 heads do not divide"),
        ("adaptive", "k,w", r"model.hope.adaptive: \['w'\] are not among"),
        ("cms_chunks", "16,x", "model.hope.cms_chunks: must be comma-separated"),
        ("cms_chunks", "-4", "model.hope.cms_chunks: must be comma-separated"),
        ("read", "during", "model.hope.read: 'during' is not one of"),
        ("memory_residual", "skip", "model.hope.memory_residual"),
        ("theta_init", 0.5, r"model.hope.theta_init: must lie in \(0, theta_max=0.1\)"),
        ("chunk", 0, "model.hope.chunk: must be >= 1"),
    ],
)
def test_validation_names_the_field(field, value, message):
    with pytest.raises(config.ConfigError, match=message):
        hope_config(**{f"model.hope.{field}": value})


def test_document_segments_must_be_whole_chunks_of_every_level():
    with pytest.raises(config.ConfigError, match="model.hope.cms_chunks: must divide train.seq_len=32"):
        hope_config(**{"model.hope.cms_chunks": "4,12,0", "train.segments_per_step": 2})
    hope_config(**{"model.hope.cms_chunks": "4,16,0", "train.segments_per_step": 2})


# ------------------------------------------------------------------------------------------- configs

PAPER = {"hope_760m": ((720e6, 800e6), 1536), "hope_1p3b": ((1.25e9, 1.40e9), 2048)}
PAPER_VOCAB = 32768


def test_quickstart_validates_and_is_cpu_sized():
    cfg = load_config(config_file("hope_quickstart"))
    config.validate(cfg)
    m, t = cfg.model, cfg.train
    assert registry.block_names(m) == ["hope"] * m.num_layers
    assert m.dtype == "float32" and cfg.data.tokenizer == "byte" and t.seq_len == 256 and m.d_model <= 192
    assert hope.parse_levels(m.hope.cms_chunks) == [16, 64, 0]


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_builds_abstractly_at_its_size(name):
    (low, high), d_model = PAPER[name]
    cfg = load_config(config_file(name))
    config.validate(cfg)
    m = cfg.model
    assert m.d_model == d_model and m.hope.heads * 128 == d_model
    assert m.dtype == "bfloat16" and cfg.train.seq_len == 4096 and cfg.data.bpe_vocab_size == PAPER_VOCAB
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.weight_decay) == (4e-4, "cosine", 0.1)
    n = factory.count_params(factory.abstract(m, PAPER_VOCAB)[1])
    assert low < n < high, f"{name}: {n:,} parameters"
    tokens = cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    assert tokens == pytest.approx({"hope_760m": 30e9, "hope_1p3b": 100e9}[name], rel=0.01)


def test_tiny_hope_trains_with_falling_loss(tmp_path):
    """The quickstart's HOPE settings at tiny size: 40 steps, loss falls, evaluations finite."""
    settings = {f"model.hope.{k}": v for k, v in {**QUICKSTART.HOPE, "heads": 2, "chunk": 4,
                                                     "cms_chunks": "4,16,0"}.items()}
    cfg = tiny_config(**{"model.block_pattern": "hope", **settings, "train.steps": 40, "train.eval_every": 20,
                         "train.checkpoint_every": 0})
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    evals = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert all(np.isfinite(losses)) and len(evals) == 2 and all(np.isfinite(evals))
    assert losses[-1] < losses[0] - 1.0 and evals[-1] < evals[0]
