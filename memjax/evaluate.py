"""`python -m memjax.evaluate --workdir RUN --task niah_single --lengths 256,512,1024,2048
    [--examples 64 --batch_size 8 --task_options key=value,... --depths 0,0.5,1 --chunk 8 --out results.csv]`

Scores a trained run (its config.json and latest checkpoint) on a generated task at each context
length, lengths beyond training included, and writes one CSV row per (length, depth): task, length,
depth, metric, value, n (examples), step (of the checkpoint), train_seq_len. The metric is the task's
(memjax/tasks/__init__.py): MQAR accuracy over the queried positions, NIAH exact match of the
greedily decoded answer (one teacher-forced pass), bAbI accuracy of the best-scoring label.

Task options start from the run's own (`data.task_options`, when it trained on this task) and
--task_options overrides them; evaluation examples come from the run's `data.task_eval_seed`.
The metric is memjax.tasks.scoring's `TaskScorer`, as in the trainer's evaluations and the experiments.

--chunk N serves the run at another chunk size: every block of the model with a `chunk` setting (the
neural memories: Titans, ATLAS, Miras) runs with chunk N, the trained weights unchanged. A neural memory
takes its inner gradients at the chunk-start state, so the chunk is part of the function it learned
(TNT, arXiv 2511.07343, fine-tunes its memories at the smaller chunk it serves them at for this
reason); experiments/serve_chunk.py measures the effect on held-out loss. The CSV's `chunk` column is the
serving chunk (empty: the run's own).
"""

from __future__ import annotations

import csv
import math
import os
import sys

import ml_collections
from tqdm import tqdm

from memjax import checkpoint, config, parallel
from memjax.data import get_tokenizer
from memjax.data.task_batches import build_task, parse_task_options
from memjax.models import factory, registry
from memjax.tasks import TASKS, make_task_iterator
from memjax.tasks.scoring import EvaluationError, TaskScorer, metric_name

DEFAULT_EVAL_SEED = 1_000_000  # base_config's data.task_eval_seed, for runs that did not train on a task
CSV_FIELDS = ("task", "length", "depth", "metric", "value", "n", "step", "train_seq_len", "chunk")


def _check_model_length(cfg, length: int) -> None:
    """The run's model at `length` (e.g. HMT needs a multiple of its segment length)."""
    at_length = cfg.copy_and_resolve_references()
    at_length.train.seq_len = length
    at_length.data = config.base_config().data  # only the model's constraints matter, not the run's data
    try:
        config.validate(at_length)
    except config.ConfigError as err:
        raise EvaluationError(f"length {length}: the run's model does not run at this length ({err})") from None


def chunked_blocks(model_cfg) -> list[str]:
    """The model's block names that have a `chunk` setting (those whose function the chunk size defines)."""
    return [name for name in dict.fromkeys(registry.block_names(model_cfg)) if "chunk" in model_cfg.get(name, {})]


def serve_config(cfg, chunk: int) -> ml_collections.ConfigDict:
    """A copy of the run's config whose chunked blocks run at `chunk` (parameters unchanged); validated."""
    names = chunked_blocks(cfg.model)
    if not names:
        raise EvaluationError(f"--chunk: the run's blocks ({cfg.model.block_pattern}) have no chunk setting")
    if chunk < 1:
        raise EvaluationError(f"--chunk must be positive, got {chunk}")
    served = cfg.copy_and_resolve_references()
    for name in names:
        served.model[name].chunk = chunk
    try:
        config.validate(served)
    except config.ConfigError as err:
        raise EvaluationError(f"--chunk {chunk}: the run's model does not run at this chunk ({err})") from None
    return served


def evaluate_run(workdir: str, task: str, lengths, *, examples: int = 64, batch_size: int = 8,
                 task_options: str = "", depths=(), step: int | None = None, chunk: int | None = None,
                 progress: bool = True) -> list[dict]:
    """CSV rows (dicts with CSV_FIELDS) of `task` scored at every length (and NIAH depth) on the run's
    checkpoint, its chunked blocks at `chunk` if given. Raises EvaluationError (or FileNotFoundError)
    before any scoring on a bad request."""
    metric = metric_name(task)
    if not lengths:
        raise EvaluationError("no lengths to evaluate")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"{workdir} holds no config.json: not a memjax run directory")
    if examples < 1 or batch_size < 1:
        raise EvaluationError(f"--examples ({examples}) and --batch_size ({batch_size}) must be positive")
    if depths and not task.startswith("niah"):
        raise EvaluationError(f"--depths applies to the niah_* tasks, not {task!r}")
    cfg = config.load_config(workdir)
    if chunk is not None:
        cfg = serve_config(cfg, chunk)
    tokenizer = get_tokenizer(cfg.data, workdir)
    try:
        run_options = cfg.data.task_options if cfg.data.get("task", "") == task else ""
        options = {**parse_task_options(run_options), **parse_task_options(task_options)}
    except ValueError as err:
        raise EvaluationError(f"--task_options: {err}") from None
    seed = cfg.data.get("task_eval_seed", DEFAULT_EVAL_SEED)
    num_batches = math.ceil(examples / batch_size)
    vocab_size = config.resolve_vocab_size(cfg.model, tokenizer.vocab_size)

    # Every (length, depth) is built first, so a bad one fails before the checkpoint is loaded.
    tasks = {}
    for length in lengths:
        _check_model_length(cfg, length)
        for depth in depths or (None,):
            at = {**options, "num_examples": num_batches * batch_size, **({} if depth is None else {"depth": depth})}
            try:
                tasks[length, depth] = build_task(task, length, at, seed=seed, tokenizer=tokenizer)
            except ValueError as err:
                raise EvaluationError(f"task {task!r} at length {length}: {err}") from None
            if getattr(tasks[length, depth], "vocab_size", 0) > vocab_size:
                raise EvaluationError(f"task {task!r} uses token ids up to {tasks[length, depth].vocab_size} but "
                                      f"the model's vocabulary has {vocab_size}; set vocab_size in --task_options")

    graphdef, abstract_params = factory.abstract(cfg.model, vocab_size)
    params, step = checkpoint.load_params(workdir, abstract_params, step)
    scorer = TaskScorer(graphdef, task, parallel.single_device_mesh(), pad_id=tokenizer.eos_id)
    rows = []
    with tqdm(total=len(tasks) * num_batches, unit="batch", disable=not progress, dynamic_ncols=True) as bar:
        for (length, depth), source in tasks.items():
            bar.set_description(f"{task} T={length}" + ("" if depth is None else f" depth={depth}"))
            correct = scored = 0.0
            for batch in make_task_iterator(source, batch_size=batch_size):
                c, n = scorer.counts(params, batch)
                correct, scored = correct + c, scored + n
                bar.update(1)
            rows.append({"task": task, "length": length, "depth": "" if depth is None else depth, "metric": metric,
                         "value": correct / scored, "n": num_batches * batch_size, "step": step,
                         "train_seq_len": cfg.train.seq_len, "chunk": "" if chunk is None else chunk})
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'length':>8} {'depth':>6} {'metric':>15} {'value':>7} {'n':>6}"]
    lines += [f"{r['length']:>8} {str(r['depth']):>6} {r['metric']:>15} {r['value']:>7.4f} {r['n']:>6}" for r in rows]
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--workdir", required=True, help="run directory written by memjax.train")
    parser.add_argument("--task", required=True, help=f"one of {', '.join(sorted(TASKS))}")
    parser.add_argument("--lengths", required=True, help="comma-separated context lengths, e.g. 256,512,1024")
    parser.add_argument("--examples", type=int, default=64, help="examples per length (rounded up to batches)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--task_options", default="", help="key=value,... over the run's own task options")
    parser.add_argument("--depths", default="", help="NIAH only: comma-separated needle depths in [0, 1]")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--chunk", type=int, default=None,
                        help="serve the run's chunked memory blocks at this chunk size (default: as trained)")
    parser.add_argument("--out", default="", help="CSV path (default: <workdir>/eval_<task>.csv)")
    args = parser.parse_args(argv)
    try:
        lengths, depths = _int_list(args.lengths), [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError as err:
        parser.error(f"--lengths / --depths: {err}")
    try:
        rows = evaluate_run(args.workdir, args.task, lengths, examples=args.examples, batch_size=args.batch_size,
                            task_options=args.task_options, depths=depths, step=args.step, chunk=args.chunk)
    except (EvaluationError, FileNotFoundError, config.ConfigError) as err:
        sys.exit(f"error: {err}")
    out = args.out or os.path.join(args.workdir, f"eval_{args.task}.csv")
    write_csv(rows, out)
    print(format_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
