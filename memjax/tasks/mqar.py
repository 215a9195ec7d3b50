"""MQAR, multi-query associative recall (Zoology's recipe).

Vocabulary [0, V): keys come from [1, V/2), values from [V/2, V). A row of T + 1 tokens is
  k1 v1 k2 v2 ... kN vN | query region
where in the query region every key comes back once, at offset 2 * gap, with gaps drawn without
replacement from p(gap = i - 1) ~ a * i^(a - 1), i = 1 .. (T + 1 - 2N) // 2 (a power law that favours
short gaps; a = 0.01 as in Zoology), and every other query-region token is uniform noise from [0, V).
Inputs are the first T tokens and targets the last T; the target at each query is its value, and only
those N targets are scored (weights). One difference from Zoology's code, for LM-style targets: the
token after a query is its value (targets are inputs shifted by one everywhere), where Zoology leaves
noise there and keeps the label in a separate array.
"""

from __future__ import annotations

import numpy as np

from memjax.tasks.base import TaskSource


class MQAR(TaskSource):
    name = "mqar"

    def __init__(self, seq_len: int = 64, *, vocab_size: int = 256, num_kv_pairs: int = 8, power_a: float = 0.01,
                 random_non_queries: bool = True, seed: int = 0, num_examples: int = 1_000_000):
        super().__init__(seq_len, seed, num_examples)
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 4:
            raise ValueError(f"vocab_size must be an integer >= 4, got {vocab_size!r}")
        if not isinstance(num_kv_pairs, (int, np.integer)) or num_kv_pairs <= 0:
            raise ValueError(f"num_kv_pairs must be a positive integer, got {num_kv_pairs!r}")
        if num_kv_pairs > vocab_size // 2 - 1:
            raise ValueError(f"num_kv_pairs={num_kv_pairs} needs more distinct keys than vocab_size={vocab_size} "
                             f"gives ({vocab_size // 2 - 1} keys in [1, {vocab_size // 2}))")
        # The query region must hold one key-value slot per pair: T + 1 - 2N >= 2N.
        if seq_len + 1 < 4 * num_kv_pairs:
            raise ValueError(f"seq_len={seq_len} is too short for num_kv_pairs={num_kv_pairs}: "
                             f"need seq_len >= {4 * num_kv_pairs - 1} (kv pairs plus one query slot per key)")
        if not power_a > 0:
            raise ValueError(f"power_a must be positive, got {power_a!r}")
        self.vocab_size, self.num_kv_pairs, self.power_a = int(vocab_size), int(num_kv_pairs), float(power_a)
        self.random_non_queries = bool(random_non_queries)
        self.context_len = 2 * self.num_kv_pairs
        slots = (self.seq_len + 1 - self.context_len) // 2
        ranks = np.arange(1, slots + 1, dtype=np.float64)
        gap_p = self.power_a * ranks ** (self.power_a - 1)
        self.gap_p = gap_p / gap_p.sum()

    def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        half = self.vocab_size // 2
        keys = rng.choice(np.arange(1, half), self.num_kv_pairs, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), self.num_kv_pairs, replace=False)
        gaps = rng.choice(len(self.gap_p), self.num_kv_pairs, replace=False, p=self.gap_p)

        row = np.zeros(self.seq_len + 1, np.int64)
        if self.random_non_queries:
            row[:] = rng.integers(0, self.vocab_size, self.seq_len + 1)
        row[0 : self.context_len : 2], row[1 : self.context_len : 2] = keys, values
        query_pos = self.context_len + 2 * gaps
        row[query_pos], row[query_pos + 1] = keys, values

        weights = np.zeros(self.seq_len, np.float32)
        weights[query_pos] = 1.0  # the target at a query position is row[query_pos + 1], its value
        return {"inputs": row[:-1].astype(np.int32), "targets": row[1:].astype(np.int32), "weights": weights}
