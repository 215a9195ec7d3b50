"""A task's metric scored on a model on device: the trainer's task evaluations (`eval/<metric>`),
`python -m memjax.evaluate` and the experiments all use `TaskScorer`. The same metrics in numpy, on
logits already computed: memjax.tasks.metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax import parallel
from memjax.data.task_batches import MODEL_FIELDS
from memjax.tasks import TASKS
from memjax.tasks.layout import with_answer

# Task family (the name's prefix) -> the metric's name as logged (eval/<name>) and written.
METRICS = {"mqar": "mqar_accuracy", "facts": "fact_accuracy", "niah": "exact_match", "babi": "label_accuracy"}


class EvaluationError(ValueError):
    """A request that cannot be scored (unknown task, length too short, no checkpoint); names the cause."""


def metric_name(task_name: str) -> str:
    if task_name not in TASKS:
        raise EvaluationError(f"unknown task {task_name!r}; expected one of {sorted(TASKS)}")
    return METRICS[task_name.split("_")[0]]


class TaskScorer:
    """A task's metric for a model: `counts` gives (correct, scored) for one host batch of the task
    (all its fields, this process's rows); the ratio of the sums over batches is the metric. The
    reductions run on device over global arrays, so every process of a multi-host run gets the totals."""

    def __init__(self, graphdef, task_name: str, mesh, pad_id: int):
        self.metric = metric_name(task_name)
        self.kind, self.mesh, self.pad_id = task_name.split("_")[0], mesh, pad_id

        def logits(params, inputs_BxT):
            return nnx.merge(graphdef, params)(inputs_BxT)[0].astype(jnp.float32)

        def argmax_counts(params, batch):
            hit_BxT = logits(params, batch["inputs"]).argmax(-1) == batch["targets"]
            scored_BxT = batch["weights"] > 0
            if self.kind in ("mqar", "facts"):  # every queried position counts once
                return (hit_BxT & scored_BxT).sum(), scored_BxT.sum()
            # NIAH: greedy decoding reproduces the answer iff every answer position is predicted right.
            row_ok_B = jnp.all(hit_BxT | ~scored_BxT, axis=-1)
            return row_ok_B.sum(), jnp.ones_like(row_ok_B).sum()

        def answer_logprob(params, batch):  # metrics.sequence_logprob, on device
            logp_BxTxV = jax.nn.log_softmax(logits(params, batch["inputs"]), axis=-1)
            target_BxT = jnp.take_along_axis(logp_BxTxV, batch["targets"][..., None], axis=-1)[..., 0]
            return jnp.where(batch["weights"] > 0, target_BxT, 0.0).sum(-1)

        def label_counts(scores_KxB, label_index_B):
            return (scores_KxB.argmax(0) == label_index_B).sum(), jnp.ones_like(label_index_B).sum()

        self._argmax_counts = jax.jit(argmax_counts)
        self._answer_logprob = jax.jit(answer_logprob)
        self._label_counts = jax.jit(label_counts)

    def _place(self, batch: dict) -> dict:
        return parallel.global_batch(batch, self.mesh)

    def counts(self, params, batch: dict) -> tuple[float, float]:
        if self.kind != "babi":
            correct, scored = self._argmax_counts(params, self._place({k: batch[k] for k in MODEL_FIELDS}))
        else:  # one forward pass per label of the task's label set, then the best-scoring label
            label_ids_BxKxS = batch["label_ids"]
            scores = [self._answer_logprob(params, self._place(with_answer(batch, label_ids_BxKxS[:, k], self.pad_id)))
                      for k in range(label_ids_BxKxS.shape[1])]
            label_index_B = self._place({"label_index": batch["label_index"]})["label_index"]
            correct, scored = self._label_counts(jnp.stack(scores), label_index_B)
        return float(correct), float(scored)

    def score(self, params, batches) -> float:
        correct = scored = 0.0
        for batch in batches:
            c, n = self.counts(params, batch)
            correct, scored = correct + c, scored + n
        return correct / scored if scored else float("nan")
