"""What every generated task shares: a grain random-access source of seeded, fixed-length examples.

Conventions of every example (a dict of numpy arrays; seq_len = T):
  inputs   int32   [T]  token ids
  targets  int32   [T]  next-token ids: targets[t] = the token after inputs[t]; valid ids everywhere,
                        so the plain mean cross-entropy of the trainer can train on a task as-is
  weights  float32 [T]  1 where a target is scored (an answer token), 0 elsewhere; the masked loss is
                        sum(w * nll) / sum(w), and Zoology's ignore-index form of the labels is
                        `np.where(weights > 0, targets, IGNORE_INDEX)`
Example i of a task depends only on (seed, i): `np.random.default_rng([seed, i])` draws it.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100  # Zoology's label for positions that are not scored
ANSWER_PAD = -1  # pads answer_ids / label_ids up to the answer slot


class TaskSource:
    """Base of the task sources: `len`, index checking and the per-example generator."""

    name = "task"

    def __init__(self, seq_len: int, seed: int, num_examples: int):
        for field, value in (("seq_len", seq_len), ("num_examples", num_examples)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seq_len, self.seed, self.num_examples = int(seq_len), int(seed), int(num_examples)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"{self.name}: index {index} is outside [0, {self.num_examples})")
        return self.example(np.random.default_rng([self.seed, index]))

    def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, seq_len={self.seq_len}, seed={self.seed})"


def ignore_index_labels(targets, weights) -> np.ndarray:
    """Zoology's label form: the target where scored, IGNORE_INDEX elsewhere."""
    return np.where(np.asarray(weights) > 0, np.asarray(targets), IGNORE_INDEX).astype(np.int32)
