"""Ahead-of-time compilation of the train step for a TPU slice, from any host: per-chip memory, and
whether it fits the chip.

`python -m memjax.aot --config configs/titans_340m.py --topology v5e:8x8 [--num_slices 1]
[--config.mesh.fsdp=-1 --config.train.batch_size=...]`

With libtpu installed (`pip install -e ".[tpu]"`), JAX on a CPU host can compile for a TPU topology it
does not have (`jax.experimental.topologies`): compile-only devices with the real chips' coordinates.
The train step (`trainer.make_train_step`, with the mesh and shardings of `config.mesh`) is lowered on
ShapeDtypeStructs (nothing is allocated) and compiled by the TPU compiler, Pallas kernels included, so
sharding errors, unsupported ops and out-of-memory show up here rather than on the pod.

Memory is per device (one chip; v2/v3 chips expose two devices of half the HBM each), from the compiled
program (`compiled.memory_analysis()`): arguments (the train state's shard and the batch's), outputs,
their aliased part (the donated state), temporaries, the program, and the compiler's peak. On TPU the
verdict is the compiler's own: it refuses a program whose peak exceeds the HBM it may use (the chip's
less what the runtime keeps: 15.75 of 16 GiB on a v5e), and "needs" is that peak; a refused program is
reported with the compiler's figures and the shardings' argument sizes. The TPU figures for
temporaries do not add up to the peak (0 for some programs, above it for others), so they are shown but
not used. Elsewhere (CPU, tests) "needs" is arguments + outputs - aliased + temporaries + program,
compared against the device's reported limit or the data sheet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np

INSTALL_HINT = 'AOT compilation for TPU needs libtpu, which this environment lacks: pip install -e ".[tpu]"'
GIB = 2**30

# device_kind -> HBM per chip in GiB (Cloud TPU system architecture pages). v2/v3 chips hold two
# TensorCores, each its own device with half the HBM; v4/v5p run as one "megacore" device per chip.
HBM_GIB_PER_CHIP = {
    "TPU v2": 16,
    "TPU v3": 32,
    "TPU v4": 32,
    "TPU v5 lite": 16,  # v5e
    "TPU v5e": 16,
    "TPU v5": 95,  # v5p
    "TPU v5p": 95,
    "TPU v6 lite": 32,  # v6e (Trillium)
    "TPU v6e": 32,
    "TPU7x": 192,  # two devices per chip
}

# Generations whose chips have two TensorCores that JAX fuses into one device ("megacore"): without the
# chip config the topology lists every core as a device (v4:4x4x4 would give 128 instead of 64).
_MEGACORE = ("v4", "v5p", "v5")
_TOPOLOGY_NAME = re.compile(r"^([a-z0-9]+):(\d+(?:x\d+)*)(_twisted|_untwisted)?$")


class LibtpuMissing(RuntimeError):
    """libtpu (the TPU compiler) is not installed."""


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
    if not libtpu_available():
        raise LibtpuMissing(INSTALL_HINT)


# ------------------------------------------------------------------------------------------ topologies


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """("v5e", (8, 8)) from "v5e:8x8"; raises ValueError for other spellings (e.g. "v5litepod-64")."""
    match = _TOPOLOGY_NAME.match(name.strip().lower())
    if not match:
        raise ValueError(f"--topology {name!r}: expected GENERATION:SHAPE in chips, e.g. v5e:8x8 (a v5litepod-64), "
                         "v4:4x4x4 (a v4-128), v5p:4x4x4 (a v5p-128), v6e:4x4")
    return match.group(1), tuple(int(d) for d in match.group(2).split("x"))


def topology_kwargs(name: str) -> dict:
    """get_topology_desc's keyword arguments for a topology name: the megacore chip config where a
    chip has two fused cores, and a host of (up to) 2 x 2 chips, which small slices need stated."""
    generation, dims = parse_topology(name)
    kwargs = {"chips_per_host_bounds": (min(dims[0], 2), min(dims[1], 2) if len(dims) > 1 else 1, 1)}
    if generation in _MEGACORE:
        kwargs["chip_config_name"] = "megacore"
    return kwargs


@contextlib.contextmanager
def _stderr_to_file():
    """Redirects file descriptor 2 (libtpu's C++ logging, which complains about the missing TPU
    metadata on a host without TPUs) to a temporary file; shows it only if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The compile-only devices of a TPU slice (or `num_slices` slices joined over DCN)."""
    from jax.experimental import topologies

    require_libtpu()
    # libtpu takes a machine-wide lock when it loads; compiling needs no chips, so a TPU VM that is
    # training (or another compile) must not block this process.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = topology_kwargs(name)
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    try:
        with _stderr_to_file():
            topology = topologies.get_topology_desc(topology_name=name.strip().lower(), platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as err:
        raise ValueError(f"--topology {name!r}: {err}") from None
    return list(topology.devices)


def devices_per_chip(devices) -> int:
    """How many devices share a chip (devices without coordinates, e.g. CPUs: 1)."""
    counts: dict = {}
    for d in devices:
        coords = getattr(d, "coords", None)
        key = (getattr(d, "slice_index", None), tuple(coords) if coords is not None else d.id)
        counts[key] = counts.get(key, 0) + 1
    return max(counts.values(), default=1)


def hbm_per_chip(device_kind: str) -> int | None:
    """Bytes of HBM of a chip of this kind, or None if the kind is not in the table."""
    gib = {k.lower(): v for k, v in HBM_GIB_PER_CHIP.items()}.get(device_kind.strip().lower())
    return None if gib is None else int(gib * GIB)


def hbm_per_device(devices) -> int | None:
    """The data sheet's HBM of a chip over the devices it holds, or None if the kind is not in the table."""
    chip = hbm_per_chip(devices[0].device_kind)
    return None if chip is None else chip // devices_per_chip(devices)


_SIZE = re.compile(r"([0-9.]+)\s*([KMGT]?)i?B?", re.IGNORECASE)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _parse_size(text: str) -> int:
    """Bytes of an XLA size such as "15.75G" (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def compiler_hbm_limit(device) -> int | None:
    """The HBM the TPU compiler lets one program use on this device (the chip's HBM less what the
    runtime keeps: 15.75 GiB on a v5e), read from its out-of-memory message for a 1 TiB buffer; None
    where the compiler does not say (not a TPU, or another message)."""
    if device.platform != "tpu":
        return None
    mesh = jax.sharding.Mesh(np.asarray([device]), ("one",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    try:
        jax.jit(lambda: jax.numpy.zeros((2**38,), np.float32), out_shardings=sharding).lower().compile()
    except jax.errors.JaxRuntimeError as err:
        match = re.search(r"available HBM \(([^)]+)\)", str(err))
        return _parse_size(match.group(1)) if match else None
    return None


# --------------------------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Bytes per device of a compiled program."""

    argument: int
    output: int
    alias: int  # outputs written into donated arguments (counted in both)
    temp: int
    generated_code: int
    peak: int  # the compiler's peak of live buffers (TPU); 0 where not reported

    @classmethod
    def from_compiled(cls, compiled) -> MemoryReport:
        stats = compiled.memory_analysis()
        if stats is None:
            raise RuntimeError("the compiler reports no memory analysis for this program")
        get = lambda name: int(getattr(stats, name, 0) or 0)  # noqa: E731
        return cls(argument=get("argument_size_in_bytes"), output=get("output_size_in_bytes"),
                   alias=get("alias_size_in_bytes"), temp=get("temp_size_in_bytes"),
                   generated_code=get("generated_code_size_in_bytes"), peak=get("peak_memory_in_bytes"))

    @property
    def live(self) -> int:
        """Arguments, outputs (less what reuses donated arguments), temporaries and the program."""
        return self.argument + self.output - self.alias + self.temp + self.generated_code

    def needed(self, platform: str) -> int:
        """What the program needs on a device: on TPU the compiler's peak, the figure it checks against
        the HBM (its out-of-memory message quotes it); elsewhere the sum of `live` (see the module
        docstring)."""
        return self.peak if platform == "tpu" and self.peak else self.live

    def fits(self, hbm: int | None, platform: str) -> bool | None:
        return None if hbm is None else self.needed(platform) <= hbm

    @classmethod
    def from_shapes(cls, arguments, outputs, donated, peak: int = 0) -> MemoryReport:
        """What the shardings alone tell (no temporaries): for a program the compiler refused."""
        return cls(argument=shard_bytes(arguments), output=shard_bytes(outputs), alias=shard_bytes(donated),
                   temp=0, generated_code=0, peak=peak)


def shard_bytes(tree) -> int:
    """Bytes of one device's shard of every array (ShapeDtypeStructs with shardings) of a tree: the
    largest shard, where a dimension does not divide evenly; without TPU tile padding."""
    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


# The TPU compiler's refusals: "... required for HLO temporaries (22.66G) exceeds available HBM (15.75G)"
# (libtpu 0.0.42) and older releases' "Used 20.95G of 15.48G hbm".
_OOM_MESSAGES = (
    re.compile(r"required for [^(]*\(([0-9.]+[KMGT]?)\) exceeds available HBM \(([0-9.]+[KMGT]?)\)"),
    re.compile(r"Used ([0-9.]+[KMGT]?) of ([0-9.]+[KMGT]?) hbm", re.IGNORECASE),
)


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
    """The compiler refused the program: it needs `required` bytes of a device's `available`."""

    required: int
    available: int
    message: str

    @classmethod
    def parse(cls, message: str) -> OutOfMemory | None:
        if "RESOURCE_EXHAUSTED" not in message:
            return None
        for pattern in _OOM_MESSAGES:
            match = pattern.search(message)
            if match:
                return cls(_parse_size(match.group(1)), _parse_size(match.group(2)), message.strip())
        return None


def compile_timed(jitted, *args) -> tuple[jax.stages.Compiled | OutOfMemory, float]:
    """(compiled or OutOfMemory, seconds) of jitted.lower(*args).compile(). Any other error is raised."""
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as err:
        refusal = OutOfMemory.parse(str(err))
        if refusal is None:
            raise
        return refusal, time.perf_counter() - start
    return compiled, time.perf_counter() - start


@dataclasses.dataclass
class AotReport:
    topology: str
    platform: str
    device_kind: str
    num_devices: int
    devices_per_chip: int
    mesh_shape: dict
    memory: MemoryReport
    hbm: int | None  # per device, what the verdict compares against
    hbm_source: str
    compile_seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)  # extra "name: value" lines
    refused: str = ""  # the compiler's out-of-memory message, if it refused the program

    @property
    def num_chips(self) -> int:
        return self.num_devices // self.devices_per_chip

    @property
    def needed(self) -> int:
        return self.memory.needed(self.platform)

    @property
    def fits(self) -> bool | None:
        return False if self.refused else self.memory.fits(self.hbm, self.platform)


def _gib(n: int) -> str:
    return f"{n / GIB:8.3f} GiB"


def format_report(report: AotReport) -> str:
    """The report as an aligned table ending in a one-line verdict: "FITS: yes", "FITS: NO", or unknown."""
    m = report.memory
    mesh = " x ".join(f"{axis}={size}" for axis, size in report.mesh_shape.items())
    if report.platform != "tpu":
        per, where = "device", f"{report.num_devices} devices"
    elif report.devices_per_chip == 1:
        per, where = "chip", f"{report.num_chips} chips"
    else:
        per, where = (f"device ({report.devices_per_chip} per chip)",
                      f"{report.num_chips} chips, {report.num_devices} devices")
    unknown = "not reported (refused)" if report.refused else ""
    rows = [
        ("topology", f"{report.topology} ({report.device_kind}): {where}"),
        ("mesh", mesh),
        *(tuple(line.split(": ", 1)) for line in report.notes),
        ("compile time", f"{report.compile_seconds:.1f} s"),
        (f"per {per}:", ""),
        ("  arguments", _gib(m.argument)),
        ("  outputs", _gib(m.output)),
        ("  aliased (donated)", _gib(m.alias)),
        ("  temporaries", unknown or _gib(m.temp)),
        ("  program", unknown or _gib(m.generated_code)),
        ("  compiler peak", _gib(m.peak) if m.peak else "not reported"),
        ("  needs", _gib(report.needed)),
        ("  HBM", f"{_gib(report.hbm)} ({report.hbm_source})" if report.hbm is not None
         else f"unknown for {report.device_kind!r}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}".rstrip() for name, value in rows]
    if report.fits is None:
        verdict = f"FITS: unknown (no HBM figure for {report.device_kind!r})"
    elif report.fits:
        verdict = (f"FITS: yes ({report.needed / report.hbm:.0%} of HBM, "
                   f"{(report.hbm - report.needed) / GIB:.2f} GiB free)")
    else:
        verdict = (f"FITS: NO ({report.needed / report.hbm:.0%} of HBM, "
                   f"{(report.needed - report.hbm) / GIB:.2f} GiB over)")
        if report.refused:
            verdict += f"\ncompiler: {report.refused}"
    return "\n".join(lines + [verdict])


def device_hbm(devices) -> tuple[int | None, str]:
    """(bytes a program may use on one device, where the figure comes from): the TPU compiler's limit,
    an accelerator's reported limit, or the data sheet; (None, reason) when none is known."""
    sheet = hbm_per_device(devices)
    limit = compiler_hbm_limit(devices[0])
    if limit is not None:
        return limit, "the TPU compiler's limit" + (f"; data sheet {sheet / GIB:g} GiB" if sheet else "")
    try:
        stats = devices[0].memory_stats() or {}
    except Exception:  # compile-only and CPU devices have none
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), "the device's reported limit"
    if sheet is not None:
        return sheet, "data sheet"
    return None, f"unknown for {devices[0].device_kind!r}"


# ---------------------------------------------------------------------------------------- train step


def stand_in_tokenizer(data_cfg) -> Any:
    """A tokenizer with the configured vocabulary and nothing else: AOT needs shapes, not a trained BPE."""
    from memjax.data import ByteTokenizer

    if data_cfg.tokenizer == "byte":
        return ByteTokenizer()
    vocab = int(data_cfg.bpe_vocab_size)
    return SimpleNamespace(name=data_cfg.tokenizer, vocab_size=vocab, eos_id=vocab - 1,
                           token_bytes=np.ones(vocab, np.int32), describe=lambda: f"stand-in (vocab {vocab})")


def abstract_batch(cfg, sharding) -> dict:
    """The train step's batch as ShapeDtypeStructs: packed rows [B, T], or documents in S segments."""
    t = cfg.train
    struct = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    if t.segments_per_step:
        shape = (t.batch_size, t.segments_per_step, t.seq_len)
        return {"inputs": struct(shape, np.int32), "targets": struct(shape, np.int32),
                "mask": struct(shape, np.bool_), "reset": struct(shape[:2], np.bool_)}
    shape = (t.batch_size, t.seq_len)
    return {"inputs": struct(shape, np.int32), "targets": struct(shape, np.int32)}


def compile_train_step(cfg, devices, topology: str = "") -> AotReport:
    """Compiles the config's train step for `devices` (a topology's, or real ones) and reports memory."""
    from memjax import parallel, trainer
    from memjax.models import factory

    run = trainer.setup(cfg, None, tokenizer=stand_in_tokenizer(cfg.data), devices=devices)
    mesh = run.mesh
    state = trainer.abstract_state(run)
    batch = abstract_batch(cfg, parallel.batch_sharding(mesh))
    step = trainer.make_train_step(run)
    hbm, hbm_source = device_hbm(devices)
    with jax.set_mesh(mesh):  # the sharded bag and activation constraints read it at trace time
        compiled, seconds = compile_timed(step, state, batch)
    refused = isinstance(compiled, OutOfMemory)
    if refused:  # the train state is donated: its outputs reuse its arguments
        memory = MemoryReport.from_shapes((state, batch), state, state, peak=compiled.required)
        hbm, hbm_source = compiled.available, "the TPU compiler's limit"
    else:
        memory = MemoryReport.from_compiled(compiled)
    t = cfg.train
    tokens = t.batch_size * t.seq_len * max(t.segments_per_step, 1)
    shards = int(np.prod([mesh.shape[axis] for axis in parallel.BATCH_AXES]))
    notes = [
        f"model: {factory.count_params(state['params']) / 1e6:.1f}M parameters, {cfg.model.block_pattern}, "
        f"{cfg.model.dtype}, vocab {run.vocab_size}",
        f"batch: {t.batch_size} x {t.seq_len}" + (f" x {t.segments_per_step} segments" if t.segments_per_step else "")
        + f" = {tokens:,} tokens per step, {tokens // shards:,} per batch shard"
        + (f", in {t.grad_accum_steps} micro-batches" if t.grad_accum_steps > 1 else ""),
    ]
    return AotReport(topology=topology or devices[0].platform, platform=devices[0].platform,
                     device_kind=devices[0].device_kind,
                     num_devices=len(devices), devices_per_chip=devices_per_chip(devices),
                     mesh_shape=dict(mesh.shape), memory=memory, hbm=hbm, hbm_source=hbm_source,
                     compile_seconds=seconds, notes=notes, refused=compiled.message if refused else "")


# ------------------------------------------------------------------------------------------------- CLI


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
    topology = flags.DEFINE_string("topology", None,
                                   "TPU slice, GENERATION:SHAPE in chips: v5e:8x8, v4:4x4x4, v5p:4x4x4.")
    slices = flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (config.mesh.dcn_* splits them).")
    flags.mark_flags_as_required(["config", "topology"])
    return config, topology, slices


def main(argv, flag_values) -> None:
    del argv
    from absl import logging as absl_logging

    from memjax import config

    config_value, topology, slices = flag_values
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("memjax").setLevel(logging.INFO)
    # Compile-only: never take a host's own accelerators (a TPU VM's chips may be busy training).
    jax.config.update("jax_platforms", "cpu")
    try:
        devices = topology_devices(topology.value, slices.value)
        report = compile_train_step(config_value.value, devices, topology.value)
    except (LibtpuMissing, config.ConfigError, ValueError) as err:
        sys.exit(f"error: {err}")
    except jax.errors.JaxRuntimeError as err:  # not out of memory (that is a report): a real compile error
        sys.exit(f"error: the compiler rejected the train step for {topology.value}: {err}")
    print(format_report(report))  # exit status 0 whether it fits or not: the last line says which


if __name__ == "__main__":
    from absl import app

    from memjax.config import parse_command_line

    _FLAG_VALUES = _flags()
    app.run(lambda argv: main(argv, _FLAG_VALUES), flags_parser=parse_command_line)
