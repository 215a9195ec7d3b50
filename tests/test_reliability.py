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

from memjax import checkpoint, trainer
from memjax.config import ConfigError
from memjax.models import lm
from memjax.reliability import NonFiniteError, WorkdirLock
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
BASE = {"train.steps": STEPS, "train.log_every": 1, "train.eval_every": 1000, "train.eval_batches": 0}


def params_of(workdir, cfg):
    return checkpoint.load_params(str(workdir), lm.abstract(cfg.model, 264)[1])


def assert_same_params(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    cfg = tiny_config(**BASE)
    trainer.train(cfg, str(workdir))
    return params_of(workdir, cfg)[0]


def cli(workdir, **overrides):
    """The train command line for the tiny config, as a subprocess argument list."""
    flags = {**BASE, **{k: v for k, v in overrides.items()}}
    script = (
        "import sys; from tests.helpers import tiny_config; from memjax import trainer; "
        f"trainer.train(tiny_config(**{flags!r}), sys.argv[1])"
    )
    return [sys.executable, "-c", script, str(workdir)]


def launch(workdir, **overrides):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cli(workdir, **overrides), cwd=str(ROOT), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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


def test_sigterm_saves_and_exits_cleanly_and_the_next_launch_resumes(straight, tmp_path):
    proc = launch(tmp_path, **{"train.checkpoint_every": 0})
    wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in err and "stopped by SIGTERM" in err
    saved = checkpoint.Checkpointer(checkpoint.directory(str(tmp_path)), keep=0, async_save=False, read_only=True).latest_step()
    assert saved is not None and 5 <= saved < STEPS
    trainer.train(tiny_config(**BASE), str(tmp_path))
    assert_same_params(params_of(tmp_path, tiny_config(**BASE))[0], straight)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(straight, tmp_path, damage, caplog):
    cfg = tiny_config(**BASE, **{"train.checkpoint_every": 8, "train.stop_at_step": 16})
    trainer.train(cfg, str(tmp_path))
    files = sorted(p for p in (tmp_path / "checkpoints" / "16" / "params").rglob("*") if p.is_file() and p.stat().st_size > 100)
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


def test_a_workdir_in_use_is_refused(tmp_path):
    lock = WorkdirLock(str(tmp_path))
    try:
        with pytest.raises(ConfigError, match=rf"workdir {tmp_path} is in use by another run \(pid {os.getpid()}\)"):
            trainer.train(tiny_config(**BASE), str(tmp_path))
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
