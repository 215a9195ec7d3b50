"""Closed-book fact recall: a fixed world of facts that a model must store in its parameters.

The world (drawn from `world_seed`, the same for the training and the evaluation examples) maps
`num_facts` distinct subjects, each `subject_tokens` tokens from [1, V/2), to one attribute token
from [V/2, V). A row of T + 1 tokens is facts drawn uniformly from the world, one after another:
  s1_1 .. s1_S a1 s2_1 .. s2_S a2 ...
padded at the end with noise tokens. The target at each subject's last token is its attribute, and
only those targets are scored: with thousands of facts and a few per row, a fact almost never comes
twice in one row, so in-context recall cannot answer and the attribute must come from memory (the
setting in which memory layers at scale are compared with dense FFNs of equal active FLOPs).
Metric: per-fact accuracy (metrics.mqar_accuracy).
"""

from __future__ import annotations

import numpy as np

from memjax.tasks.base import TaskSource


class Facts(TaskSource):
    name = "facts"

    def __init__(self, seq_len: int = 64, *, vocab_size: int = 256, num_facts: int = 1024, subject_tokens: int = 2,
                 world_seed: int = 0, seed: int = 0, num_examples: int = 1_000_000):
        super().__init__(seq_len, seed, num_examples)
        for field, value, low in (("vocab_size", vocab_size, 4), ("num_facts", num_facts, 1),
                                  ("subject_tokens", subject_tokens, 1), ("world_seed", world_seed, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
        keys = self.subject_keys(vocab_size)
        if num_facts > keys**subject_tokens:
            raise ValueError(f"num_facts={num_facts} needs more distinct subjects than {subject_tokens} token(s) "
                             f"from {keys} keys give ({keys ** subject_tokens}): raise subject_tokens or vocab_size")
        self.fact_len = subject_tokens + 1
        if seq_len + 1 < self.fact_len:
            raise ValueError(f"seq_len={seq_len} is too short for one fact of {self.fact_len} tokens")
        self.vocab_size, self.num_facts, self.subject_tokens = int(vocab_size), int(num_facts), int(subject_tokens)
        self.world_seed = int(world_seed)
        world = np.random.default_rng([self.world_seed, 0x66616374])  # independent of the example seeds
        codes = world.choice(keys**subject_tokens, self.num_facts, replace=False)
        digits = (codes[:, None] // keys ** np.arange(subject_tokens - 1, -1, -1)[None, :]) % keys
        self.subjects = (1 + digits).astype(np.int64)  # [F, S], distinct rows
        self.attributes = world.integers(vocab_size // 2, vocab_size, self.num_facts)  # [F]
        self.facts_per_row = (self.seq_len + 1) // self.fact_len

    @staticmethod
    def subject_keys(vocab_size: int) -> int:
        """Ids a subject token is drawn from: [1, V/2) (0 stays free; the upper half are attributes)."""
        return vocab_size // 2 - 1

    @classmethod
    def fewest_subject_tokens(cls, num_facts: int, vocab_size: int = 256) -> int:
        """The fewest subject tokens that name `num_facts` distinct subjects."""
        keys, tokens = cls.subject_keys(vocab_size), 1
        while keys**tokens < num_facts:
            tokens += 1
        return tokens

    def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        chosen = rng.integers(0, self.num_facts, self.facts_per_row)
        facts = np.concatenate([self.subjects[chosen], self.attributes[chosen, None]], axis=1)  # [n, S + 1]
        row = rng.integers(0, self.vocab_size, self.seq_len + 1)  # the tail after the last whole fact: noise
        row[: facts.size] = facts.reshape(-1)
        weights = np.zeros(self.seq_len, np.float32)
        weights[np.arange(self.facts_per_row) * self.fact_len + self.subject_tokens - 1] = 1.0
        return {"inputs": row[:-1].astype(np.int32), "targets": row[1:].astype(np.int32), "weights": weights}
