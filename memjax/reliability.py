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
            raise ConfigError(f"workdir {workdir} is in use by another run (pid {holder}); "
                              "use another --workdir") from None
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


def guard_update(guard: dict, step, stats: dict, halt: bool) -> tuple[jax.Array, dict]:
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


def check_workdir(workdir: str) -> None:
    """Before anything is built: the workdir is (or can become) a writable directory."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; use another --workdir")
    existing = workdir
    while not os.path.exists(existing):  # the nearest existing ancestor is where it will be created
        parent = os.path.dirname(os.path.abspath(existing))
        if parent == os.path.abspath(existing):
            break
        existing = parent
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir {workdir}: {existing} is a file, not a directory; use another --workdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == workdir else f"would be created in {existing}, which is"
        raise ConfigError(f"--workdir {workdir} {what} not writable; use another --workdir or fix its permissions")


def _saved_run(workdir: str, checkpoint_dir: str = "") -> dict | None:
    """The model and tokenizer of the run whose checkpoints are in workdir (None without checkpoints)."""
    from memjax import checkpoint  # lazily: orbax is heavy and the lock and guard do not need it

    path = os.path.join(workdir, "run.json")
    if not (os.path.exists(path) and checkpoint.has_steps(checkpoint.directory(workdir, checkpoint_dir))):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _model_and_tokenizer_settings(cfg) -> dict:
    return {"model": cfg.model.to_dict(), "tokenizer_kind": cfg.data.tokenizer}


def saved_config(workdir: str, cfg) -> dict | None:
    """The config (as a dict) that wrote the checkpoints a launch of `cfg` in workdir would resume, or
    None when there is nothing to resume. Keys the saved config lacks (an older memjax) take this
    config's values, so only real changes show up in `config_changes`."""
    from memjax import checkpoint

    path = os.path.join(workdir, "config.json")
    if not (os.path.exists(path) and checkpoint.has_steps(checkpoint.directory(workdir, cfg.train.checkpoint_dir))):
        return None
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)

    def merge(now: dict, old: dict) -> dict:  # every saved key (a dropped parameter group counts too)
        merged = dict(old)
        for key, value in now.items():
            if key not in old:
                merged[key] = value
            elif isinstance(value, dict) and isinstance(old[key], dict):
                merged[key] = merge(value, old[key])
        return merged

    return merge(json.loads(cfg.to_json()), saved)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# Settings that never change the saved train state's structure: a resume may change them freely and
# the structural comparison (trainer.check_resume_structure) is skipped when only these differ.
# Anything else is allowed too as long as the optimizer state, carry and parameters keep their shapes.
FREE_ON_RESUME = (
    "train.steps", "train.stop_at_step", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpoint", "train.init_from",
    "train.progress_bar", "train.nonfinite", "train.max_skipped_steps", "train.inject_nan_at_step",
    "train.restart", "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio", "mesh.",
    "data.prefetch",
)


def is_free_on_resume(key: str) -> bool:
    return any(key == free or (free.endswith(".") and key.startswith(free)) for free in FREE_ON_RESUME)


def _differences(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) of every key of two flat dicts whose values differ, in key order."""
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _without_unused_sections(changes, saved_model: dict, model: dict) -> list[tuple[str, object, object]]:
    """`changes` less those in the `config.model` sections (block and wrapper settings) that neither model
    config uses: every config carries every registered block's defaults, so without this a new default of
    a block the run never had (or a changed setting of one) would make the run unresumable."""
    import ml_collections

    from memjax.models import registry

    used = set()
    for model_dict in (saved_model, model):
        model_cfg = ml_collections.ConfigDict(model_dict)
        used |= set(registry.block_names(model_cfg)) | set(registry.enabled_wrappers(model_cfg))
    unused = set(registry.config_sections()) - used

    def in_unused(key: str) -> bool:
        parts = key.split(".")
        return len(parts) > 2 and parts[0] == "model" and parts[1] in unused

    return [c for c in changes if not in_unused(c[0])]


def config_changes(saved: dict, cfg) -> list[tuple[str, object, object]]:
    """(dotted key, saved value, new value) of every setting that differs, in key order; the settings of
    blocks and wrappers that neither config uses are not compared."""
    now = json.loads(cfg.to_json())
    return _without_unused_sections(_differences(_flat(saved), _flat(now)), saved["model"], now["model"])


def resume_refusal(workdir: str, changes: list[tuple[str, object, object]], init_from: bool = True) -> str:
    """One line: the settings that make the checkpoints in workdir unresumable, and the ways forward."""
    names = ", ".join(f"config.{key}" for key, _, _ in changes)
    if len(changes) == 1:
        (_, old, new), = changes
        values = f"have {old!r}, this config {new!r}"
    else:
        values = (f"have {', '.join(f'{k}={o!r}' for k, o, _ in changes)}; this config "
                  f"{', '.join(f'{k}={n!r}' for k, _, n in changes)}")
    way = (f"or start a new --workdir with train.init_from={workdir} (its parameters, fresh optimizer state)"
           if init_from else "or use a new --workdir")
    return (f"{names}: the checkpoints in {workdir} {values}; a resume cannot change the saved train state's "
            f"structure, so nothing was changed: revert {'it' if len(changes) == 1 else 'them'} to resume, {way}")


def check_resume_config(workdir: str, cfg) -> None:
    """Before anything is built: refuses to resume a run whose model config or tokenizer kind differs."""
    saved = _saved_run(workdir, cfg.train.checkpoint_dir)
    if saved is None:
        return
    if saved["tokenizer_kind"] != cfg.data.tokenizer:
        raise ConfigError(
            f"config.data.tokenizer: the checkpoints in {workdir} were trained with {saved['tokenizer_kind']!r}, "
            f"this config has {cfg.data.tokenizer!r}; use a new --workdir"
        )
    saved_model, model = _flat(saved["model"], "model."), cfg.model.to_dict()
    # A setting the saved run lacks was added by a later memjax (a new block's section, a new option whose
    # default is the old behaviour): not a change, or upgrading memjax would strand every run.
    known = [c for c in _differences(saved_model, _flat(model, "model.")) if c[0] in saved_model]
    changed = _without_unused_sections(known, saved["model"], model)
    if changed:
        raise ConfigError(resume_refusal(workdir, changed, init_from=False))


def check_resume_tokenizer(workdir: str, vocab_size: int, tokenizer, checkpoint_dir: str = "") -> None:
    """After the tokenizer is loaded: the same vocabulary as the checkpointed run."""
    saved = _saved_run(workdir, checkpoint_dir)
    fingerprint = tokenizer_fingerprint(tokenizer)
    if saved is not None and (saved["tokenizer"] != fingerprint or saved["vocab_size"] != vocab_size):
        raise ConfigError(
            f"config.data.tokenizer_path: the checkpoints in {workdir} were trained with tokenizer "
            f"{saved['tokenizer']} (embedding {saved['vocab_size']}), this config loads {fingerprint} "
            f"(embedding {vocab_size}); use the run's own tokenizer or a new --workdir"
        )


def write_atomically(path: str, text: str) -> None:
    """The file is the old one or the new one, never half of it: a kill mid-write leaves a .tmp."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_run_info(workdir: str, cfg, vocab_size: int, tokenizer) -> None:
    info = {**_model_and_tokenizer_settings(cfg), "vocab_size": vocab_size,
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    write_atomically(os.path.join(workdir, "run.json"), json.dumps(info, indent=2))
