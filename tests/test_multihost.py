"""A real multi-process run on one machine: two processes of four CPU devices each, joined by
jax.distributed (gloo collectives), train one model on an 8-device mesh from per-process data shards,
write one set of logs and one checkpoint together, and resume from it together."""

import json
import os
import socket
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent("""
    import json, logging, os, sys
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("memjax").setLevel(logging.INFO)
    process_id, port, workdir, steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    from tests.helpers import tiny_config
    from memjax import trainer
    cfg = tiny_config(**{"train.batch_size": 8, "train.steps": steps, "train.log_every": 2,
                         "train.eval_every": 4, "train.checkpoint_every": 4, "optim.warmup_steps": 2,
                         "mesh.num_devices": 0})
    out = trainer.train(cfg, workdir)
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": jax.device_count(), "metrics": out}))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir: str, steps: int) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, workdir, str(steps)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
        results[-1]["log"] = out
    return results


def test_two_processes_train_checkpoint_and_resume_together(tmp_path):
    workdir = str(tmp_path / "run")
    first = launch(workdir, steps=4)
    assert [r["process"] for r in first] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 8 for r in first)
    # One global batch and one set of parameters: both processes see the same loss and evaluation.
    learning = [{k: v for k, v in r["metrics"].items() if not k.startswith("perf/")} for r in first]
    assert learning[0] == learning[1] and "eval/loss" in learning[0]
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        steps_logged = [json.loads(line)["step"] for line in f]
    assert steps_logged.count(2) == 1, "only process 0 writes metrics"
    assert os.path.exists(os.path.join(workdir, "checkpoints", "4", "commit_success.txt")) or os.path.isdir(
        os.path.join(workdir, "checkpoints", "4", "params"))

    second = launch(workdir, steps=8)
    assert "resumed from" in second[0]["log"] and "at step 4" in second[0]["log"]
    assert second[0]["metrics"]["eval/loss"] == second[1]["metrics"]["eval/loss"]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]
