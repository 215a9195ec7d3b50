"""The fused neural-memory kernels (memjax.kernels.neural_memory) against the engine's reference scan:
values and gradients in interpret mode on CPU, the kernel switch, shard_map, the model end to end, and
(with libtpu) the TPU compile. The kernels run the engine's own chunk math, so float64 agrees to rounding.

Shapes stay tiny: interpret mode compiles the whole kernel, forward and backward, for the CPU."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from memjax import aot, config
from memjax.kernels import dispatch
from memjax.kernels.neural_memory import api, engine
from memjax.models import factory
from tests.helpers import tiny_config

needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason='no libtpu (pip install -e ".[tpu]" to compile for TPU topologies)')
# These tests compare values: LLVM's optimisations would double their (interpret-mode) compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compiled(fn, *args):
    return jax.jit(fn).trace(*args).lower().compile(compiler_options=FAST_COMPILE)(*args)


def problem(spec, batch=2, heads=2, dim=8, length=21, dtype=jnp.float64, seed=0):
    """Random state, momentum and streams as NeuralMemory feeds scan_chunks: `length` tokens padded with
    zeros to whole chunks (the last one incomplete when the chunk does not divide the length)."""
    rng = np.random.default_rng(seed)
    c, w = spec.chunk, spec.window - 1
    n = engine.num_chunks(length, c)
    valid = (np.arange(w + n * c) >= w) & (np.arange(w + n * c) < w + length)  # window history: zeros too
    normal = lambda *s: rng.normal(size=s)
    gate = lambda lo, hi: rng.uniform(lo, hi, size=(batch, heads, w + n * c))
    streams = {"q": normal(batch, heads, w + n * c, dim), "k": normal(batch, heads, w + n * c, dim) / 2,
               "v": normal(batch, heads, w + n * c, dim), "lr": gate(0.02, 0.2), "mom": gate(0.1, 0.9),
               "keep": gate(0.9, 1.0), "gamma": gate(0.2, 1.0)}
    if spec.objective == "huber":
        streams["delta"] = gate(0.5, 2.0)
    streams = {name: np.where(valid.reshape(-1, *(1,) * (x.ndim - 3)), x, 0.0) for name, x in streams.items()}
    streams = {name: jnp.asarray(x if name in spec.window_streams else x[:, :, w:], dtype)
               for name, x in streams.items()}
    shapes = engine.layer_shapes(spec, dim, dim)
    state = [jnp.asarray(normal(batch, heads, i, o) / np.sqrt(i), dtype) for i, o in shapes]
    momentum = [jnp.asarray(0.1 * normal(batch, heads, i, o), dtype) for i, o in shapes]
    full_N = jnp.arange(1, n + 1) * c <= length
    return state, momentum, streams, full_N


def outputs_and_grads(scan, spec, state, momentum, streams, full_N):
    """Every output of the scan, and the gradient of a fixed mix of them with respect to every input."""

    def weighted(x):  # a fixed weighting per element: every cotangent differs, and is exact in any dtype
        x = x.astype(jnp.float32)
        return jnp.sum(x * jnp.cos(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape))

    def mixed(state, momentum, streams):
        y, end_state, end_momentum, stats = scan(spec, state, momentum, streams, full_N)
        loss = weighted(y) + weighted(stats["loss_before"]) + sum(weighted(a) for a in end_state + end_momentum)
        return loss, (y, end_state, end_momentum, stats)

    (_, outputs), grads = jax.value_and_grad(mixed, argnums=(0, 1, 2), has_aux=True)(state, momentum, streams)
    return outputs, grads


def kernel_scan(backend):
    return lambda *args: api.fused_scan_chunks(*args, backend=backend)


def assert_close(actual, expected, rtol):
    """Every leaf within rtol of the expected leaf's largest magnitude."""
    paths = jax.tree_util.tree_leaves_with_path(expected)
    for (path, e), a in zip(paths, jax.tree_util.tree_leaves(actual)):
        e, a = np.asarray(e, np.float64), np.asarray(a, np.float64)
        scale = max(np.abs(e).max(), 1e-30)
        assert np.abs(a - e).max() <= rtol * scale, (jax.tree_util.keystr(path), np.abs(a - e).max() / scale)


CASES = {
    # Titans: 2-layer GELU MLP, momentum; 21 tokens in chunks of 4 (ragged tail), remat groups of 2.
    "titans_mlp2": (dict(depth=2, expansion=2, chunk=4, remat_chunks=2), dict(length=21), "tpu"),
    # Linear memory, Omega window 3, Huber, GD, read before write; 3 heads, one group of 3 chunks.
    "omega_huber_linear": (dict(depth=1, window=3, objective="huber", optimizer="gd", read="before", chunk=8,
                                remat_chunks=4), dict(batch=1, heads=3, length=19), "tpu"),
    # Moneta's rule (l_p, q-norm retention, x + LN(MLP)) with SiLU through the GPU (Triton) kernel's
    # blocks: power-of-two widths of 16, chunk 16.
    "moneta_silu_gpu": (dict(depth=2, expansion=1, activation="silu", residual="norm", objective="lp",
                             retention="qnorm", optimizer="gd", chunk=16, remat_chunks=2),
                        dict(batch=1, dim=16, length=40), "gpu"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_equals_the_reference_in_float64_values_and_gradients(case):
    spec_kw, shape_kw, backend = CASES[case]
    spec = engine.Spec(**spec_kw)
    with jax.enable_x64(True):
        state, momentum, streams, full_N = problem(spec, **shape_kw)
        assert api.supported(spec, streams["q"].shape[-1], streams["v"].shape[-1], on=backend)[0]
        run = lambda scan: compiled(lambda *a: outputs_and_grads(scan, spec, *a, full_N), state, momentum, streams)
        assert_close(run(kernel_scan(backend)), run(engine.scan_chunks), rtol=1e-11)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 2e-5), (jnp.bfloat16, 1e-2)])
def test_kernel_in_float32_and_bfloat16(dtype, rtol):
    """Against the float32 reference on the same (rounded) inputs. float32: tight. bfloat16 inputs and
    outputs (the kernels and their gate coefficients compute in float32): within 1% of each output's and
    gradient's largest magnitude, about one bfloat16 rounding."""
    spec = engine.Spec(depth=2, expansion=2, chunk=8, remat_chunks=2)
    state, momentum, streams, full_N = problem(spec, length=29, dtype=dtype)
    upcast = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree)
    expected = compiled(lambda *a: outputs_and_grads(engine.scan_chunks, spec, *a, full_N),
                        *upcast((state, momentum, streams)))
    actual = compiled(lambda *a: outputs_and_grads(kernel_scan("tpu"), spec, *a, full_N), state, momentum, streams)
    assert all(x.dtype == dtype for x in jax.tree_util.tree_leaves(actual))
    assert_close(actual, expected, rtol)


def test_kernel_inside_shard_map_on_a_mesh():
    """Under a context mesh the kernels run per device (batch over data x fsdp, heads over tensor)."""
    spec = engine.Spec(depth=1, chunk=4, remat_chunks=2)
    state, momentum, streams, full_N = problem(spec, batch=4, heads=2, dim=8, length=14, dtype=jnp.float32)
    expected = compiled(lambda *a: outputs_and_grads(engine.scan_chunks, spec, *a, full_N), state, momentum, streams)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        scan = lambda *a: api.scan_chunks(*a, kernel="pallas")
        lowered = jax.jit(lambda *a: outputs_and_grads(scan, spec, *a, full_N)).trace(state, momentum, streams).lower()
        assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
        actual = lowered.compile(compiler_options=FAST_COMPILE)(state, momentum, streams)
    assert_close(actual, expected, rtol=2e-5)


def test_kernel_choice_dispatch_and_fallbacks(caplog, monkeypatch):
    spec = engine.Spec(depth=1, chunk=4)
    state, momentum, streams, full_N = problem(spec, batch=1, heads=1, length=8, dtype=jnp.float32)
    used = []
    monkeypatch.setattr(api, "fused_scan_chunks", lambda *a, **k: used.append("pallas") or "pallas")
    monkeypatch.setattr(api.reference, "scan_chunks", lambda *a, **k: used.append("reference") or "reference")
    monkeypatch.setattr(dispatch, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="memjax"):
        for _ in range(2):  # CPU: auto is the reference, with one warning
            api.scan_chunks(spec, state, momentum, streams, full_N, kernel="auto")
    assert used == ["reference", "reference"]
    assert len([r for r in caplog.records if "neural_memory" in r.getMessage()]) == 1
    api.scan_chunks(spec, state, momentum, streams, full_N, kernel="pallas")
    api.scan_chunks(spec, state, momentum, streams, full_N, kernel="reference")
    api.scan_chunks(spec, state, momentum, streams, full_N, with_after_loss=True, kernel="pallas")  # diagnostics
    assert used[2:] == ["pallas", "reference", "reference"]
    for unsupported in (engine.Spec(optimizer="muon"), engine.Spec(retention="softmax"), engine.Spec(memory="gated")):
        assert not api.spec_supported(unsupported)[0]
        with pytest.raises(ValueError, match="neural_memory: kernel='pallas' is not supported"):
            api.scan_chunks(unsupported, state, momentum, streams, full_N, kernel="pallas")
    with pytest.raises(ValueError, match="kernel must be one of"):
        api.scan_chunks(spec, state, momentum, streams, full_N, kernel="triton")
    gpu = lambda s, width: api.supported(s, width, width, on="gpu")
    assert gpu(engine.Spec(depth=2, activation="silu", chunk=16), 16)[0]
    assert "erf" in gpu(engine.Spec(depth=2, chunk=16), 16)[1]
    assert "power-of-two" in gpu(engine.Spec(depth=1, chunk=16), 24)[1]
    assert "omega_window=1" in gpu(engine.Spec(depth=1, chunk=16, window=4), 16)[1]


@pytest.mark.parametrize("value, message", [("triton", "is not one of"), ("pallas", "materialised path")])
def test_kernel_setting_is_validated_by_name(value, message):
    cfg = tiny_config(**{"model.block_pattern": "atlas", "model.atlas.kernel": value})  # atlas: muon
    with pytest.raises(ValueError, match=rf"model\.atlas\.kernel.*{message}"):
        config.validate(cfg)


def test_model_with_the_kernel_equals_the_reference_loss_and_gradients():
    """A one-layer titans_mal (memory, then sliding-window attention): the same loss and parameter
    gradients with kernel=pallas (interpret mode) as with kernel=reference."""
    results = {}
    for kernel in ("reference", "pallas"):
        overrides = {"model.block_pattern": "titans_mal", "model.num_layers": 1, "model.titans_mal.chunk": 4,
                     "model.titans_mal.heads": 2, "model.titans_mal.window": 8, "model.titans_mal.remat_chunks": 2,
                     "model.titans_mal.persistent_tokens": 2, "model.titans_mal.kernel": kernel}
        cfg = tiny_config(**overrides)
        config.validate(cfg)
        graphdef, params = factory.build(cfg.model, 64, jax.random.key(0))
        ids = jax.random.randint(jax.random.key(1), (2, 20), 0, 64)  # 2 persistent + 19 inputs: a ragged tail

        def loss(params, graphdef=graphdef, ids=ids):
            logits, _ = nnx.merge(graphdef, params)(ids[:, :-1])
            return jnp.mean(jax.nn.log_softmax(logits) * jax.nn.one_hot(ids[:, 1:], 64))

        results[kernel] = compiled(jax.value_and_grad(loss), params)
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results["pallas"]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    assert_close(grads, ref_grads, rtol=1e-5)


def test_gpu_kernels_lower_to_triton(monkeypatch):
    """The GPU kernels' bodies lower to Triton (no GPU needed to lower; compiling needs one)."""
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")  # the real kernels, not interpret mode
    spec = engine.Spec(depth=2, expansion=2, activation="silu", chunk=16, remat_chunks=2)
    state, momentum, streams, full_N = problem(spec, batch=1, heads=2, dim=16, length=64, dtype=jnp.float32)
    assert api.supported(spec, 16, 16)[0]

    def loss(state, momentum, streams):
        y, end_state, end_momentum, _ = api.scan_chunks(spec, state, momentum, streams, full_N, kernel="pallas")
        return jnp.sum(y) + sum(jnp.sum(a) for a in end_state + end_momentum)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(state, momentum, streams).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2  # the forward and the backward kernel


@needs_libtpu
def test_kernels_compile_for_a_tpu_topology():
    """Forward and backward Mosaic kernels, for depth-2 GELU memories at a training-like head width,
    inside shard_map on a v5e slice: compiled by the TPU compiler from this CPU host."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = aot.topology_devices("v5e:2x2")
    mesh = jax.make_mesh((4,), ("data",), devices=devices, axis_types=(AxisType.Auto,))
    spec = engine.Spec(depth=2, chunk=16, window=2, remat_chunks=2)
    b, h, dim, n = 4, 2, 64, 4
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("data")))
    t, w = n * spec.chunk, spec.window - 1
    streams = {"q": sds(b, h, t, dim), "k": sds(b, h, w + t, dim), "v": sds(b, h, w + t, dim), "lr": sds(b, h, t),
               "mom": sds(b, h, t), "keep": sds(b, h, t), "gamma": sds(b, h, w + t)}
    state = [sds(b, h, i, o) for i, o in engine.layer_shapes(spec, dim, dim)]

    def loss(state, momentum, streams):
        y, s, m, stats = api.scan_chunks(spec, state, momentum, streams, jnp.ones(n, bool), kernel="pallas")
        return jnp.sum(y) + sum(jnp.sum(a) for a in s + m) + jnp.sum(stats["loss_before"])

    with jax.set_mesh(mesh):
        compiled_step, _ = aot.compile_timed(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), state, state, streams)
    assert compiled_step.as_text().count("tpu_custom_call") >= 2  # the forward and the backward kernel
