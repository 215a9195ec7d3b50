"""Which implementation of a kernel op runs: the shared `kernel = auto | reference | pallas` switch.

"reference": the pure-JAX op. "pallas": the Pallas kernel; on CPU it runs in interpret mode (that is
how the tests exercise it), and a combination the kernel does not support is an error. "auto": the
Pallas kernel on TPU and GPU where supported, else the reference with one warning per (op, reason) per
process, so a run that silently fell back is still visible in its log.
"""

from __future__ import annotations

import logging

import jax

KERNEL_CHOICES = ("auto", "reference", "pallas")

log = logging.getLogger("memjax")
_warned: set[tuple[str, str]] = set()


def platform() -> str:
    """The platform kernels are built for: the context mesh's devices (so an ahead-of-time compile for a
    TPU topology from a CPU host picks the TPU kernel), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def interpret() -> bool:
    """Pallas kernels run in interpret mode when there is no accelerator (CPU)."""
    return platform() == "cpu"


def resolve(op: str, choice: str, supported: bool = True, why: str = "") -> str:
    """"pallas" or "reference" for `op` under config choice `choice` (one of KERNEL_CHOICES).

    `supported`/`why`: whether the Pallas kernel handles this call (shapes, dtypes, platform) and, if
    not, the reason, for the error ("pallas") or the warning ("auto").
    """
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{op}: kernel must be one of {list(KERNEL_CHOICES)}, got {choice!r}")
    if choice == "reference":
        return "reference"
    if choice == "pallas":
        if not supported:
            raise ValueError(f"{op}: kernel='pallas' is not supported here: {why}")
        return "pallas"
    if interpret():
        supported, why = False, "no Pallas kernel runs natively on CPU (interpret mode is for tests)"
    if supported:
        return "pallas"
    if (op, why) not in _warned:
        _warned.add((op, why))
        log.warning("%s: kernel='auto' falls back to the pure-JAX reference: %s", op, why)
    return "reference"


__all__ = ["KERNEL_CHOICES", "interpret", "platform", "resolve"]
