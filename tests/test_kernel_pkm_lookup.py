"""Product-key value lookup kernels (memjax/kernels/pkm_lookup): the TPU and GPU Pallas kernels, run in
interpret mode on CPU, against the pure-JAX reference, outputs and gradients; inside shard_map; in the
PKM model; the kernel switch; and the TPU kernels' ahead-of-time compile for a v5e topology."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memjax import aot, config
from memjax.kernels import dispatch
from memjax.kernels.pkm_lookup import api, pallas_gpu, pallas_tpu, reference
from memjax.memory import bag
from memjax.models import factory
from tests.helpers import tiny_config

TARGETS = ["tpu", "gpu"]
V = 128  # the TPU kernel copies whole 128-lane rows
BF16_RTOL = 2e-2  # a few bfloat16 roundings (8-bit mantissa, 2^-8 each) of sums of <= 8 terms


@pytest.fixture
def target(request, monkeypatch):
    monkeypatch.setattr(api, "INTERPRET_AS", request.param)
    return request.param


def inputs(rng, n, v, m, k, high=None, dtype=jnp.float32):
    table = jnp.asarray(rng.normal(size=(n, v)), dtype)
    idx = jnp.asarray(rng.integers(0, high or n, (m, k)), jnp.int32)
    idx = idx.at[0].set(min(2, n - 1))  # one token reading one row k times
    w = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(m, v)), dtype)
    return table, idx, w, g


@functools.partial(jax.jit, static_argnums=0)
def _kernel_and_reference(target, table, idx, w, g):
    def run(fn):
        y, vjp = jax.vjp(lambda t, w: fn(t, idx, w), table, w)
        return (y, *vjp(g))

    return run(lambda t, i, w: api.embedding_bag(t, i, w, kernel="pallas")), run(reference.embedding_bag_dense)


def kernel_and_reference(table, idx, w, g):
    """(y, dtable, dw) of the kernel (api.INTERPRET_AS's, compiled once per target) and of the dense
    definition."""
    return _kernel_and_reference((api.INTERPRET_AS, api.TPU_INTERPRET), table, idx, w, g)


def assert_close(actual, expected, rtol):
    for a, e in zip(actual, expected):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(np.abs(e).max(), 1.0)
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


# m: ragged token counts (not multiples of the 8- or 16-token blocks); high: rows drawn from [0, high),
# small for long runs of one row that cross the backward's chunks of sorted slots (128 TPU, 64 GPU).
@pytest.mark.parametrize("target", TARGETS, indirect=True)
@pytest.mark.parametrize("m, k, high", [(1, 1, None), (13, 5, 6), (37, 8, 3), (37, 8, None)])
def test_kernel_equals_reference_values_and_gradients(target, m, k, high):
    table, idx, w, g = inputs(np.random.default_rng(m * k), 64, V, m, k, high)
    (y, dtable, dw), expected = kernel_and_reference(table, idx, w, g)
    assert y.shape == (m, V) and dtable.shape == (64, V) and dw.shape == (m, k)
    assert_close((y, dtable, dw), expected, rtol=2e-6)
    # Rows no slot names get exactly zero (the kernels never write them).
    unread = np.setdiff1d(np.arange(64), np.asarray(idx))
    assert np.all(np.asarray(dtable)[unread] == 0)


@pytest.mark.parametrize("target", TARGETS, indirect=True)
def test_bfloat16_table_within_tolerance(target):
    table, idx, w, g = inputs(np.random.default_rng(1), 64, V, 13, 5, 9, dtype=jnp.bfloat16)
    (y, dtable, dw), expected = kernel_and_reference(table, idx, w, g)
    assert y.dtype == dtable.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    # Against float32 on the same (bfloat16) values: the kernels accumulate in float32.
    f32 = kernel_and_reference(table.astype(jnp.float32), idx, w, g.astype(jnp.float32))[1]
    assert_close((y, dtable, dw), f32, rtol=BF16_RTOL)
    assert_close((y, dtable, dw), expected, rtol=BF16_RTOL)


def test_tpu_kernel_in_tpu_interpret_mode(monkeypatch):
    """TPU interpret mode simulates HBM, VMEM, SMEM and the DMAs, and fills fresh buffers with NaN: a
    read of memory the kernel never wrote (a missing DMA wait, a wrong slice) would show."""
    monkeypatch.setattr(api, "INTERPRET_AS", "tpu")
    monkeypatch.setattr(api, "TPU_INTERPRET", pltpu.InterpretParams(uninitialized_memory="nan"))
    table, idx, w, g = inputs(np.random.default_rng(2), 64, V, 21, 7, 5)
    (y, dtable, dw), expected = kernel_and_reference(table, idx, w, g)
    assert_close((y, dtable, dw), expected, rtol=2e-6)


# Meshes of the 8 CPU devices: the table sharded 8 ways, or 4 ways over `tensor` and replicated over
# `data` (its gradient then summed over data shards too).
@pytest.mark.parametrize("target, mode, mesh_shape", [("tpu", "columns", (1, 8)), ("tpu", "rows", (2, 4)),
                                                      ("gpu", "columns", (2, 4)), ("gpu", "rows", (1, 8))],
                         indirect=["target"])
def test_sharded_kernel_equals_unsharded_reference(target, mode, mesh_shape):
    """The kernel per device inside shard_map, the table sharded by columns (128 per device) or by rows
    (16 or 8 per device); 16 tokens of 3 slots, sharded over the whole mesh and gathered per group."""
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(mesh_shape), ("data", "tensor"))
    v = mesh_shape[1] * V if mode == "columns" else V
    table, idx, w, g = inputs(np.random.default_rng(3), 64, v, 16, 3)

    @jax.jit
    def both(table, w):
        fn = lambda t, w: bag.sharded_embedding_bag(t, idx, w, axis="tensor", mode=mode, mesh=mesh, kernel="pallas")
        y, vjp = jax.vjp(fn, table, w)
        y_ref, vjp_ref = jax.vjp(lambda t, w: reference.embedding_bag_dense(t, idx, w), table, w)
        return (y, *vjp(g)), (y_ref, *vjp_ref(g))

    assert "pallas_call" in str(jax.make_jaxpr(both)(table, w))
    actual, expected = both(table, w)
    assert_close(actual, expected, rtol=2e-6)


def test_pkm_model_with_the_kernel_equals_the_reference(monkeypatch):
    """A one-block pkm LM (attention, then Memory+ over 64 slots of width 128, 2 heads x k=3), built
    with model.pkm.kernel=pallas: the same loss and gradients of every parameter as with the reference."""
    monkeypatch.setattr(api, "INTERPRET_AS", "tpu")
    cfg = tiny_config(**{"model.block_pattern": "pkm", "model.num_layers": 1, "model.pkm.heads": 2,
                         "model.pkm.n_keys": 8, "model.pkm.k": 3, "model.pkm.k_dim": 8, "model.pkm.v_dim": V,
                         "model.pkm.kernel": "pallas"})
    config.validate(cfg)
    graphdef, shapes = factory.abstract(cfg.model, 64)
    # Random parameters from numpy: the model's own initialisation compiles for seconds and is not tested here.
    rng = np.random.default_rng(5)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.5 * rng.normal(size=s.shape), s.dtype), shapes)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)

    @functools.partial(jax.jit, static_argnums=1)
    def loss_and_grads(params, kernel):
        def loss(params):
            model = nnx.merge(graphdef, params)
            if kernel:  # the built model's setting (pallas) replaced, for the reference run
                model.blocks[0].memory.kernel = kernel
            logits, _ = model(ids)
            return jnp.mean(logits**2)

        return jax.value_and_grad(loss)(params)

    assert "pallas_call" in str(loss_and_grads.trace(params, None).jaxpr)
    loss_kernel, grads_kernel = loss_and_grads(params, None)
    loss_ref, grads_ref = loss_and_grads(params, "reference")
    np.testing.assert_allclose(loss_kernel, loss_ref, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads_kernel), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_kernel_choice_auto_reference_pallas(monkeypatch, caplog):
    table, idx, w, _ = inputs(np.random.default_rng(4), 16, 8, 3, 2)
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="memjax"):
        y_auto = bag.embedding_bag(table, idx, w)  # CPU: the reference, with one warning per process
        bag.embedding_bag(table, idx, w, kernel="auto")
    assert [r.message for r in caplog.records].count(
        "pkm_lookup: kernel='auto' falls back to the pure-JAX reference: no Pallas kernel runs natively on CPU "
        "(interpret mode is for tests)") == 1
    np.testing.assert_array_equal(y_auto, bag.embedding_bag(table, idx, w, kernel="reference"))
    with pytest.raises(ValueError, match="value width 8 is not a multiple of 128"):
        bag.embedding_bag(table, idx, w, kernel="pallas")
    monkeypatch.setattr(api, "INTERPRET_AS", "gpu")
    with pytest.raises(ValueError, match="value width 8 is not a multiple of 16"):
        bag.embedding_bag(table, idx, w, kernel="pallas")
    with pytest.raises(ValueError, match="kernel must be one of"):
        bag.embedding_bag(table, idx, w, kernel="triton")
    with jax.enable_x64(True), pytest.raises(ValueError, match="float64"):
        bag.embedding_bag(table.astype(jnp.float64), idx, w, kernel="pallas")
    cfg = tiny_config(**{"model.block_pattern": "pkm", "model.pkm.kernel": "fast"})
    with pytest.raises(ValueError, match="model.pkm.kernel"):
        config.validate(cfg)


def test_column_blocks():
    assert pallas_tpu.column_block(1024, 64, 4) == 1024  # 256 KB of rows: one block
    assert pallas_tpu.column_block(8192, 1024, 4) == 1024  # 1024 rows: 4 MB at 1024 columns
    assert pallas_tpu.column_block(384, 8192, 4) == 128
    assert pallas_gpu.column_block(1024) == 128 and pallas_gpu.column_block(48) == 16


@pytest.mark.skipif(not aot.libtpu_available(),
                    reason='libtpu is not installed (pip install -e ".[tpu]" to compile for TPU topologies)')
def test_tpu_kernels_compile_for_a_v5e_topology(monkeypatch):
    """Forward and backward (three Mosaic kernels) compile for v5e:2x2 from this CPU host, inside
    shard_map (Mosaic compiles for a topology only there), a float32 table of 4096 x 256 and 37 ragged
    tokens of 5 slots per device."""
    monkeypatch.setattr(dispatch, "interpret", lambda: False)  # compile, not interpret
    monkeypatch.setattr(api, "INTERPRET_AS", "tpu")
    devices = aot.topology_devices("v5e:2x2")
    mesh = jax.make_mesh((4,), ("data",), devices=devices, axis_types=(AxisType.Auto,))

    def grads(table, idx, w):
        loss = lambda t, w: jnp.sum(api.embedding_bag(t, idx, w, kernel="pallas") ** 2)
        return jax.grad(loss, argnums=(0, 1))(table, w)

    step = jax.shard_map(grads, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data")),
                         check_vma=False)
    tokens = NamedSharding(mesh, P("data"))
    args = (jax.ShapeDtypeStruct((4096, 256), jnp.float32, sharding=NamedSharding(mesh, P())),
            jax.ShapeDtypeStruct((4 * 37, 5), jnp.int32, sharding=tokens),
            jax.ShapeDtypeStruct((4 * 37, 5), jnp.float32, sharding=tokens))
    compiled, _ = aot.compile_timed(jax.jit(step), *args)
    assert compiled.as_text().count("tpu_custom_call") == 3
