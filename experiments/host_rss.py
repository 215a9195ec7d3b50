"""Host memory over a long run: trains a tiny config for 2000 steps in a subprocess and samples its RSS.

    python experiments/host_rss.py [--steps 2000] [-- --config.train.checkpoint_every=0 ...]

Prints RSS at each logged step and the growth from step 500 (after the first evaluations and checkpoints have
compiled and started their threads) to the last step; writes
experiments/results/host_rss/rss.csv. Flat RSS means no per-step host leak (data pipeline, metrics,
checkpointing: evaluation and checkpoints run every 250 steps so their cost is included).
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = [
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
    "--config.train.seq_len=32", "--config.train.batch_size=4", "--config.train.log_every=50",
    "--config.train.eval_every=250", "--config.train.eval_batches=2", "--config.train.checkpoint_every=250",
    "--config.optim.warmup_steps=10", "--config.train.progress_bar=False",
]


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        return None
    return None


def last_step(metrics: pathlib.Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("overrides", nargs="*", help="extra --config.x=y flags, after --")
    args = parser.parse_args()
    out_dir = ROOT / "experiments" / "results" / "host_rss"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "memjax.train", "--config", str(ROOT / "configs" / "quickstart.py"),
               "--workdir", workdir, f"--config.train.steps={args.steps}", *OVERRIDES, *args.overrides]
        proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        metrics = pathlib.Path(workdir) / "metrics.jsonl"
        samples, seen = [], 0
        while proc.poll() is None:
            step, rss = last_step(metrics), rss_mib(proc.pid)
            if rss is not None and step > seen:
                samples.append((step, rss))
                seen = step
            time.sleep(0.05)
        if proc.returncode != 0:
            sys.exit(f"training failed:\n{proc.stderr.read()[-3000:]}")
    with open(out_dir / "rss.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("step", "rss_mib"), *samples])
    for step, rss in samples[:: max(len(samples) // 10, 1)]:
        print(f"step {step:>6}  RSS {rss:8.1f} MiB")
    base = next((rss for step, rss in samples if step >= 500), samples[0][1])
    final_step, final = samples[-1]
    print(f"RSS at step >= 500: {base:.1f} MiB; at step {final_step}: {final:.1f} MiB; "
          f"growth {final - base:+.1f} MiB ({(final - base) / max(final_step - 500, 1) * 1024:+.2f} KiB/step)")


if __name__ == "__main__":
    main()
