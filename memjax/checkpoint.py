"""One orbax CheckpointManager per run, under `<workdir>/checkpoints/<step>/`.

Items of a checkpoint: `params` (the model's parameters, all that sampling and `init_from` need),
`train` (optimizer state, step, rng) and `data` (the grain iterator's position, so a resume continues
the exact data stream). Saves are asynchronous; orbax writes to a temporary directory and renames it
when complete, so an interrupted save never looks like a checkpoint.

Integrity: once a save is known complete (the next save, `wait` or `close`), process 0 writes
`<step>/memjax_integrity.json`, the size and sha256 of every file of the step. A restore verifies it
first; only a step whose files provably differ from their record is moved aside to `<step>.corrupt`.
A step without a record (the process died between orbax's rename and the record) is unverified, not
corrupt: it is restored as usual. Any other restore failure stops the run and moves nothing, since
it usually means the config no longer matches the checkpoint rather than damaged files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import threading
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import multihost

ITEMS = ("params", "train", "data")
INTEGRITY_FILE = "memjax_integrity.json"
log = logging.getLogger("memjax")


class CheckpointError(RuntimeError):
    """The checkpoints of a run cannot be resumed (or saved) as they are; the message says why and what to do."""


def has_steps(directory: str) -> bool:
    """Whether a checkpoint directory holds at least one finished step (named by its number)."""
    path = epath.Path(directory)
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def _step_files(step_dir: epath.Path) -> dict[str, epath.Path]:
    """Every file under a step directory by its "/"-joined relative path (iterdir, not rglob: epath
    refuses recursive globs on GCS)."""
    files, pending = {}, [(step_dir, "")]
    while pending:
        directory, prefix = pending.pop()
        for p in directory.iterdir():
            if p.is_dir():
                pending.append((p, f"{prefix}{p.name}/"))
            elif p.name != INTEGRITY_FILE:
                files[f"{prefix}{p.name}"] = p
    return files


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_integrity(step_dir: epath.Path) -> None:
    """Records the size and sha256 of every file of a finished step, written atomically."""
    step_dir = epath.Path(step_dir)
    files = {rel: {"size": p.stat().length, "sha256": _sha256(p)} for rel, p in sorted(_step_files(step_dir).items())}
    tmp = step_dir / f"{INTEGRITY_FILE}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    tmp.rename(step_dir / INTEGRITY_FILE)


def verify_integrity(step_dir: epath.Path) -> str | None:
    """Why a step's files differ from its integrity record ("" when they match, None without a record)."""
    step_dir = epath.Path(step_dir)
    record = step_dir / INTEGRITY_FILE
    if not record.exists():
        return None
    try:
        expected = json.loads(record.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"{INTEGRITY_FILE} is unreadable ({err})"
    for rel, entry in expected.items():
        path = step_dir / rel
        if not path.exists():
            return f"{rel} is missing"
        if path.stat().length != entry["size"]:
            return f"{rel} has {path.stat().length} bytes, {entry['size']} when saved"
        if _sha256(path) != entry["sha256"]:
            return f"{rel} has changed since it was saved (sha256 differs)"
    return ""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def _io_reason(err: BaseException) -> str:
    """The operating system's words for a failed write, wherever in orbax/tensorstore it was raised."""
    while err is not None:
        if isinstance(err, OSError) and err.strerror:
            return f"{err.strerror}" + (f": {err.filename}" if err.filename else "")
        code = re.search(r"os_error_code='?(\d+)", str(err))
        if code:
            written = re.search(r'Failed writing: "([^"]+)"', str(err))
            return os.strerror(int(code.group(1))) + (f": {written.group(1)}" if written else "")
        err = err.__cause__ or err.__context__
    return ""


class _OrbaxFailures(logging.Filter):
    """Keeps orbax's own error reports off the console: a failed write is logged with a traceback by
    each of its threads (hundreds of lines for one full disk). Checkpointer reports the failure itself
    in one line; the first suppressed message is kept for it."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        # asyncio reports the abandoned write tasks of a failed async save ("Task exception was never
        # retrieved"); their repr names orbax's coroutine.
        from_orbax = f"{os.sep}orbax{os.sep}" in record.pathname or (
            record.name == "asyncio" and "orbax" in record.getMessage())
        if record.levelno >= logging.ERROR and from_orbax:
            if self.first is None:
                self.first = record.getMessage().splitlines()[0][:300]
            return False
        return True


_orbax_failures = _OrbaxFailures()


def _quiet_unraisable(previous):
    # Tensorstore completes writes that a failed save abandoned on an event loop orbax already closed,
    # and each completion prints "Event loop is closed" as an unraisable exception; so do orbax's
    # abandoned coroutines at exit. Everything else goes to the previous hook.
    def hook(unraisable):
        text = f"{unraisable.exc_value} {unraisable.object!r}"
        if "Event loop is closed" in text or "orbax" in text:
            return
        previous(unraisable)

    hook.memjax = True
    return hook


def _install_quiet_orbax() -> None:
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _orbax_failures not in logger.filters:
            logger.addFilter(_orbax_failures)
    if not getattr(sys.unraisablehook, "memjax", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def directory(workdir: str, checkpoint_dir: str = "") -> str:
    """A run's checkpoint directory: `train.checkpoint_dir` if set (a local path or a gs:// URL shared
    by all hosts), else `<workdir>/checkpoints`. Without `checkpoint_dir`, the run's saved config.json
    (if any) says where it checkpointed."""
    if not checkpoint_dir:
        saved = os.path.join(workdir, "config.json")
        if os.path.exists(saved):
            with open(saved, encoding="utf-8") as f:
                checkpoint_dir = json.load(f).get("train", {}).get("checkpoint_dir", "")
    if checkpoint_dir:
        return checkpoint_dir if "://" in checkpoint_dir else os.path.abspath(checkpoint_dir)
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # A save killed midway leaves only a *.orbax-checkpoint-tmp directory, never a step: remove it.
            cleanup_tmp_directories=not read_only,
        )
        self.directory = directory
        self.async_save = async_save
        self.keep = keep
        self._unrecorded: list[int] = []  # saved steps whose integrity record is not written yet
        self._recorder: threading.Thread | None = None
        self._recorder_error: tuple[int, OSError] | None = None
        self._failed = False
        if not read_only:
            _install_quiet_orbax()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iterator) -> None:
        """Starts saving `step` (asynchronously if so configured); raises CheckpointError, naming the
        directory and the last intact step, if this or the previous save failed."""
        self._finish_saves()
        train = _nonempty({k: v for k, v in state.items() if k != "params"})
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state["params"]),
                    train=ocp.args.StandardSave(train),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                ),
            )
        except Exception as err:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a failed write
            raise self._save_failed(step, err) from None
        self._unrecorded.append(step)
        if not self.async_save:  # complete now: record it while the files are fresh in the page cache
            self._finish_saves()

    def _finish_saves(self, record_now: bool = False) -> None:
        """Waits for the save in flight, then records the integrity of every step now complete: in a
        thread, since hashing reads the checkpoint back (seconds for GBs) and training can go on
        meanwhile; the next save, `wait` and `close` join it (`record_now`), so a step's record is
        never half-written when the next one starts, and GC never deletes a step being hashed."""
        if self._failed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._save_failed(self._unrecorded[-1] if self._unrecorded else None, err) from None
        self._join_recorder()
        steps, self._unrecorded = self._unrecorded, []
        if jax.process_index() != 0 or not steps:
            return
        self._recorder = threading.Thread(target=self._record, args=(steps,), name="memjax_integrity", daemon=True)
        self._recorder.start()
        # Keeping one checkpoint, the save about to start deletes this step once it completes: hash first.
        if record_now or self.keep == 1:
            self._join_recorder()

    def _record(self, steps: list[int]) -> None:
        for step in steps:
            step_dir = epath.Path(self.directory) / str(step)
            if not step_dir.is_dir():  # orbax skipped its finalisation after an error: reported already
                continue
            try:
                write_integrity(step_dir)
            except FileNotFoundError:  # deleted meanwhile (keep_checkpoints): nothing left to record
                continue
            except OSError as err:
                self._recorder_error = (step, err)
                return

    def _join_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.join()
            self._recorder = None
        if self._recorder_error is not None:
            (step, err), self._recorder_error = self._recorder_error, None
            raise self._save_failed(step, err)

    def _save_failed(self, step: int | None, err: BaseException) -> CheckpointError:
        self._failed = True
        reason = _io_reason(err) or _orbax_failures.first or f"{type(err).__name__}: {_first_line(err)}"
        intact = sorted((int(p.name) for p in epath.Path(self.directory).iterdir()
                         if p.name.isdigit() and int(p.name) != step),
                        reverse=True) if epath.Path(self.directory).is_dir() else []
        last = (f"the last intact checkpoint is step {intact[0]} ({epath.Path(self.directory) / str(intact[0])}); "
                "fix that and launch again to resume from it" if intact else
                "no checkpoint of this run is intact yet; fix that and launch again to start over")
        return CheckpointError(f"saving the checkpoint of step {step} under {self.directory} failed ({reason}); {last}")

    def restore(self, step: int, abstract_state: dict, data_iterator) -> dict:
        """The train state at `step`; `data_iterator` is moved to its saved position in place."""
        abstract_train = {k: v for k, v in abstract_state.items() if k != "params"}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                train=ocp.args.StandardRestore(_nonempty(abstract_train)),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return {"params": restored["params"], **_with_empty(abstract_train, restored["train"])}

    def set_aside(self) -> list[str]:
        """Names of the steps earlier launches moved aside as corrupt."""
        root = epath.Path(self.directory)
        return sorted(p.name for p in root.iterdir() if ".corrupt" in p.name) if root.is_dir() else []

    def restore_latest(self, abstract_state: dict, data_iterator, restart: bool = False) -> tuple[dict, int] | None:
        """(state, step) of the newest checkpoint that restores, or None if there is none.

        A step whose files differ from its integrity record is moved aside to `<step>.corrupt` with a
        warning, and the previous one is tried. Any other failure raises CheckpointError and moves
        nothing. If every step was moved aside (now or by an earlier launch), CheckpointError too,
        unless `restart` (train.restart) allows starting over from step 0.
        """
        root = epath.Path(self.directory)
        for step in sorted(self.manager.all_steps(), reverse=True):
            damage = verify_integrity(root / str(step))
            if damage:
                self._move_aside(step, damage)
                continue
            try:
                return self.restore(step, abstract_state, data_iterator), step
            except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds
                proof = ("passed its integrity check" if damage == "" else
                         f"has no {INTEGRITY_FILE} (saved by an older memjax, or its process was killed first)")
                raise CheckpointError(
                    f"checkpoint at step {step} under {self.directory} {proof} but does not restore into this "
                    f"run's train state ({type(err).__name__}: {_first_line(err)}); nothing was moved or changed: "
                    "launch with the config that wrote it, or move the step directory aside yourself if it "
                    "is damaged") from None
        aside = self.set_aside()
        if aside and not restart:
            raise CheckpointError(
                f"every checkpoint under {self.directory} was proven corrupt and set aside ({', '.join(aside)}); "
                "set train.restart=true to train from step 0 in this workdir, or use another --workdir")
        if aside:
            log.warning("train.restart: every checkpoint under %s is set aside as corrupt; starting from step 0",
                        self.directory)
        return None

    def _move_aside(self, step: int, damage: str) -> None:
        root = epath.Path(self.directory)
        aside = root / f"{step}.corrupt"
        n = 1
        while aside.exists():  # an earlier set-aside of the same step is never overwritten
            aside, n = root / f"{step}.corrupt-{n}", n + 1
        if jax.process_index() == 0:
            (root / str(step)).rename(aside)
        multihost.sync_global_processes(f"memjax_set_aside_{step}")
        self.manager.reload()  # forget the step, so training can save it again
        log.warning("checkpoint at step %d is corrupt (%s); moved it to %s and trying the previous one",
                    step, damage, aside)

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
        return restored["params"]

    def wait(self) -> None:
        self._finish_saves(record_now=True)

    def close(self) -> None:
        try:
            if not self._failed:
                self._finish_saves(record_now=True)
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - a failed save was already reported; do not report it twice
                if not self._failed:
                    raise


def load_params(workdir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
    """Parameters of another run (latest checkpoint unless `step`), for sampling and `init_from`."""
    ckpt = Checkpointer(directory(workdir), keep=0, async_save=False, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory(workdir)}")
    params = ckpt.restore_params(step, abstract_params)
    ckpt.close()
    return params, step


def abstract_like(tree) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


# orbax refuses zero-size arrays, and a carried memory can hold some (e.g. an Omega-window history of
# c - 1 = 0 tokens). They carry no information: saved as one-element placeholders, rebuilt on restore.
def _nonempty(tree):
    def placeholder(x):
        if x.size:
            return x
        sharding = getattr(x, "sharding", None)
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) if isinstance(
            sharding, jax.sharding.NamedSharding) else None
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((1,), x.dtype, sharding=replicated)
        return jnp.zeros((1,), x.dtype, device=replicated)

    return jax.tree_util.tree_map(placeholder, tree)


def _with_empty(abstract_tree, restored):
    return jax.tree_util.tree_map(lambda a, x: x if a.size else jnp.zeros(a.shape, a.dtype, device=a.sharding),
                                  abstract_tree, restored)
