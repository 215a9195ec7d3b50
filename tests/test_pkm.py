"""Product-key memory: selection, the embedding bag, the sharded table, the block and its configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from memjax import config, optim, trainer
from memjax.config import load_config
from memjax.kernels.pkm_lookup import reference as bag_reference
from memjax.memory import bag, pkm
from memjax.metrics import read_jsonl
from memjax.models import attention, factory
from tests.helpers import config_file, tiny_config

VOCAB = 64
PKM = {"model.pkm.heads": 2, "model.pkm.n_keys": 8, "model.pkm.k": 4, "model.pkm.k_dim": 8}


def pkm_config(**overrides):
    return tiny_config(**{"model.block_pattern": "attention,pkm", **PKM, **overrides})


def make_model(**overrides):
    cfg = pkm_config(**overrides)
    config.validate(cfg)
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    return nnx.merge(graphdef, params), cfg


def jitted(model):
    """model(ids, states) compiled once per shape (eager calls compile every small op separately)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, states: nnx.merge(graphdef, state)(ids, states))
    return lambda ids, states=None: forward(state, ids, states)


# --- selection ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 8, 20])
@pytest.mark.parametrize("ties", [False, True])
def test_product_key_topk_equals_brute_force_over_all_pairs(k, ties):
    rng = np.random.default_rng(k)
    h, n, half = 3, 8, 4
    q = rng.normal(size=(5, h, 2 * half))
    keys = rng.normal(size=(h, 2, n, half))
    if ties:  # coarse values make many equal sums: compare score multisets, not slot ids
        q, keys = np.round(q), np.round(keys)
    with jax.enable_x64(True):
        scores, slots = pkm.product_key_topk(jnp.asarray(q), jnp.asarray(keys), k)
        s1 = np.einsum("bhd,hnd->bhn", q[..., :half], keys[:, 0])
        s2 = np.einsum("bhd,hnd->bhn", q[..., half:], keys[:, 1])
        full = (s1[..., :, None] + s2[..., None, :]).reshape(5, h, n * n)  # slot i*n + j
        brute = -np.sort(-full, axis=-1)[..., :k]
        np.testing.assert_allclose(np.sort(np.asarray(scores), -1), np.sort(brute, -1), atol=1e-12)
        np.testing.assert_allclose(np.take_along_axis(full, np.asarray(slots), -1), scores, atol=1e-12)
        assert all(len(set(row)) == k for row in np.asarray(slots).reshape(-1, k))


@pytest.mark.parametrize("recompute_above", [0, 1000], ids=["recomputed", "through_the_search"])
def test_selected_scores_gradient_equals_autodiff_through_all_pair_scores(monkeypatch, recompute_above):
    """Whether the chosen scores are recomputed (chosen_scores, a custom VJP) or differentiated through
    the search, their gradients in q and keys equal autodiff through the dense n^2 score table."""
    monkeypatch.setattr(pkm, "RECOMPUTE_SCORES_ABOVE", recompute_above)
    rng = np.random.default_rng(0)
    h, n, half, k = 3, 8, 4, 6
    with jax.enable_x64(True):
        q = jnp.asarray(rng.normal(size=(2, 5, h, 2 * half)))
        keys = jnp.asarray(rng.normal(size=(h, 2, n, half)))
        cotangent = jnp.asarray(rng.normal(size=(2, 5, h, k)))
        _, slots = pkm.product_key_topk(q, keys, k)

        def chosen(q, keys):
            return jnp.sum(pkm.product_key_topk(q, keys, k)[0] * cotangent)

        def dense(q, keys):
            s1 = jnp.einsum("bthd,hnd->bthn", q[..., :half], keys[:, 0])
            s2 = jnp.einsum("bthd,hnd->bthn", q[..., half:], keys[:, 1])
            full = (s1[..., :, None] + s2[..., None, :]).reshape(*s1.shape[:-1], n * n)
            return jnp.sum(jnp.take_along_axis(full, slots, -1) * cotangent)

        for got, want in zip(jax.grad(chosen, argnums=(0, 1))(q, keys), jax.grad(dense, argnums=(0, 1))(q, keys)):
            assert float(jnp.max(jnp.abs(want))) > 0
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_k_equal_to_all_slots_with_one_head_is_dense_softmax_attention():
    n, d = 4, 16
    cfg = tiny_config(**{"model.d_model": d, "model.pkm.heads": 1, "model.pkm.n_keys": n, "model.pkm.k": n * n,
                         "model.pkm.k_dim": 6, "model.pkm.memory_plus": False, "model.pkm.query_norm": "none"})
    rngs = nnx.Rngs(params=0)
    memory = pkm.ProductKeyMemory(cfg.model, pkm.ValueTable(cfg.model, rngs=rngs), rngs=rngs)
    memory.query_bias[...] = jax.random.normal(jax.random.key(1), memory.query_bias.shape)
    x = jax.random.normal(jax.random.key(2), (2, 3, d))

    q = np.einsum("btd,dhk->bthk", x, memory.query.kernel[...])[:, :, 0] + memory.query_bias[...]
    k1, k2 = np.asarray(memory.keys[...][0, 0]), np.asarray(memory.keys[...][0, 1])
    keys_NxK = np.concatenate([np.repeat(k1, n, axis=0), np.tile(k2, (n, 1))], axis=1)  # row i*n+j: [K1_i; K2_j]
    scores = np.einsum("btk,nk->btn", q, keys_NxK)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("btn,nv->btv", probs, memory.values.table[...])
    np.testing.assert_allclose(memory(x), expected, rtol=1e-5, atol=1e-6)


# --- embedding bag -------------------------------------------------------------------------------


def bag_inputs(rng, n, v, m, k, high=None):
    table = jnp.asarray(rng.normal(size=(n, v)))
    idx = jnp.asarray(rng.integers(0, high or n, (m, k)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(m, k)))
    g = jnp.asarray(rng.normal(size=(m, v)))
    return table, idx, w, g


@pytest.mark.parametrize("chunk_bytes", [bag_reference.CHUNK_BYTES, 40])  # one chunk; many chunks with padding
@pytest.mark.parametrize("sort", [True, False])
def test_bag_forward_backward_equal_dense_reference_with_repeated_indices(monkeypatch, chunk_bytes, sort):
    monkeypatch.setattr(bag_reference, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(bag_reference, "SORTED_SCATTER", sort)
    with jax.enable_x64(True):
        table, idx, w, g = bag_inputs(np.random.default_rng(0), n=11, v=3, m=7, k=6, high=4)
        idx = idx.at[0].set(2)  # one token reading slot 2 six times
        y, vjp = jax.vjp(lambda t, w: bag.embedding_bag(t, idx, w), table, w)
        y_ref, vjp_ref = jax.vjp(lambda t, w: bag.embedding_bag_reference(t, idx, w), table, w)
        np.testing.assert_allclose(y, y_ref, atol=1e-12)
        (dtable, dw), (dtable_ref, dw_ref) = vjp(g), vjp_ref(g)
        np.testing.assert_allclose(dtable, dtable_ref, atol=1e-12)
        np.testing.assert_allclose(dw, dw_ref, atol=1e-12)
        # The spec's formulas: dV = index_add(idx, w (x) g), dw = <V[idx], g>.
        index_add = np.zeros(table.shape)
        np.add.at(index_add, np.asarray(idx).ravel(),
                  (np.asarray(w)[..., None] * np.asarray(g)[:, None]).reshape(-1, 3))
        np.testing.assert_allclose(dtable, index_add, atol=1e-12)
        np.testing.assert_allclose(dw, np.einsum("mkv,mv->mk", np.asarray(table)[np.asarray(idx)], g), atol=1e-12)
        assert np.all(np.asarray(dtable)[4:] == 0)  # rows never read get nothing


@pytest.mark.parametrize("sort", [True, False])
def test_bag_gradient_never_materialises_a_slot_sized_intermediate(monkeypatch, sort):
    monkeypatch.setattr(bag_reference, "SORTED_SCATTER", sort)
    n, v, m, k = 4096, 2, 8, 4  # a one-hot would be m*k*n = 131,072 elements; dV is n*v = 8,192
    table, idx, w, _ = bag_inputs(np.random.default_rng(1), n, v, m, k)
    jaxpr = jax.make_jaxpr(jax.grad(lambda t, w: bag.embedding_bag(t, idx, w).sum(), argnums=(0, 1)))(table, w)

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from sizes(sub)

    assert max(sizes(jaxpr.jaxpr)) <= n * v


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("mode", ["columns", "rows"])
def test_sharded_bag_equals_unsharded_outputs_and_gradients(devices, mode):
    mesh = Mesh(jax.devices()[:devices], ("tensor",))
    with jax.enable_x64(True):
        table, idx, w, g = bag_inputs(np.random.default_rng(devices), n=16, v=8, m=16, k=5)
        y, vjp = jax.vjp(lambda t, w: bag.embedding_bag(t, idx, w), table, w)
        fn = jax.jit(lambda t, w: bag.sharded_embedding_bag(t, idx, w, axis="tensor", mode=mode, mesh=mesh))
        y_sharded, vjp_sharded = jax.vjp(fn, table, w)
        np.testing.assert_allclose(y_sharded, y, atol=1e-12)
        for grad, grad_sharded in zip(vjp(g), vjp_sharded(g)):
            np.testing.assert_allclose(grad_sharded, grad, atol=1e-12)


@pytest.mark.parametrize("mode", ["columns", "rows"])
def test_sharded_block_on_a_data_by_tensor_mesh_equals_unsharded(mode):
    """The block picks the sharded bag from the context mesh; the table is replicated over `data`, so its
    gradient is also summed over data shards. Decoding's single token is padded to the mesh size."""
    model, _ = make_model(**{"model.block_pattern": "pkm", "model.pkm.value_shard_mode": mode})
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jax.random.randint(jax.random.key(4), (4, 8), 0, VOCAB)

    def loss(params, ids):
        logits, _ = nnx.merge(graphdef, params)(ids)
        return jnp.mean(logits**2)

    grad_fn = jax.jit(jax.value_and_grad(loss))
    value, grads = grad_fn(params, ids)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))
    with jax.set_mesh(mesh):
        value_sharded, grads_sharded = grad_fn(params, ids)
        one_token = jax.jit(lambda p: nnx.merge(graphdef, p)(ids[:1, :1])[0])(params)
    np.testing.assert_allclose(value_sharded, value, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_sharded), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(one_token, jitted(model)(ids[:1, :1])[0], rtol=1e-5, atol=1e-6)


# --- the block in the model ---------------------------------------------------------------------


def test_one_value_table_shared_by_all_memory_layers():
    model, cfg = make_model(**{"model.block_pattern": "pkm,attention,pkm", "model.num_layers": 3})
    graphdef, params = nnx.split(model, nnx.Param)
    flat = {optim.path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}
    tables = [path for path in flat if path.endswith("values/table")]
    assert tables == ["blocks/0/memory/values/table"] and flat[tables[0]].shape == (64, 32)
    assert model.blocks[0].memory.values is model.blocks[2].memory.values
    assert optim.group_labels(load_config(config_file("pkm_quickstart")).optim,
                              nnx.to_pure_dict(params))["blocks"][0]["memory"]["values"]["table"] == "pkm_values"

    # Gradient of the shared leaf = the sum of the gradients each layer gives its own copy.
    ids = jax.random.randint(jax.random.key(5), (2, 12), 0, VOCAB)
    untied = nnx.merge(graphdef, params)
    untied.blocks[2].memory.values = nnx.clone(untied.blocks[0].memory.values)
    untied_graphdef, untied_params = nnx.split(untied, nnx.Param)

    def grads(graphdef, params):
        return jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(ids)[0] ** 2)))(nnx.to_pure_dict(params))

    shared = grads(graphdef, params)["blocks"][0]["memory"]["values"]["table"]
    separate = grads(untied_graphdef, untied_params)["blocks"]
    per_layer = [separate[i]["memory"]["values"]["table"] for i in (0, 2)]
    assert all(float(jnp.abs(g).sum()) > 0 for g in per_layer)
    np.testing.assert_allclose(shared, per_layer[0] + per_layer[1], rtol=1e-5, atol=1e-9)

    # Fresh per model: another key gives another table, the same key the same one (no global state).
    def table(seed):
        return factory.build(cfg.model, VOCAB, jax.random.key(seed))[1]["blocks"][0]["memory"]["values"]["table"]

    assert not np.allclose(table(1), table(2))
    np.testing.assert_array_equal(table(1), table(1))
    assert factory.count_params(nnx.to_pure_dict(params)) == sum(int(np.prod(x.shape)) for x in flat.values())


def test_memory_plus_with_zero_output_projection_leaves_only_attention():
    model, cfg = make_model(**{"model.pkm.gate": True})
    block = model.blocks[1]
    block.memory.w2.kernel[...] = jnp.zeros_like(block.memory.w2.kernel[...])
    block.memory.b2[...] = jnp.zeros_like(block.memory.b2[...])
    reference = attention.FullAttention(cfg.model, 1, rngs=nnx.Rngs(params=1))
    reference.attn_norm, reference.qkv, reference.out = block.attn_norm, block.qkv, block.out
    reference.mlp.down.kernel[...] = jnp.zeros_like(reference.mlp.down.kernel[...])
    x = jax.random.normal(jax.random.key(6), (2, 10, cfg.model.d_model))
    out = nnx.jit(lambda block, x: block(x)[0])(block, x)
    np.testing.assert_array_equal(out, nnx.jit(lambda block, x: block(x)[0])(reference, x))
    assert not np.allclose(out, x)  # the attention path is there


def test_perturbing_a_future_token_never_changes_earlier_logits():
    model = jitted(make_model()[0])
    ids = jax.random.randint(jax.random.key(7), (2, 24), 0, VOCAB)
    logits, _ = model(ids)
    for t in (0, 9, 23):
        logits_p, _ = model(ids.at[:, t].set((ids[:, t] + 1) % VOCAB))
        np.testing.assert_array_equal(np.asarray(logits[:, :t]), np.asarray(logits_p[:, :t]))
        assert not np.allclose(logits[:, t:], logits_p[:, t:])


def test_decoding_with_carried_state_matches_full_forward():
    model, _ = make_model(**{"model.block_pattern": "pkm,attention"})
    forward = jitted(model)
    ids = jax.random.randint(jax.random.key(8), (2, 20), 0, VOCAB)
    logits, _ = forward(ids)
    states = model.init_states(2, 20)
    chunks = []
    for start, stop in [(0, 11), (11, 12), (12, 16), (16, 20)]:
        out, states = forward(ids[:, start:stop], states)
        chunks.append(out)
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), logits, atol=1e-5)


def test_bfloat16_compute_and_plain_pkm_without_memory_plus():
    for overrides in ({"model.dtype": "bfloat16"}, {"model.pkm.memory_plus": False, "model.pkm.query_norm": "none"}):
        logits, _ = jitted(make_model(**overrides)[0])(jnp.zeros((1, 8), jnp.int32))
        assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("k", 65, "model.pkm.k: must lie in [1, n_keys^2 = 64]"),
        ("k_dim", 7, "model.pkm.k_dim: must be positive and even"),
        ("heads", 0, "model.pkm.heads: must be positive"),
        ("query_norm", "batch", "model.pkm.query_norm: 'batch' is not one of"),
        ("value_shard_mode", "diagonal", "model.pkm.value_shard_mode"),
    ],
)
def test_validation_names_the_field(field, value, message):
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[").replace("^", r"\^")):
        config.validate(pkm_config(**{f"model.pkm.{field}": value}))


def test_plain_pkm_needs_model_width_values():
    with pytest.raises(config.ConfigError, match="model.pkm.v_dim"):
        config.validate(pkm_config(**{"model.pkm.memory_plus": False, "model.pkm.v_dim": 16}))


def test_flops_count_the_bag_not_the_value_table():
    cfg = pkm_config()
    d, ff, h, k, n, kd = 32, 128, 2, 4, 8, 8
    memory_matmuls = d * h * kd + h * n * kd + 2 * d * d  # queries, half-keys, W1, W2 (not the 64 x 32 table)
    matmuls = (4 * d * d + 3 * d * ff) + 4 * d * d + memory_matmuls + VOCAB * d  # attention, pkm, tied head
    pairs = 8  # (a+1)(b+1) <= k=4 of the 4 x 4 half top-k pairs
    extra = 2 * 12 * d * 32 + 6 * h * k * d + h * (2 * n + 2 * pairs + 5 * k)
    assert factory.flops_per_token(cfg.model, VOCAB, 32) == 6 * matmuls + extra


# --- diagnostics ---------------------------------------------------------------------------------


def test_usage_metrics_on_hand_made_counts():
    n = 8
    uniform = {"hits": np.ones((1, n)), "mass": np.ones((1, n))}
    assert pkm.usage_metrics(uniform) == pytest.approx(
        {"memory/slots_hit_fraction": 1.0, "memory/slot_usage_kl": 0.0,
         "memory/layer0/slots_hit_fraction": 1.0, "memory/layer0/slot_usage_kl": 0.0}
    )
    one_slot = {"hits": np.eye(1, n) * 5, "mass": np.eye(1, n) * 2.5}
    metrics = pkm.usage_metrics(one_slot, layer_indices=[3])
    assert metrics["memory/slots_hit_fraction"] == 1 / n
    assert metrics["memory/layer3/slot_usage_kl"] == pytest.approx(np.log(n))
    # Two layers on disjoint halves: each uses half the table, together all of it.
    halves = {"hits": np.kron(np.eye(2), np.ones(n // 2)), "mass": np.kron(np.eye(2), np.ones(n // 2))}
    metrics = pkm.usage_metrics(halves, layer_indices=[1, 3])
    assert metrics["memory/slots_hit_fraction"] == 1.0 and metrics["memory/slot_usage_kl"] == pytest.approx(0.0)
    assert metrics["memory/layer1/slots_hit_fraction"] == 0.5
    assert metrics["memory/layer3/slot_usage_kl"] == pytest.approx(np.log(2))


def test_slot_usage_counts_every_selection_of_an_eval_batch():
    model, cfg = make_model(**{"model.block_pattern": "pkm", "model.num_layers": 2})
    graphdef, params = nnx.split(model, nnx.Param)
    ids = jax.random.randint(jax.random.key(9), (2, 16), 0, VOCAB)
    usage = pkm.slot_usage(graphdef, params, ids)
    tokens, h, k = 2 * 16, cfg.model.pkm.heads, cfg.model.pkm.k
    np.testing.assert_allclose(usage["hits"].sum(-1), [tokens * h * k] * 2)
    np.testing.assert_allclose(usage["mass"].sum(-1), [tokens * h] * 2, rtol=1e-5)
    metrics = pkm.slot_usage_metrics(graphdef, params, [{"inputs": ids}, {"inputs": ids}])
    assert set(metrics) == {f"memory/{s}{m}" for s in ("", "layer0/", "layer1/")
                            for m in ("slots_hit_fraction", "slot_usage_kl")}
    assert 0 < metrics["memory/slots_hit_fraction"] <= 1 and metrics["memory/slot_usage_kl"] >= 0
    assert metrics == pytest.approx(pkm.usage_metrics(jax.tree_util.tree_map(lambda x: 2 * x, usage)))
    assert not model.blocks[0].memory.record_slots  # the caller's model is untouched
    plain = factory.build(tiny_config().model, VOCAB, jax.random.key(0))
    assert pkm.slot_usage_metrics(*plain, [{"inputs": ids}]) == {}


# --- configs and training ------------------------------------------------------------------------


def test_configs_validate_and_the_paper_config_builds_abstractly():
    config.validate(load_config(config_file("pkm_quickstart")))
    cfg = load_config(config_file("pkm_paper"))
    config.validate(cfg)
    _, params = factory.abstract(cfg.model, 32768)
    memory_layers = [i for i, block in params["blocks"].items() if "memory" in block]
    assert memory_layers == [3, 7, 11]
    table = params["blocks"][3]["memory"]["values"]["table"]
    assert table.shape == (1024**2, cfg.model.d_model) and table.dtype == jnp.float32
    assert params["blocks"][3]["memory"]["keys"].shape == (4, 2, 1024, 256)
    assert 1.2e9 < factory.count_params(params) < 1.3e9  # the 1.07B-parameter table counted once
    # The table is a lookup: it adds nothing like 6 x 1.07e9 FLOPs per token.
    assert factory.flops_per_token(cfg.model, 32768, cfg.train.seq_len) < 2e9


def test_a_pkm_config_trains_and_its_loss_falls(tmp_path):
    cfg = pkm_config(**{"train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 0})
    cfg.optim.groups.pkm_values = load_config(config_file("pkm_quickstart")).optim.groups.pkm_values
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    train_losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    eval_losses = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert eval_losses[-1] < eval_losses[0]
    usage = [r for r in records if "eval/loss" in r]
    assert all(0 < r["memory/slots_hit_fraction"] <= 1 and "memory/layer1/slot_usage_kl" in r for r in usage)
