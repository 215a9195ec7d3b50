"""Peak FLOP/s of the devices in use, for MFU.

Accelerators: dense peaks from the vendors' data sheets, looked up by `device_kind`. CPUs publish no
usable peak, so one is measured: the best float32 matmul throughput of this process.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

# device_kind substring -> (bfloat16 peak, float32 peak) in FLOP/s per device (dense).
_PEAKS = {
    "TPU v6": (918e12, 918e12 / 4),
    "TPU v5p": (459e12, 459e12 / 4),
    "TPU v5 lite": (197e12, 197e12 / 4),
    "TPU v5e": (197e12, 197e12 / 4),
    "TPU v4": (275e12, 275e12 / 4),
    "TPU v3": (123e12, 123e12 / 4),
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L4": (121e12, 30e12),
}


def median_seconds(fn, *args, repeats: int = 7) -> float:
    """Median wall time of `fn(*args)` (jitted by the caller), synchronised, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_matmul_peak(size: int = 2048, repeats: int = 7, dtype=jnp.float32, batch: int = 0) -> float:
    """Median FLOP/s of a jitted size^3 matmul after warm-up, on the default device; with `batch`, of a
    batch of that many size^3 matmuls in one contraction (the rate that small matrices get)."""
    shape = (batch, size, size) if batch else (size, size)
    a = jax.random.normal(jax.random.key(0), shape, dtype)
    b = jax.random.normal(jax.random.key(1), shape, dtype)
    return 2.0 * max(batch, 1) * size**3 / median_seconds(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats)


def device_peak(compute_dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        for kind, (bf16, fp32) in _PEAKS.items():
            if kind.lower() in device.device_kind.lower():
                return (bf16 if compute_dtype == "bfloat16" else fp32), f"table ({device.device_kind})"
    dtype = jnp.bfloat16 if compute_dtype == "bfloat16" and device.platform != "cpu" else jnp.float32
    return measure_matmul_peak(dtype=dtype), f"measured matmul ({device.platform}, {jnp.dtype(dtype).name})"
