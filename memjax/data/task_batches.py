"""Generated tasks (memjax.tasks) as training and evaluation data: `data.source = "task"`.

The config names the task (`data.task`) and its constructor options as one string
(`data.task_options = "num_kv_pairs=8,vocab_size=256"`), so a command-line override and the saved
config.json stay plain strings. Training examples come from task seed `seed`, evaluation ones from
`data.task_eval_seed`: generated examples depend only on (task seed, index), so different seeds are
what keeps evaluation examples out of training.
"""

from __future__ import annotations

import inspect

import grain

from memjax.tasks import TASKS, TaskSource, make_task, make_task_iterator

# What the train step reads; the other fields (answer_ids, label_ids, ...) only serve the task metrics.
MODEL_FIELDS = ("inputs", "targets", "weights")
# Options the framework sets itself, from train.seq_len, the seeds and the run's tokenizer.
RESERVED_OPTIONS = ("seq_len", "seed", "tokenizer")


def _literal(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_task_options(text: str) -> dict:
    """'num_kv_pairs=8,haystack=noise,depth=0.5' -> {'num_kv_pairs': 8, 'haystack': 'noise', 'depth': 0.5}.

    Values are ints, floats, true/false, none, or else strings. Raises ValueError naming the bad item."""
    options: dict = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{item!r} is not key=value")
        if key in options:
            raise ValueError(f"{key!r} is given twice")
        if key in RESERVED_OPTIONS:
            raise ValueError(f"{key!r} is set by the framework (train.seq_len, the seeds, the run's tokenizer)")
        options[key] = _literal(raw.strip())
    return options


def build_task(name: str, seq_len: int, options: dict, *, seed: int, tokenizer=None) -> TaskSource:
    """Task `name` at `seq_len`; text tasks use `tokenizer` (default: theirs, byte-level)."""
    options = dict(options)
    if tokenizer is not None and name in TASKS and "tokenizer" in inspect.signature(TASKS[name]).parameters:
        options["tokenizer"] = tokenizer
    return make_task(name, seq_len, seed=seed, **options)


def task_seed(cfg, split: str) -> int:
    return cfg.seed if split == "train" else cfg.data.task_eval_seed


def config_task(cfg, split: str, tokenizer=None, seq_len: int | None = None) -> TaskSource:
    """The task a run's config trains (split "train") or evaluates on."""
    return build_task(cfg.data.task, seq_len or cfg.train.seq_len, parse_task_options(cfg.data.task_options),
                      seed=task_seed(cfg, split), tokenizer=tokenizer)


class _Fields:
    """A random-access view of a task's examples with only some fields (selected before batching, so
    the batched iterator stays grain's own, with its checkpointable state)."""

    def __init__(self, source, fields):
        self.source, self.fields = source, tuple(fields)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        example = self.source[index]
        return {k: example[k] for k in self.fields}


def make_task_lm_iterator(cfg, tokenizer, split: str, *, batch_size: int, shard_index: int, shard_count: int,
                          shuffle: bool, repeat: bool, fields=MODEL_FIELDS) -> grain.DatasetIterator:
    """Batches of the config's task for `split` (all fields with fields=None)."""
    task = config_task(cfg, split, tokenizer)
    source = task if fields is None else _Fields(task, fields)
    return make_task_iterator(source, batch_size=batch_size, seed=cfg.seed, shuffle=shuffle, repeat=repeat,
                              shard_index=shard_index, shard_count=shard_count)
