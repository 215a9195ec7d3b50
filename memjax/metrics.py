"""Metrics to tensorboard event files and to `<workdir>/metrics.jsonl` (one JSON object per line)."""

from __future__ import annotations

import json
import os

import jax
from tensorboardX import SummaryWriter

from memjax.reliability import write_atomically


class MetricsWriter:
    """Writes on process 0 only, so a multi-host run has one copy of each metric."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            self.tensorboard = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            self.tensorboard.close()
            self.jsonl.close()


def keep_steps_up_to(workdir: str, step: int) -> None:
    """Drops the records of steps after `step` from metrics.jsonl (rewritten atomically), so a resume
    from the checkpoint at `step` logs each step once: the dropped ones were trained after the last
    checkpoint by a run that died, and are trained again. A line torn by a kill is dropped too."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept, dropped = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                keep = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            dropped |= not keep
    if dropped:
        write_atomically(path, "".join(kept))


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
