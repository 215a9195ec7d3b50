"""Generated memory tasks (MQAR, closed-book fact recall, S-NIAH, BABILong-style bAbI QA) as seeded grain sources,
with metrics.

    task = make_task("niah_single", seq_len=4096, haystack="text", seed=1)
    batches = make_task_iterator(task, batch_size=8)     # dicts of [8, ...] numpy arrays

Example conventions are in base.py (inputs/targets/weights) and layout.py (prompt_len/answer_ids of the
prompt-and-answer tasks); the metric of each task is in metrics.py:
  mqar, facts     metrics.mqar_accuracy(logits, targets, weights)
  niah_*          metrics.teacher_forced_exact_match(logits, targets, weights) (one forward pass), or
                  metrics.exact_match(greedy_ids, answer_ids) after decoding from inputs[:prompt_len]
  babi_qa*        for each label k: layout.with_answer(batch, label_ids[:, k], pad_id) -> forward ->
                  metrics.sequence_logprob -> scores[:, k]; then metrics.label_set_accuracy(scores, label_index)
"""

from __future__ import annotations

import functools

import grain

from memjax.tasks.babi import BabiQA
from memjax.tasks.base import ANSWER_PAD, IGNORE_INDEX, TaskSource, ignore_index_labels
from memjax.tasks.facts import Facts
from memjax.tasks.layout import with_answer
from memjax.tasks.mqar import MQAR
from memjax.tasks.niah import NIAH

TASKS = {
    "mqar": MQAR,
    "facts": Facts,
    "niah_single": functools.partial(NIAH, variant="single"),
    "niah_multikey": functools.partial(NIAH, variant="multikey"),
    "niah_multivalue": functools.partial(NIAH, variant="multivalue"),
    **{f"babi_{qa}": functools.partial(BabiQA, task=qa) for qa in ("qa1", "qa2", "qa3", "qa6", "qa7")},
}


def make_task(name: str, seq_len: int, **options) -> TaskSource:
    """The task `name` of TASKS at `seq_len`; options are its constructor's keyword arguments."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    try:
        return TASKS[name](seq_len, **options)
    except TypeError as err:  # an unknown option: name it rather than show a bare signature error
        raise ValueError(f"task {name!r}: {err}") from None


def make_task_iterator(task: TaskSource, *, batch_size: int, seed: int = 0, shuffle: bool = False,
                       repeat: bool = False, shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
    """Batches (dicts of [batch_size, ...] numpy arrays) of `task`'s examples, this process's shard.

    Examples are generated on access, so the order is the only thing `seed` (with shuffle) changes;
    use different task seeds for training and evaluation. A final partial batch is dropped. The
    iterator's get_state()/set_state() resume the exact stream.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    examples = grain.MapDataset.source(task)[shard_index::shard_count]
    if shuffle:
        examples = examples.shuffle(seed=seed % 2**32)
    if repeat:
        examples = examples.repeat()
    return iter(examples.batch(batch_size, drop_remainder=True))


__all__ = [
    "ANSWER_PAD", "IGNORE_INDEX", "TASKS", "BabiQA", "Facts", "MQAR", "NIAH", "TaskSource", "ignore_index_labels",
    "make_task", "make_task_iterator", "with_answer",
]
