"""Fault injection: kills, signals, corrupt checkpoints, non-finite values, locked and mismatched workdirs."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from memjax import checkpoint, reliability, trainer
from memjax.checkpoint import CheckpointError, verify_integrity
from memjax.config import ConfigError
from memjax.metrics import read_jsonl
from memjax.models import factory
from memjax.reliability import NonFiniteError, WorkdirLock
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
BASE = {"train.steps": STEPS, "train.log_every": 1, "train.eval_every": 1000, "train.eval_batches": 0}


def params_of(workdir, cfg):
    return checkpoint.load_params(str(workdir), factory.abstract(cfg.model, 264)[1])


def assert_same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(**BASE)
    trainer.train(cfg, str(workdir))
    return params_of(workdir, cfg)[0]


def cli(workdir, *extra, config="tests/helpers.py", **overrides):
    """`python -m memjax.train` on the tiny config (tests/helpers.py's get_config), as an argument list."""
    flags = [f"--config.{k}={v}" for k, v in {**BASE, **overrides}.items()]
    return [sys.executable, "-m", "memjax.train", "--config", config, "--workdir", str(workdir), *flags, *extra]


def launch(workdir, *extra, file_size_limit=0, **overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = cli(workdir, *extra, **overrides)
    if file_size_limit:
        # Writes past the limit fail with EFBIG, as they would on a full disk (SIGXFSZ, ignored here,
        # would kill the process instead). Set in a small launcher, not preexec_fn: that forks a
        # multithreaded process.
        command = [sys.executable, "-c", "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, "
                   f"signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, ({file_size_limit},) * 2); "
                   "os.execv(sys.executable, sys.argv[1:])", *command]
    return subprocess.Popen(command, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(workdir, *extra, **overrides) -> tuple[int, list[str]]:
    """(exit status, output lines) of a command-line run to its end."""
    proc = launch(workdir, *extra, **overrides)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, (out + err).strip().splitlines()


def logged_step(workdir) -> int:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in lines), default=0)


def wait_for_step(proc, workdir, step, timeout=120):
    deadline = time.time() + timeout
    while logged_step(workdir) < step:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "training did not reach the step in time"
        time.sleep(0.02)


def test_kill_9_at_random_steps_and_during_saves_then_resume_equals_uninterrupted(straight, tmp_path):
    rng = np.random.default_rng(0)
    kill_steps = sorted(rng.choice(np.arange(3, STEPS - 2), size=2, replace=False).tolist())
    # Async checkpoints every step: most kills land while a save is in flight.
    overrides = {"train.checkpoint_every": 1, "train.async_checkpoint": True, "train.keep_checkpoints": 2}
    for step in kill_steps:
        proc = launch(tmp_path, **overrides)
        wait_for_step(proc, tmp_path, step)
        proc.kill()
        proc.wait()
    proc = launch(tmp_path, **overrides)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    params, step = params_of(tmp_path, tiny_config(**BASE))
    assert step == STEPS
    assert_same_params(params, straight)
    # Steps logged after the last checkpoint by a killed run were trained again; each is logged once.
    assert [r["step"] for r in read_jsonl(str(tmp_path / "metrics.jsonl"))] == list(range(1, STEPS + 1))


def test_sigterm_saves_and_exits_cleanly_and_the_next_launch_resumes(straight, tmp_path):
    proc = launch(tmp_path, **{"train.checkpoint_every": 0})
    wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "stopped by SIGTERM" in err
    saved = checkpoint.Checkpointer(checkpoint.directory(str(tmp_path)), keep=0, async_save=False,
                                    read_only=True).latest_step()
    assert saved is not None and 5 <= saved < STEPS
    trainer.train(tiny_config(**BASE), str(tmp_path))
    assert_same_params(params_of(tmp_path, tiny_config(**BASE))[0], straight)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, damage, caplog):
    cfg = tiny_config(**BASE, **{"train.checkpoint_every": 8, "train.stop_at_step": 16})
    trainer.train(cfg, str(tmp_path))
    files = sorted(p for p in (tmp_path / "checkpoints" / "16" / "params").rglob("*")
                   if p.is_file() and p.stat().st_size > 100)
    target = max(files, key=lambda p: p.stat().st_size)
    if damage == "delete":
        target.unlink()
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    else:  # one bit of a stored parameter: orbax itself restores it without complaint
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    caplog.set_level("WARNING", logger="memjax")
    trainer.train(tiny_config(**BASE, **{"train.checkpoint_every": 8}), str(tmp_path))
    assert "checkpoint at step 16 is corrupt" in caplog.text
    assert (tmp_path / "checkpoints" / "16.corrupt").is_dir()
    assert_same_params(params_of(tmp_path, tiny_config(**BASE))[0], straight)


def test_nan_under_halt_stops_naming_the_step_and_never_checkpoints_it(tmp_path):
    cfg = tiny_config(**BASE, **{"train.inject_nan_at_step": 7, "train.checkpoint_every": 5})
    with pytest.raises(NonFiniteError, match=r"non-finite learning/loss at step 7"):
        trainer.train(cfg, str(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5]


def test_nan_under_skip_skips_the_update_and_counts_it(tmp_path):
    cfg = tiny_config(**{**BASE, "train.inject_nan_at_step": 7, "train.nonfinite": "skip", "train.steps": 10})
    result = trainer.train(cfg, str(tmp_path))
    assert result["learning/skipped_steps"] == 1
    params, _ = params_of(tmp_path, cfg)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
    cfg_limit = tiny_config(**{**BASE, "train.inject_nan_at_step": 3, "train.nonfinite": "skip",
                               "train.max_skipped_steps": 0, "train.steps": 10})
    with pytest.raises(NonFiniteError, match=r"1 steps skipped .* more than train.max_skipped_steps=0"):
        trainer.train(cfg_limit, str(tmp_path / "limit"))


def test_a_workdir_in_use_is_refused_before_anything_else(tmp_path):
    lock = WorkdirLock(str(tmp_path))
    try:
        # Data that cannot be read: the lock is reported first, so it comes before the (slow) setup.
        bad_data = {"data.source": "text", "data.paths": "/nonexistent-memjax-dir/*.txt"}
        with pytest.raises(ConfigError, match=rf"workdir {tmp_path} is in use by another run \(pid {os.getpid()}\)"):
            trainer.train(tiny_config(**BASE, **bad_data), str(tmp_path))
    finally:
        lock.release()


def test_resuming_with_another_model_or_tokenizer_is_refused(tmp_path):
    trainer.train(tiny_config(**{**BASE, "train.steps": 2, "optim.warmup_steps": 1}), str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=r"config\.model\.d_model: the checkpoints in .* have 32, this config 64"):
        trainer.train(tiny_config(**BASE, **{"model.d_model": 64}), str(tmp_path))
    with pytest.raises(ConfigError, match=r"config\.data\.tokenizer: the checkpoints in .* were trained with 'byte'"):
        trainer.train(tiny_config(**BASE, **{"data.tokenizer": "bpe"}), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.source": "text", "data.paths": "/nonexistent-memjax-dir/*.txt"}, r"/nonexistent-memjax-dir/\*\.txt"),
        ({"train.eval_batches": 2, "data.val_fraction": 1e-9}, r"validation"),
    ],
)
def test_bad_data_fails_before_the_workdir_is_touched(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        trainer.train(tiny_config(**{**BASE, **overrides}), str(workdir))
    assert not workdir.exists()


def checkpoint_tree(workdir) -> dict[str, bytes]:
    """Every file of the run's checkpoints and its config.json, by path: what must survive a refusal."""
    paths = [p for p in (workdir / "checkpoints").rglob("*") if p.is_file()] + [workdir / "config.json"]
    return {str(p.relative_to(workdir)): p.read_bytes() for p in paths}


def test_resume_with_a_changed_optimizer_structure_is_refused_and_the_original_config_resumes(straight, tmp_path):
    trainer.train(tiny_config(**BASE, **{"train.checkpoint_every": 8, "train.stop_at_step": 16}), str(tmp_path))
    before = checkpoint_tree(tmp_path)
    # clip_norm=0 drops the clipping transform's state from the optimizer state's tree.
    status, lines = run_cli(tmp_path, **{"train.checkpoint_every": 8, "optim.clip_norm": 0.0})
    assert status != 0 and len(lines) <= 5, lines
    assert lines[-1].startswith("error: config.optim.clip_norm: the checkpoints in") and "train.init_from" in lines[-1]
    assert checkpoint_tree(tmp_path) == before  # nothing renamed, nothing rewritten
    assert all(verify_integrity(pathlib.Path(tmp_path, "checkpoints", step)) == "" for step in ("8", "16"))
    # What may change on a resume does not trip the check (setup alone: nothing is trained here) ...
    trainer.setup(tiny_config(**{**BASE, "train.steps": 40, "optim.lr": 0.05, "train.eval_every": 3,
                                 "optim.schedule": "linear", "optim.warmup_steps": 2}), str(tmp_path))
    # ... and the original config, with other cadences, resumes into the uninterrupted run's parameters.
    trainer.train(tiny_config(**BASE, **{"train.checkpoint_every": 5, "train.keep_checkpoints": 0}), str(tmp_path))
    assert_same_params(params_of(tmp_path, tiny_config(**BASE))[0], straight)


def test_a_run_saved_by_an_older_memjax_resumes_after_settings_were_added(straight, tmp_path):
    """A later memjax adds blocks (new config sections) and options whose defaults keep the old behaviour;
    the run's saved settings lack them, which is no change: it resumes; so do changed defaults of blocks
    the run does not use. A saved setting of the run's own blocks that differs still refuses."""
    trainer.train(tiny_config(**BASE, **{"train.checkpoint_every": 8, "train.stop_at_step": 8}), str(tmp_path))
    for name in ("run.json", "config.json"):
        path = tmp_path / name
        saved = json.loads(path.read_text())
        model = saved["model"]
        del model["titans_mag"], model["titans_lmm"]["chunk"]  # as if written before they existed
        model["atlas"]["ns_form"] = "old default"  # a block this run never used: its defaults may change
        path.write_text(json.dumps(saved))
    trainer.train(tiny_config(**BASE, **{"train.checkpoint_every": 8}), str(tmp_path))
    assert_same_params(params_of(tmp_path, tiny_config(**BASE))[0], straight)
    # As if the run had used swa blocks: their settings now count, the unused atlas section's still do not.
    for name in ("run.json", "config.json"):
        path = tmp_path / name
        saved = json.loads(path.read_text())
        saved["model"]["block_pattern"] = "swa"
        path.write_text(json.dumps(saved))
    swa = {**BASE, "model.block_pattern": "swa"}
    reliability.check_resume_config(str(tmp_path), tiny_config(**swa))
    with pytest.raises(ConfigError, match=r"^config\.model\.swa\.window: the checkpoints in"):
        reliability.check_resume_config(str(tmp_path), tiny_config(**swa, **{"model.swa.window": 5}))


def test_a_workdir_whose_checkpoints_are_all_corrupt_starts_over_only_when_told(straight, tmp_path):
    cfg = tiny_config(**BASE, **{"train.checkpoint_every": 4, "train.stop_at_step": 4})
    trainer.train(cfg, str(tmp_path))
    step_dir = tmp_path / "checkpoints" / "4"
    record = step_dir / checkpoint.INTEGRITY_FILE
    saved_record = record.read_bytes()
    blob = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    blob.write_bytes(blob.read_bytes()[:100])
    # Without its integrity record nothing proves the damage: the run stops and moves nothing.
    record.unlink()
    with pytest.raises(CheckpointError, match=r"step 4 .* has no memjax_integrity\.json .* nothing was moved"):
        trainer.train(tiny_config(**BASE), str(tmp_path))
    assert step_dir.is_dir()
    # With it, the damage is proven: moved aside, and no silent fresh start, now or at the next launch.
    record.write_bytes(saved_record)
    for _ in range(2):
        with pytest.raises(CheckpointError, match=r"every checkpoint under .* set aside \(4\.corrupt\); set "
                                                  r"train\.restart=true"):
            trainer.train(tiny_config(**BASE), str(tmp_path))
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir() and not step_dir.exists()
    trainer.train(tiny_config(**BASE, **{"train.restart": True}), str(tmp_path))
    assert_same_params(params_of(tmp_path, tiny_config(**BASE))[0], straight)
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir()  # kept, for whoever wants to look at it


def test_a_failed_save_is_one_line_naming_the_directory_and_the_last_intact_step(tmp_path):
    trainer.train(tiny_config(**BASE, **{"train.checkpoint_every": 8, "train.stop_at_step": 8}), str(tmp_path))
    # 60 kB: the checkpoint's blobs are larger, the metrics and event files smaller.
    proc = launch(tmp_path, file_size_limit=60_000, **{"train.checkpoint_every": 8, "train.async_checkpoint": True})
    out, err = proc.communicate(timeout=300)
    lines = (out + err).strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in out + err and len(lines) <= 5, lines
    directory = tmp_path / "checkpoints"
    assert lines[-1].startswith(f"error: saving the checkpoint of step 16 under {directory} failed (File too large")
    assert f"the last intact checkpoint is step 8 ({directory / '8'})" in lines[-1]
    assert verify_integrity(directory / "8") == ""


def test_warmup_longer_than_the_run_is_clamped_with_one_warning(tmp_path):
    status, lines = run_cli(tmp_path, **{"train.steps": 2, "optim.warmup_steps": 100})
    assert status == 0, lines
    assert sum("optim.warmup_steps=100 exceeds train.steps=2" in line for line in lines) == 1, lines


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.train.stepz=5"], "error: config.train.stepz: unknown key (did you mean 'steps'?)"),
        (["--config.no_such_knob=3"], "error: config.no_such_knob: unknown key"),
        (["--config.optim.groups.nope.lr_mult=2"],
         "error: config.optim.groups.nope.lr_mult: the config file defines no 'nope'"),
        (["--config.model.num_layers=1", "--config.model.block_pattern=attention,atention"],
         "error: config.model.block_pattern: unknown block 'atention' (did you mean 'attention'?)"),
        ("missing config", "error: --config: no such file: configs/no_such_config.py"),
        ("workdir is a file", "error: --workdir {workdir} is a file, not a directory"),
        ("bad JSONL line", "error: {data}:40: invalid JSON"),
    ],
)
def test_every_bad_input_is_one_line(tmp_path, args, message):
    workdir, data = tmp_path / "run", tmp_path / "docs.jsonl"
    config = "tests/helpers.py"
    if args == "missing config":
        args, config = [], "configs/no_such_config.py"
    elif args == "workdir is a file":
        args = []
        workdir.write_text("not a directory")
    elif args == "bad JSONL line":
        data.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(39)) + "{broken\n")
        args = ["--config.data.source=jsonl", f"--config.data.paths={data}"]
    status, lines = run_cli(workdir, *args, config=config)
    assert status != 0 and len(lines) == 1, lines
    assert lines[0].startswith(message.format(workdir=workdir, data=data)), lines
    assert workdir.is_file() if config == "tests/helpers.py" and not args else not workdir.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_workdir_is_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir.chmod(0o555)
    status, lines = run_cli(workdir)
    assert status != 0 and lines == [f"error: --workdir {workdir} is not writable; "
                                     "use another --workdir or fix its permissions"]
