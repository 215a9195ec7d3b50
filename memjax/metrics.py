"""Metrics to tensorboard event files and to `<workdir>/metrics.jsonl` (one JSON object per line)."""

from __future__ import annotations

import json
import os

import jax
from tensorboardX import SummaryWriter


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


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
