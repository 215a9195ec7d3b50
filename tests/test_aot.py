"""memjax.aot: memory reports of compiled programs, the HBM table, the verdict, the libtpu hint; the TPU
topology compile itself runs only where libtpu is installed (`pip install -e ".[tpu]"`)."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from memjax import aot
from tests.helpers import tiny_config

GIB = 2**30
needs_libtpu = pytest.mark.skipif(not aot.libtpu_available(),
                                  reason='libtpu is not installed '
                                         '(pip install -e ".[tpu]" to compile for TPU topologies)')


def _update(w, x):
    return w - 0.1 * x.T @ jnp.tanh(x @ w), jnp.sum(x)


def _sharded_args(mesh):
    w = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    return w, x


def test_memory_report_of_a_cpu_compile_counts_one_devices_shards():
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    w, x = _sharded_args(mesh)
    compiled, seconds = aot.compile_timed(jax.jit(_update, donate_argnums=0), w, x)
    report = aot.MemoryReport.from_compiled(compiled)
    shard_w, shard_x = 128 * 128 * 4, 16 * 256 * 4
    assert aot.shard_bytes((w, x)) == shard_w + shard_x
    assert report.argument == shard_w + shard_x
    assert report.alias == shard_w  # the donated weights' shard is reused for the new ones
    assert report.output >= shard_w
    assert report.needed("cpu") == report.argument + report.output - report.alias + report.temp
    assert seconds > 0


def test_tpu_needs_the_compilers_peak_other_platforms_the_sum():
    # The TPU compiler checks its peak against the HBM; CPU's peak is about the arguments alone.
    report = aot.MemoryReport(argument=4, output=4, alias=4, temp=16, generated_code=1, peak=20)
    assert report.needed("tpu") == 20 and report.needed("cpu") == 21
    assert report.fits(20, "tpu") and not report.fits(20, "cpu") and report.fits(None, "tpu") is None
    no_peak = aot.MemoryReport(argument=4, output=4, alias=0, temp=0, generated_code=0, peak=0)
    assert no_peak.needed("tpu") == 8


def test_hbm_table_per_chip_and_per_device():
    assert aot.hbm_per_chip("TPU v5 lite") == 16 * GIB  # v5e
    assert aot.hbm_per_chip("TPU v5") == 95 * GIB  # v5p
    assert aot.hbm_per_chip("tpu v4") == 32 * GIB
    assert aot.hbm_per_chip("TPU v6 lite") == 32 * GIB
    assert aot.hbm_per_chip("cpu") is None

    def chip(kind, coords, core):
        return SimpleNamespace(device_kind=kind, coords=coords, core_on_chip=core, id=len(coords) * 10 + core)

    v3 = [chip("TPU v3", (i, 0, 0), core) for i in range(2) for core in range(2)]  # two cores per chip
    assert aot.devices_per_chip(v3) == 2 and aot.hbm_per_device(v3) == 16 * GIB
    v5e = [chip("TPU v5 lite", (i, j, 0), 0) for i in range(2) for j in range(2)]
    assert aot.devices_per_chip(v5e) == 1 and aot.hbm_per_device(v5e) == 16 * GIB
    assert aot.hbm_per_device(jax.devices()) is None
    assert aot.device_hbm(jax.devices()) == (None, "unknown for 'cpu'")


def test_topology_names():
    assert aot.parse_topology("v5e:8x8") == ("v5e", (8, 8))
    assert aot.topology_kwargs("v4:4x4x4") == {"chips_per_host_bounds": (2, 2, 1), "chip_config_name": "megacore"}
    assert aot.topology_kwargs("v5p:2x2x1")["chip_config_name"] == "megacore"
    assert aot.topology_kwargs("v5e:1x1") == {"chips_per_host_bounds": (1, 1, 1)}
    with pytest.raises(ValueError, match="v5e:8x8"):
        aot.parse_topology("v5litepod-64")


def test_out_of_memory_messages_are_read():
    refusal = aot.OutOfMemory.parse("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                    "HLO temporaries (22.66G) exceeds available HBM (15.75G).")
    assert refusal.required == int(22.66 * GIB) and refusal.available == int(15.75 * GIB)
    other = aot.OutOfMemory.parse("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
                                  "space hbm. Used 20.95G of 15.48G hbm. Exceeded hbm capacity by 5.47G.")
    assert other.required == int(20.95 * GIB) and other.available == int(15.48 * GIB)
    assert aot.OutOfMemory.parse("INVALID_ARGUMENT: Invalid TPU program.") is None
    assert aot._parse_size("512M") == 512 * 2**20 and aot._parse_size("1.00T") == 2**40


def _report(**kw):
    memory = aot.MemoryReport(argument=2 * GIB, output=2 * GIB, alias=2 * GIB, temp=0, generated_code=0,
                              peak=kw.pop("peak", 10 * GIB))
    fields = dict(topology="v5e:8x8", platform="tpu", device_kind="TPU v5 lite", num_devices=64, devices_per_chip=1,
                  mesh_shape={"data": 1, "fsdp": 64, "tensor": 1}, memory=memory, hbm=16 * GIB,
                  hbm_source="data sheet", compile_seconds=12.3, notes=["model: 1M parameters"])
    fields.update(kw)
    return aot.AotReport(**fields)


def test_report_states_the_verdict_on_its_last_lines():
    fits = aot.format_report(_report())
    assert "64 chips" in fits and "data=1 x fsdp=64 x tensor=1" in fits and "12.3 s" in fits
    assert "model" in fits and "1M parameters" in fits
    assert fits.splitlines()[-1].startswith("FITS: yes (62% of HBM")
    assert aot.format_report(_report(peak=20 * GIB)).splitlines()[-1].startswith(
        "FITS: NO (125% of HBM, 4.00 GiB over)")
    refused = _report(peak=22 * GIB, hbm=int(15.75 * GIB), refused="RESOURCE_EXHAUSTED: Ran out of memory")
    text = aot.format_report(refused)
    assert refused.fits is False and "not reported (refused)" in text
    assert text.splitlines()[-2].startswith("FITS: NO") and text.splitlines()[-1].startswith("compiler: RESOURCE")
    assert aot.format_report(_report(hbm=None)).splitlines()[-1].startswith("FITS: unknown")


def test_missing_libtpu_gives_one_clear_error(monkeypatch):
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name, *a: None)
    assert not aot.libtpu_available()
    with pytest.raises(aot.LibtpuMissing, match=r'pip install -e "\.\[tpu\]"'):
        aot.topology_devices("v5e:8x8")
    flag_values = (SimpleNamespace(value=tiny_config()), SimpleNamespace(value="v5e:8x8"), SimpleNamespace(value=1))
    with pytest.raises(SystemExit) as exit_info:
        aot.main([], flag_values)
    assert str(exit_info.value.code) == f"error: {aot.INSTALL_HINT}"


def test_train_step_compiles_for_a_mesh_of_cpu_devices():
    cfg = tiny_config(**{"mesh.num_devices": 0, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    report = aot.compile_train_step(cfg, jax.devices()[:8], "cpu")
    assert report.mesh_shape == {"data": 2, "fsdp": 2, "tensor": 2}
    assert report.memory.argument > 0 and report.memory.alias > 0 and report.fits is None
    text = aot.format_report(report)
    assert "8 devices" in text and "4 x 32 = 128 tokens per step, 32 per batch shard" in text


@needs_libtpu
def test_train_step_and_a_pallas_kernel_compile_for_a_tpu_topology():
    from jax.experimental import pallas as pl

    devices = aot.topology_devices("v5e:2x2")
    assert len(devices) == 4 and devices[0].platform == "tpu"
    hbm, source = aot.device_hbm(devices)
    assert 15 * GIB < hbm <= 16 * GIB and "compiler" in source

    cfg = tiny_config(**{"mesh.num_devices": 0, "mesh.data": 2, "mesh.fsdp": 2})
    report = aot.compile_train_step(cfg, devices, "v5e:2x2")
    assert report.num_chips == 4 and report.fits is True and report.memory.peak > 0
    assert aot.format_report(report).splitlines()[-1].startswith("FITS: yes")

    mesh = jax.make_mesh((4,), ("data",), devices=devices, axis_types=(AxisType.Auto,))

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2.0

    def kernel(x):
        return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    sharded = jax.shard_map(kernel, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
    compiled, _ = aot.compile_timed(jax.jit(sharded), x)
    assert "tpu_custom_call" in compiled.as_text()
    assert aot.MemoryReport.from_compiled(compiled).argument == 8 * 128 * 4


def test_hbm_figures_are_numbers():
    assert all(isinstance(v, (int, float)) and v > 0 for v in aot.HBM_GIB_PER_CHIP.values())
    assert np.isclose(aot.hbm_per_chip("TPU7x") / GIB, 192)
