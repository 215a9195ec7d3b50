"""What keeps a run from losing work or being poisoned: the workdir lock, graceful stop on SIGTERM /
SIGINT, the non-finite policy, and the check that a resume matches the run it continues."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import threading

import jax
import jax.numpy as jnp

from memjax.config import ConfigError

log = logging.getLogger("memjax")

NONFINITE_METRICS = ("loss", "grad_norm")


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient under the configured policy."""


class WorkdirLock:
    """An exclusive lock on `<workdir>/.lock`, held for the life of the run.

    flock is released by the kernel when the process dies (even by kill -9), so a crashed run never
    leaves a stale lock behind.
    """

    def __init__(self, workdir: str):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(f"workdir {workdir} is in use by another run (pid {holder}); use another --workdir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then saves and exits)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving a checkpoint, then exiting", self.signal_name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def __bool__(self) -> bool:
        return self.signal_name is not None


def initial_guard_state() -> dict:
    return {
        "skipped": jnp.zeros((), jnp.int32),
        "first_step": jnp.full((), -1, jnp.int32),
        "first_metric": jnp.full((), -1, jnp.int32),
    }


def guard_update(guard: dict, step, stats: dict, halt: bool):
    """(apply the update?, new guard state) for the step just computed, inside jit."""
    finite = jnp.stack([jnp.isfinite(stats[name]) for name in NONFINITE_METRICS])
    ok = finite.all()
    first_time = ~ok & (guard["first_step"] < 0)
    new_guard = {
        "skipped": guard["skipped"] + (~ok).astype(jnp.int32),
        "first_step": jnp.where(first_time, step, guard["first_step"]),
        "first_metric": jnp.where(first_time, jnp.argmin(finite).astype(jnp.int32), guard["first_metric"]),
    }
    # Under "halt" nothing moves after the first bad step, so the state the host stops with is good.
    apply = ok & (guard["first_step"] < 0) if halt else ok
    return apply, new_guard


def check_guard(guard: dict, policy: str, max_skipped: int) -> None:
    """Raises NonFiniteError on the host when the policy says the run must stop."""
    guard = jax.device_get(guard)
    first_step = int(guard["first_step"])
    if first_step < 0:
        return
    metric = NONFINITE_METRICS[int(guard["first_metric"])]
    if policy == "halt":
        raise NonFiniteError(
            f"non-finite learning/{metric} at step {first_step} (train.nonfinite=halt); no update from it was "
            "applied or checkpointed. Lower optim.lr, or set train.nonfinite=skip"
        )
    skipped = int(guard["skipped"])
    if skipped > max_skipped:
        raise NonFiniteError(
            f"{skipped} steps skipped for non-finite loss or gradients, more than train.max_skipped_steps="
            f"{max_skipped} (the first: learning/{metric} at step {first_step})"
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """Name, vocabulary size and a hash of every token's byte length: differs between tokenizers."""
    digest = hashlib.sha256(tokenizer.token_bytes.astype("int32").tobytes()).hexdigest()[:12]
    return f"{tokenizer.name}/{tokenizer.vocab_size}/{digest}"


def _saved_run(workdir: str) -> dict | None:
    """The model and tokenizer of the run whose checkpoints are in workdir (None without checkpoints)."""
    path = os.path.join(workdir, "run.json")
    checkpoints = os.path.join(workdir, "checkpoints")
    has_steps = os.path.isdir(checkpoints) and any(name.isdigit() for name in os.listdir(checkpoints))
    if not (has_steps and os.path.exists(path)):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _model_and_tokenizer_settings(cfg) -> dict:
    return {"model": cfg.model.to_dict(), "tokenizer_kind": cfg.data.tokenizer}


def check_resume_config(workdir: str, cfg) -> None:
    """Before anything is built: refuses to resume a run whose model config or tokenizer kind differs."""
    saved = _saved_run(workdir)
    if saved is None:
        return
    if saved["tokenizer_kind"] != cfg.data.tokenizer:
        raise ConfigError(
            f"config.data.tokenizer: the checkpoints in {workdir} were trained with {saved['tokenizer_kind']!r}, "
            f"this config has {cfg.data.tokenizer!r}; use a new --workdir"
        )
    now = cfg.model.to_dict()
    for key in sorted(set(saved["model"]) | set(now)):
        if saved["model"].get(key) != now.get(key):
            raise ConfigError(
                f"config.model.{key}: the checkpoints in {workdir} have {saved['model'].get(key)!r}, this config "
                f"{now.get(key)!r}; a resume must keep the model config (use a new --workdir, or train.init_from)"
            )


def check_resume_tokenizer(workdir: str, vocab_size: int, tokenizer) -> None:
    """After the tokenizer is loaded: the same vocabulary as the checkpointed run."""
    saved = _saved_run(workdir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if saved is not None and (saved["tokenizer"] != fingerprint or saved["vocab_size"] != vocab_size):
        raise ConfigError(
            f"config.data.tokenizer_path: the checkpoints in {workdir} were trained with tokenizer "
            f"{saved['tokenizer']} (embedding {saved['vocab_size']}), this config loads {fingerprint} "
            f"(embedding {vocab_size}); use the run's own tokenizer or a new --workdir"
        )


def write_run_info(workdir: str, cfg, vocab_size: int, tokenizer) -> None:
    info = {**_model_and_tokenizer_settings(cfg), "vocab_size": vocab_size, "tokenizer": tokenizer_fingerprint(tokenizer)}
    tmp = os.path.join(workdir, "run.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "run.json"))
