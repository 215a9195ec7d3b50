"""Plumbing shared by the studies (mqar.py, niah.py, babilong.py, scaling.py).

A study is a list of runs, each a name, its config and a function of its workdir that trains and
scores and returns a dict. `Study.run_all` calls the function of every run whose
`runs/<name>/result.json` does not exist yet and writes that file when the run is done: a rerun skips
finished runs (refusing, before anything runs, one whose config has changed since it was trained), and
a run interrupted mid-training resumes from the checkpoints in its workdir (memjax.trainer resumes by
itself). Outputs go to `experiments/results/<study>/` (or --out): results.csv, <study>.png and
README.md, the summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing
RESULTS = os.path.join(REPO, "experiments", "results")
PRESETS = ("quick", "full")


def parse_args(study: str, doc: str, argv=None, extra: Callable | None = None) -> argparse.Namespace:
    """--preset, --out and --only (run only the runs whose names contain it); `extra(parser)` adds a
    study's own flags."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="quick",
                        help="quick: minutes on a 2-core CPU; full: the paper-like grid, for accelerators")
    parser.add_argument("--out", default="", help=f"output folder (default experiments/results/{study})")
    parser.add_argument("--only", default="", help="run only the runs whose name contains this (the outputs "
                                                     "still show every finished run)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(RESULTS, study)
    # Runs that differ only in their seed compile the same programs: a persistent cache compiles them
    # once (set before jax is imported; the keys hold the program, devices and jax version).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(RESULTS, ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    return args


def quiet() -> None:
    """Keeps the console for the progress bars: orbax/grain log every checkpoint through absl."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # also orbax's notes on read-only checkpoint loads
    logging.getLogger("memjax").setLevel(logging.WARNING)


class Study:
    def __init__(self, name: str, out_dir: str):
        self.name, self.dir = name, out_dir
        os.makedirs(self.dir, exist_ok=True)

    def workdir(self, run: str) -> str:
        return os.path.join(self.dir, "runs", run)

    def _result_path(self, run: str) -> str:
        return os.path.join(self.workdir(run), "result.json")

    def result(self, run: str) -> dict | None:
        """The finished run's result, or None."""
        path = self._result_path(run)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def changed_setting(self, run: str, cfg) -> str:
        """Where `cfg` differs from the config that trained the finished run (the config.json the
        trainer wrote in its workdir), as "section.key: then -> now"; "" if nowhere."""
        path = os.path.join(self.workdir(run), "config.json")
        if not os.path.isfile(path):
            return f"{path} is missing"
        from memjax.reliability import config_changes

        with open(path, encoding="utf-8") as f:
            changes = config_changes(json.load(f), cfg)
        return "" if not changes else "{}: {!r} -> {!r}".format(*changes[0])

    def run_all(self, runs: list[tuple[str, object, Callable[[str], dict]]], only: str = "") -> list[dict]:
        """Results of the runs (name, config or None, function of the workdir): finished ones read back,
        the others run now (each saved when done), except that runs whose names lack `only` are not run
        (nor returned) unless finished. A finished run whose config has changed since (a preset or a
        default edited) is an error before anything runs: its result would silently be the old one."""
        from tqdm import tqdm

        finished = {name: self.result(name) for name, _, _ in runs}  # read once: each is a file
        runs = [(name, cfg, fn) for name, cfg, fn in runs if only in name or finished[name] is not None]
        names = [name for name, _, _ in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.name}: run names repeat: {names}")
        changes = {name: self.changed_setting(name, cfg) for name, cfg, _ in runs
                   if cfg is not None and finished[name] is not None}
        stale = "; ".join(f"{name} ({change})" for name, change in changes.items() if change)
        if stale:
            raise ValueError(f"{self.name}: finished runs were trained with another config: {stale}. Delete "
                             f"their folders under {os.path.join(self.dir, 'runs')} to run them again, or pass "
                             f"another --out")
        results = []
        todo = sum(finished[name] is None for name in names)
        with tqdm(total=len(runs), desc=f"{self.name} ({todo} to run)", unit="run", dynamic_ncols=True) as bar:
            for name, _, fn in runs:
                result = finished[name]
                if result is None:
                    bar.set_postfix_str(name)
                    start = time.perf_counter()
                    result = {"run": name, **fn(self.workdir(name)), "seconds": time.perf_counter() - start}
                    path = self._result_path(name)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path + ".tmp", "w", encoding="utf-8") as f:
                        json.dump(result, f, indent=1)
                    os.replace(path + ".tmp", path)  # a result file is whole or absent
                results.append(result)
                bar.update(1)
        return results

    def path(self, filename: str) -> str:
        return os.path.join(self.dir, filename)

    def write_csv(self, rows: list[dict], filename: str = "results.csv") -> str:
        return write_csv(self.path(filename), rows)

    def write_summary(self, title: str, paragraphs: list[str], filename: str = "README.md") -> str:
        with open(self.path(filename), "w", encoding="utf-8") as f:
            f.write(f"# {title}\n\n" + "\n\n".join(p.strip() for p in paragraphs) + "\n")
        return self.path(filename)


def write_csv(path: str, rows: list[dict]) -> str:
    """rows as CSV at path (its folder created), with the union of their keys as columns."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def train(cfg, workdir: str) -> dict:
    """memjax.trainer.train on `cfg` (resuming from the workdir): the last logged metrics, the
    parameter count and the non-embedding one (all but the token embedding and output head)."""
    from memjax import config, trainer
    from memjax.data import get_tokenizer
    from memjax.metrics import read_jsonl
    from memjax.models import factory

    trainer.train(cfg, workdir)
    # The latest value of every metric: a run that had already finished (say, interrupted in its
    # scoring) logs nothing when trained again.
    last = {}
    for record in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        last.update(record)
    vocab_size = config.resolve_vocab_size(cfg.model, get_tokenizer(cfg.data, workdir).vocab_size)
    params = factory.abstract(cfg.model, vocab_size)[1]
    total = factory.count_params(params)
    embedding = factory.count_params({k: v for k, v in params.items() if k in ("embed", "head")})
    return {**{k: float(v) for k, v in last.items() if k != "step"}, "params": total,
            "non_embedding_params": total - embedding}


# The memory settings of configs/titans_lmm_quickstart.py: a linear memory with a small inner step
# (that file's docstring: the registered deep memory diverged in training at these sizes). The
# language-modelling studies (scaling.py) use these.
TITANS_MEMORY = {"memory_depth": 1, "chunk": 16, "theta_max": 0.01, "theta_init": 0.005}
# The Titans memory (momentum, decay) for the recall studies: at TITANS_MEMORY's inner step of at most
# 0.01 a write barely moves the memory, and MAG / MAL stayed at chance on MQAR; with theta up to 1 and
# half momentum, MAL reached 0.99 (chunk 8), but MAG diverged on S-NIAH's repeated filler sentences: a
# chunk's tokens share one state, so its inner step is theta times the largest eigenvalue of the sum of
# its (unit) keys' outer products, up to `chunk` when they repeat; heavy-ball momentum stays stable
# below 2 (1 + eta), so theta_max = 2 / chunk keeps every chunk stable whatever the keys.
TITANS_RECALL = {"memory_depth": 1, "chunk": 4, "theta_max": 0.5, "theta_init": 0.25, "eta_init": 0.5,
                 "alpha_init": 0.001}
# The delta rule (DeltaNet) in the engine: linear memory, L2 inner loss, plain gradient descent with a
# step theta in (0, 1) (the L2 loss's 1/2 makes theta the delta rule's beta), almost no forgetting.
DELTA_MEMORY = {"memory_depth": 1, "optimizer": "gd", "theta_max": 1.0, "theta_init": 0.5, "alpha_init": 0.001,
                "chunk": 8}
# Sequence mixers of the studies: the registered block every layer uses, and its settings.
MIXERS = {
    "attention": ("attention", {}),
    "swa": ("swa", {}),
    "titans_mag": ("titans_mag", TITANS_RECALL),
    "titans_mal": ("titans_mal", TITANS_RECALL),
    "titans_lmm": ("titans_lmm", TITANS_RECALL),
    # x + DeltaMemory(norm x), then x + SWA(norm x): the memory's reads enter the residual stream (in
    # MAG they only gate the attention's output, which cannot carry a recalled token by itself).
    "delta_mal": ("titans_mal", DELTA_MEMORY),
    "delta": ("titans_lmm", DELTA_MEMORY),  # the delta-rule memory alone (DeltaNet-like)
    "pkm": ("pkm", {}),  # full attention with a product-key memory in place of the FFN
    "lm2": ("lm2", {}),
    # The exact delta rule with its data-dependent decay (memjax/memory/deltanet.py), and HOPE
    # (memjax/memory/hope.py), at their registered defaults: in the full presets (their quick-preset
    # settings have not been tuned on CPU).
    "gated_deltanet": ("gated_deltanet", {}),
    "hope": ("hope", {}),
}


def set_mixer(cfg, mixer: str, *, window: int, memory: dict | None = None, **settings) -> None:
    """Every layer of `cfg` becomes the mixer; `window` is the local attention of swa / MAG / MAL,
    `memory` replaces the mixer's own settings in MIXERS (e.g. TITANS_MEMORY) and `settings` override
    the block's (e.g. pkm n_keys)."""
    import ml_collections

    block, defaults = MIXERS[mixer]
    defaults = defaults if memory is None else memory
    cfg.model.block_pattern = block
    cfg.model.swa.window = window
    if defaults or settings:
        cfg.model[block].update({**defaults, **settings})
    if block == "pkm":  # as configs/pkm_quickstart.py: sparsely read rows learn faster and do not decay
        from memjax.memory.pkm import VALUES_PATTERN

        cfg.optim.groups.pkm_values = ml_collections.ConfigDict(
            {"pattern": VALUES_PATTERN, "lr_mult": 4.0, "weight_decay": 0.0})
    if block.startswith("titans"):
        cfg.model[block].update({"window": window, "heads": cfg.model.num_heads})
    elif block in ("gated_deltanet", "hope"):
        cfg.model[block].heads = cfg.model.num_heads  # heads as wide as attention's


def pkm_forward_flops(model_cfg) -> float:
    """Forward FLOPs per token of a product-key memory layer: its matmuls (queries, half-key scores,
    W1 and W2 of Memory+), the bag's weighted sum of H k rows, and the selection (two top-k over the
    half scores, the k^2 candidate sums and their top-k, the k-way softmax)."""
    from memjax.memory import pkm

    p, v = model_cfg.pkm, pkm.value_dim(model_cfg)
    matmuls = 2 * (model_cfg.d_model * p.heads * p.k_dim + p.heads * p.n_keys * p.k_dim + 2 * model_cfg.d_model * v)
    half_k = min(p.k, p.n_keys)
    return matmuls + 2 * p.heads * p.k * v + p.heads * (2 * p.n_keys + 2 * half_k**2 + 5 * p.k)


def matched_swiglu_width(model_cfg) -> int:
    """d_ff of the SwiGLU FFN (6 d d_ff forward FLOPs per token) nearest to the pkm layer's FLOPs, in
    multiples of 32."""
    return max(32, round(pkm_forward_flops(model_cfg) / (6 * model_cfg.d_model) / 32) * 32)


def task_config(task: str, options: str, *, seq_len: int, mixer: str, d_model: int, num_layers: int,
                steps: int, batch_size: int, lr: float, window: int, seed: int = 0, eval_batches: int = 4,
                vocab_size: int = 0, num_heads: int = 0, evals: int = 1, **mixer_settings):
    """A run that trains `mixer` on a generated task (data.source = "task") at `seq_len`, with
    `num_heads` heads (0: one per 32 channels) and `evals` evaluations spread over the run (each logs
    the task's metric, eval/<metric>, so its curve shows when the task is learnt)."""
    from memjax.config import base_config

    cfg = base_config()
    cfg.seed = seed
    m = cfg.model
    m.d_model, m.num_layers, m.num_heads = d_model, num_layers, num_heads or max(1, d_model // 32)
    if MIXERS[mixer][0].startswith("titans"):
        # A neural memory's weights start at std 1/sqrt(d_model) (0.125 at width 64), not base_config's
        # 0.02 (GPT-2's, for width 768). Its projections are followed by L2 or RMS norms, so only their
        # direction counts, and Adam moves each weight by about lr per step whatever its size: from 0.02
        # a step of 3e-3 turns them by ~15%. On MQAR the delta-rule MAL reached 0.18 in 1500 steps from
        # 0.02 and 0.96 by step 500 from 0.1; attention is the other way round (0.82-0.97 from 0.02,
        # 0.38 from 0.1), so it keeps 0.02 (experiments/README.md, "What makes recall slow").
        m.init_std = d_model**-0.5
    m.vocab_size = vocab_size  # 0: the byte tokenizer's (covers task ids below 256)
    set_mixer(cfg, mixer, window=window, **mixer_settings)
    cfg.data.source, cfg.data.task, cfg.data.task_options = "task", task, options
    t = cfg.train
    t.seq_len, t.batch_size, t.steps = seq_len, batch_size, steps
    t.eval_every, t.eval_batches, t.log_every = max(steps // max(evals, 1), 1), eval_batches, max(steps // 50, 1)
    t.checkpoint_every, t.keep_checkpoints = max(steps // 3, 1), 1
    cfg.optim.lr, cfg.optim.warmup_steps = lr, min(100, steps // 10)
    return cfg


def curve(workdir: str, metric: str) -> list[list[float]]:
    """[step, value] of every logged `metric` of a run (e.g. "eval/mqar_accuracy"), in step order."""
    from memjax.metrics import read_jsonl

    points = {r["step"]: r[metric] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if metric in r}
    return [[step, float(points[step])] for step in sorted(points)]


def best_over_lrs(rows: list[dict], keys: tuple[str, ...], metric: str) -> list[dict]:
    """Zoology's protocol: per group of `keys` (say mixer and width) the learning rate whose mean
    `metric` over seeds is highest, with that mean, its spread over seeds (min, max, standard
    deviation) and the runs behind it."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), {}).setdefault(row["lr"], []).append(row)
    best = []
    for key, by_lr in groups.items():
        mean = {lr: sum(r[metric] for r in runs) / len(runs) for lr, runs in by_lr.items()}
        lr = max(mean, key=mean.get)
        values = [r[metric] for r in by_lr[lr]]
        std = (sum((v - mean[lr]) ** 2 for v in values) / len(values)) ** 0.5
        best.append({**dict(zip(keys, key)), "lr": lr, metric: mean[lr], f"{metric}_min": min(values),
                     f"{metric}_max": max(values), f"{metric}_std": std, "seeds": len(values),
                     "lrs_tried": len(by_lr), "runs": sorted(by_lr[lr], key=lambda r: r.get("seed", 0))})
    return best


def markdown_table(rows: list[dict], columns: list[str], formats: dict | None = None) -> str:
    formats = formats or {}
    fmt = lambda c, v: format(v, formats[c]) if c in formats and isinstance(v, (int, float)) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_groups(ax, rows: list[dict], x: str, y: str, group: str, *, logx: bool = False, label=str) -> None:
    """One line per value of `group`, points sorted by `x`."""
    for key in dict.fromkeys(row[group] for row in rows):
        points = sorted((row[x], row[y]) for row in rows if row[group] == key)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label(key))
    if logx:
        ax.set_xscale("log", base=2 if all(isinstance(r[x], int) for r in rows) else 10)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)


def save_figure(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    """matplotlib without a display (the `plots` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def length_study(name: str, doc: str, presets: dict, argv=None) -> None:
    """niah.py and babilong.py: every (task, mixer, seed) of the preset trains at `train_len`, then its
    task metric is scored at every length of `lengths` (beyond training included, memjax.evaluate);
    results.csv has one row per (run, length), <name>.png the metric vs length (log x) per task."""
    import itertools

    from memjax import evaluate

    args = parse_args(name, doc, argv)
    quiet()
    p = presets[args.preset]
    s = Study(name, args.out)
    runs = []
    for task, mixer, seed in itertools.product(p["tasks"], p["mixers"], p["seeds"]):
        cfg = task_config(task, p["options"].get(task, ""), seq_len=p["train_len"], mixer=mixer, seed=seed,
                          **p["model"])

        def run(workdir, cfg=cfg, task=task, mixer=mixer, seed=seed):
            trained = train(cfg, workdir)
            scored = evaluate.evaluate_run(workdir, task, p["lengths"], examples=p["examples"],
                                           batch_size=p["eval_batch_size"])
            return {"task": task, "mixer": mixer, "seed": seed, "params": trained["params"],
                    "train_loss": trained["learning/loss"], "lengths": scored}

        runs.append((f"{task}_{mixer}_s{seed}", cfg, run))
    results = s.run_all(runs, args.only)
    rows = [{"task": r["task"], "mixer": r["mixer"], "seed": r["seed"], "params": r["params"],
             "train_len": p["train_len"], "length": row["length"], "metric": row["metric"], "value": row["value"],
             "n": row["n"]} for r in results for row in r["lengths"]]
    s.write_csv(rows)

    plt = pyplot()
    tasks = list(dict.fromkeys(row["task"] for row in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    summary = [f"Trained at {p['train_len']} tokens ({p['model']}, options {p['options']}); scored on "
               f"{p['examples']} held-out examples (task_eval_seed) per length. Lengths beyond "
               f"{p['train_len']} were never seen in training."]
    for ax, task in zip(axes[0], tasks):
        mine = [row for row in rows if row["task"] == task]
        averaged = mean_over_seeds(mine, ("mixer", "length"))
        plot_groups(ax, averaged, "length", "value", "mixer", logx=True)
        ax.axvline(p["train_len"], color="k", ls="--", lw=0.8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task)
        ax.set_ylabel(mine[0]["metric"])
        ax.legend(fontsize=8)
        lengths = sorted({row["length"] for row in averaged})
        table = [{"mixer": mixer, **{str(length): row["value"] for length in lengths for row in averaged
                                     if row["mixer"] == mixer and row["length"] == length}}
                 for mixer in dict.fromkeys(row["mixer"] for row in averaged)]
        summary += [f"**{task}** ({mine[0]['metric']} vs context length)",
                    markdown_table(table, ["mixer", *map(str, lengths)], dict.fromkeys(map(str, lengths), ".3f"))]
    figure = save_figure(fig, s.path(f"{name}.png"))
    s.write_summary(f"{name}: accuracy vs context length ({args.preset} preset)",
                    summary + [f"![{name}]({os.path.basename(figure)})"])
    print(f"wrote {s.dir}")


def mean_over_seeds(rows: list[dict], keys: tuple) -> list[dict]:
    groups: dict = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row["value"])
    return [{**dict(zip(keys, key)), "value": sum(v) / len(v)} for key, v in groups.items()]
