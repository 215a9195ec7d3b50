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


def measure_matmul_peak(size: int = 2048, repeats: int = 7, dtype=jnp.float32) -> float:
    """Median FLOP/s of a jitted size^3 matmul after warm-up, on the default device."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def device_peak(compute_dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        for kind, (bf16, fp32) in _PEAKS.items():
            if kind.lower() in device.device_kind.lower():
                return (bf16 if compute_dtype == "bfloat16" else fp32), f"table ({device.device_kind})"
    dtype = jnp.bfloat16 if compute_dtype == "bfloat16" and device.platform != "cpu" else jnp.float32
    return measure_matmul_peak(dtype=dtype), f"measured matmul ({device.platform}, {jnp.dtype(dtype).name})"
