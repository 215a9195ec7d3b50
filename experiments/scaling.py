"""Scaling curves: held-out bits per byte vs non-embedding parameters N (and vs training FLOPs C), per
sequence mixer, with L = E + A x^-alpha fits, bootstrap intervals and the mixers' ordering.

    python experiments/scaling.py [--preset quick|full] [--out DIR] [--only NAME] [--dry_run]

One code path for both presets; a preset is a grid of shapes per mixer, a token rule, a learning-rate
rule and the seeds.

Design (quick: byte-level LMs on the embedded corpus, the Python standard library, T = 256, batches of
8 x 256 tokens, cosine schedule sized to each run, windows of 64 tokens for swa and Titans MAG):
- Sizes: six shapes (d_model / layers) 16/2, 24/2, 32/2, 48/2, 64/2, 80/3, heads of width ~32, the same
  for every mixer: N = 8.3K ... 262K for attention and swa (31.6x), 12.7K ... 393K for Titans MAG (31x).
- Tokens grow with N: D(N) = 1M x (N / 30K)^0.5, rounded to whole steps (256 steps at 8.3K, 1442 at
  262K). A fixed tokens-per-parameter ratio does not fit two cores: 20 tokens per parameter at the old
  preset's largest size alone is hours, and a ratio small enough for the large end leaves the small end
  a few dozen steps. So the curves are L(N, D(N)) along this rule, not compute-optimal frontiers.
- Learning rate: a sweep (1e-3, 3e-3, 1e-2) at the two smallest sizes (seed 0); each swept size takes
  its best. Above them lr(d) = c / sqrt(d_model), with c the geometric mean of best_lr x sqrt(d) over the
  swept sizes (Adam's best global rate falls with width in the standard parametrisation; 1/sqrt(d) is the
  milder of the usual rules, between constant and muP's 1/d for hidden matrices).
- Seeds: 2 at the two smallest sizes (at their best lr), 1 above: 12 runs per mixer.
- Time: `estimate_seconds` (RUN_COST), printed per run by --dry_run; ~45 minutes alone on two cores
  (experiments/README.md has the arithmetic).

The full preset is the same code with the Titans paper's sizes (170M / 340M / 760M parameters, 4K
context, BPE with 32K tokens, 15B / 15B / 30B tokens, AdamW lr 4e-4 cosine, batches of 0.5M tokens:
the recipe of configs/titans_170m.py), one lr (a one-point sweep, constant transfer) and one seed.

Fits (per mixer, over its runs at their chosen lr, every seed a point): L = E + A x^-alpha by a Huber
loss (delta 1e-3) on log L from a grid of starts, x = N and x = C (FLOPs per token x tokens). 90%
intervals by a bootstrap over runs (resample the runs, refit). For each pair of mixers the summary gives
P(L_a < L_b) over bootstrap pairs at a few matched N and matched C inside both curves' ranges. The token
rule gives one N per compute budget, so the runs hold no IsoFLOP slice (several N at one C); the L(C)
panel is the compute view. Outputs (under experiments/results/scaling/): results.csv (every run),
points.csv (runs in the fits), fits.csv, comparisons.csv, scaling.png (L vs N and vs C with fits and
90% bands, residuals), README.md. A rerun skips finished runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import sys

# The fits make tens of thousands of tiny L-BFGS-B solves, where BLAS threads only add wake-ups (20x
# slower on two busy cores); set before numpy loads (the training itself runs in XLA's own threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import study  # noqa: E402

# The mixers of both presets: one name per study.MIXERS entry. The full preset adds Gated DeltaNet and
# HOPE; the quick one keeps to the three its time budget (~45 minutes alone) was measured for.
MIXERS = ("attention", "swa", "titans_mag")
FULL_MIXERS = MIXERS + ("gated_deltanet", "hope")

QUICK_SHAPES = ((16, 2), (24, 2), (32, 2), (48, 2), (64, 2), (80, 3))
QUICK_N_REF, QUICK_TOKENS_AT_REF, QUICK_TOKEN_EXPONENT = 30_000, 1_000_000, 0.5

# The Titans paper's sizes (Behrouz et al. 2025, section 5.1: 170M, 340M, 760M, 4K context, 15B tokens,
# 30B for 760M). Titans MAG keeps configs/titans_170m.py and titans_340m.py (13 / 16 layers; ~18 d^2 per
# layer); attention and swa are Transformer++ shapes of the same total (configs/transformer_340m.py).
# (d_model, layers, attention heads, memory heads, tokens); totals counted with factory.abstract.
FULL_SHAPES = {
    "titans": ((768, 13, 12, 6, 15e9), (1024, 16, 16, 8, 15e9), (1536, 17, 24, 12, 30e9)),  # 165M 340M 777M
    "transformer": ((768, 20, 12, 0, 15e9), (1024, 24, 16, 0, 15e9), (1536, 25, 24, 0, 30e9)),  # 167M 337M 758M
}


def quick_tokens(n: float) -> float:
    return QUICK_TOKENS_AT_REF * (n / QUICK_N_REF) ** QUICK_TOKEN_EXPONENT


PRESETS = {
    "quick": dict(mixers=MIXERS, shapes=lambda mixer: [(d, layers, max(1, round(d / 32)), 0, None)
                                                       for d, layers in QUICK_SHAPES],
                  seq_len=256, window=64, batch_size=8, eval_batches=32, tokens=quick_tokens,
                  token_rule=f"D = {QUICK_TOKENS_AT_REF / 1e6:g}M x (N / {QUICK_N_REF:,})^{QUICK_TOKEN_EXPONENT}",
                  sweep_lrs=(1e-3, 3e-3, 1e-2), sweep_sizes=2, lr_width_exponent=-0.5, small_seeds=(0, 1),
                  bootstrap=1000, paper=False),
    "full": dict(mixers=FULL_MIXERS, shapes=lambda mixer: FULL_SHAPES["titans" if mixer.startswith("titans")
                                                                else "transformer"],
                 seq_len=4096, window=512, batch_size=128, eval_batches=16, tokens=None,
                 token_rule="the Titans paper's: 15B tokens at 170M and 340M, 30B at 760M",
                 sweep_lrs=(4e-4,), sweep_sizes=1, lr_width_exponent=0.0, small_seeds=(0,), bootstrap=1000,
                 paper=True),
}

# The quick preset's time model, two CPU cores alone (experiments/README.md has the measurements behind
# it): per mixer, seconds to compile and evaluate a run, seconds per token of fixed cost (per-step
# overhead; Titans' chunk scan) and the effective FLOP rate of the rest.
RUN_COST = {"attention": (15.0, 8e-6, 60e9), "swa": (20.0, 6e-6, 30e9), "titans_mag": (45.0, 40e-6, 37e9)}


def estimate_seconds(mixer: str, flops_per_token: float, tokens: float) -> float:
    """Wall seconds of a run under RUN_COST (a mixer without measurements: the slowest's constants)."""
    compile_s, per_token, flop_rate = RUN_COST.get(mixer, RUN_COST["titans_mag"])
    return compile_s + tokens * (per_token + flops_per_token / flop_rate)


def run_config(mixer: str, shape: tuple, lr: float, seed: int, p: dict):
    """The run's config: `shape` is (d_model, layers, heads, memory heads (0: as heads), tokens or None:
    the preset's token rule on the run's N)."""
    d_model, num_layers, num_heads, memory_heads, _ = shape
    if p["paper"]:
        configs = os.path.join(study.REPO, "configs")  # config files load by path, not as a package
        if configs not in sys.path:
            sys.path.insert(0, configs)
        from titans_170m import paper_config

        cfg = paper_config(d_model, num_layers, num_heads, memory_heads or num_heads)
    else:
        from memjax.config import base_config

        cfg = base_config()
        cfg.model.d_model, cfg.model.num_layers, cfg.model.num_heads = d_model, num_layers, num_heads
    cfg.seed = seed
    memory = study.TITANS_MEMORY if mixer.startswith("titans") else None
    study.set_mixer(cfg, mixer, window=p["window"], memory=memory)
    if p["paper"] and mixer.startswith("titans"):
        cfg.model[study.MIXERS[mixer][0]].heads = memory_heads
    t = cfg.train
    t.seq_len, t.batch_size = p["seq_len"], p["batch_size"]
    tokens = shape[4] or p["tokens"](non_embedding_params(cfg))
    t.steps = max(round(tokens / (t.batch_size * t.seq_len)), 20)
    t.eval_every, t.eval_batches = t.steps, p["eval_batches"]
    t.log_every = min(t.steps, 50 if p["paper"] else 20)
    t.checkpoint_every, t.keep_checkpoints = min(t.steps, 1000) if p["paper"] else max(t.steps // 4, 1), 1
    cfg.optim.lr = lr
    cfg.optim.warmup_steps = min(2000, t.steps // 10) if p["paper"] else max(t.steps // 20, 1)
    return cfg


def _vocab_size(cfg) -> int:
    from memjax import config

    tokenizer_vocab = cfg.data.bpe_vocab_size if cfg.data.tokenizer == "bpe" else 257  # ByteTokenizer's
    return config.resolve_vocab_size(cfg.model, tokenizer_vocab)


def non_embedding_params(cfg) -> int:
    """All parameters but the token embedding and output head, from the abstract model (as study.train)."""
    return _non_embedding_params(cfg.model.to_json(), _vocab_size(cfg))


@functools.lru_cache(maxsize=None)  # a plan asks for every run's N several times; each is an eval_shape
def _non_embedding_params(model_json: str, vocab_size: int) -> int:
    import ml_collections

    from memjax.models import factory

    params = factory.abstract(ml_collections.ConfigDict(json.loads(model_json)), vocab_size)[1]
    return factory.count_params(params) - factory.count_params(
        {k: v for k, v in params.items() if k in ("embed", "head")})


def flops_per_token(cfg) -> float:
    from memjax.models import factory

    return factory.flops_per_token(cfg.model, _vocab_size(cfg), cfg.train.seq_len)


# ---------------------------------------------------------------------------------- the learning rates


def transfer_lr(best: dict, d_model: int, exponent: float) -> float:
    """lr(d) = c d^exponent with c the geometric mean of best_lr(d_i) d_i^-exponent over the swept
    widths (`best`: d_i -> best lr)."""
    log_c = np.mean([math.log(lr) - exponent * math.log(d) for d, lr in best.items()])
    return float(math.exp(log_c) * d_model**exponent)


def best_lrs(results: list[dict], mixer: str) -> dict:
    """d_model -> the swept learning rate with the lowest seed-0 bits/byte."""
    best: dict = {}
    for r in results:
        if r["mixer"] == mixer and r["seed"] == 0 and r.get("phase") == "sweep":
            d = r["d_model"]
            if d not in best or r["eval/bits_per_byte"] < best[d]["eval/bits_per_byte"]:
                best[d] = r
    return {d: r["lr"] for d, r in best.items()}


# ------------------------------------------------------------------------------------------- the plan


def _run(mixer: str, shape: tuple, lr: float, seed: int, phase: str, p: dict):
    cfg = run_config(mixer, shape, lr, seed, p)
    t = cfg.train
    meta = {"mixer": mixer, "d_model": shape[0], "num_layers": shape[1], "lr": lr, "seed": seed, "phase": phase,
            "tokens": t.steps * t.batch_size * t.seq_len, "flops_per_token": flops_per_token(cfg)}
    meta["flops"] = meta["flops_per_token"] * meta["tokens"]
    name = f"{mixer}_d{shape[0]}_l{shape[1]}_lr{lr:.3g}_s{seed}"
    return name, cfg, meta


def plan(p: dict, finished: list[dict] | None = None) -> list[tuple]:
    """(name, config, meta) of every run: the sweep at the smallest sizes, then (once the sweep of a mixer
    is in `finished`) the other seeds at the swept sizes and the larger sizes at the transferred lr.
    Runs whose lr still waits on the sweep are left out."""
    runs = []
    for mixer in p["mixers"]:
        shapes = p["shapes"](mixer)
        swept = shapes[: p["sweep_sizes"]]
        runs += [_run(mixer, shape, lr, 0, "sweep", p) for shape, lr in itertools.product(swept, p["sweep_lrs"])]
        best = best_lrs(finished or [], mixer) if len(p["sweep_lrs"]) > 1 else {s[0]: p["sweep_lrs"][0] for s in swept}
        if len(best) < len(swept):
            continue
        runs += [_run(mixer, shape, best[shape[0]], seed, "seed", p) for shape in swept for seed in p["small_seeds"]
                 if seed != 0]
        runs += [_run(mixer, shape, transfer_lr(best, shape[0], p["lr_width_exponent"]), 0, "size", p)
                 for shape in shapes[p["sweep_sizes"]:]]
    return runs


def print_plan(p: dict, finished: list[dict]) -> None:
    runs = plan(p, finished)
    done = {r["run"] for r in finished}
    total = 0.0
    print(f"{'run':<36} {'N':>12} {'tokens':>14} {'steps':>7} {'FLOPs':>9} {'est. s':>7}  status")
    for name, cfg, meta in runs:
        n = non_embedding_params(cfg)
        seconds = estimate_seconds(meta["mixer"], meta["flops_per_token"], meta["tokens"])
        total += seconds * (name not in done)
        shown = "-" if p["paper"] else f"{seconds:.0f}"  # the time model is the quick preset's CPU
        print(f"{name:<36} {n:>12,} {meta['tokens']:>14,} {cfg.train.steps:>7,} {meta['flops']:>9.2e} "
              f"{shown:>7}  {'done' if name in done else 'to run'}")
    waiting = [m for m in p["mixers"] if not any(meta["mixer"] == m and meta["phase"] == "size" for *_, meta in runs)]
    if waiting:  # their larger sizes need the sweep's results first: estimate them at the sweep's middle lr
        lr = p["sweep_lrs"][len(p["sweep_lrs"]) // 2]
        extra = [(_run(m, shape, lr, 0, "size", p), m) for m in waiting for shape in p["shapes"](m)[p["sweep_sizes"]:]]
        extra += [(_run(m, shape, lr, seed, "seed", p), m) for m in waiting
                  for shape in p["shapes"](m)[: p["sweep_sizes"]] for seed in p["small_seeds"] if seed != 0]
        for (name, cfg, meta), mixer in extra:
            seconds = estimate_seconds(mixer, meta["flops_per_token"], meta["tokens"])
            total += seconds
            print(f"{name.rsplit('_lr', 1)[0] + '_lr(sweep)_s' + str(meta['seed']):<36} "
                  f"{non_embedding_params(cfg):>12,} {meta['tokens']:>14,} {cfg.train.steps:>7,} "
                  f"{meta['flops']:>9.2e} {seconds:>7.0f}  after the sweep")
    estimate = ("" if p["paper"] else f"; estimated time of the runs to do: {total / 60:.0f} minutes (two CPU "
                "cores, alone: scaling.RUN_COST)")
    print(f"{len(runs)} runs planned; token rule: {p['token_rule']}{estimate}")


# ---------------------------------------------------------------------------------------- the L(x) fit


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta, log_x, log_loss, delta):
    """Huber loss of log-space residuals and its gradient; E = exp(e), A = exp(a) stay positive."""
    e, a, alpha = theta
    power = a - alpha * log_x
    predicted = np.logaddexp(e, power)
    r = predicted - log_loss
    slope = np.clip(r, -delta, delta)  # d huber / d r
    w_e, w_a = np.exp(e - predicted), np.exp(power - predicted)
    grad = np.array([(slope * w_e).sum(), (slope * w_a).sum(), -(slope * w_a * log_x).sum()])
    return float(_huber(r, delta).sum()), grad


def start_grid(x, loss) -> list[tuple]:
    """Chinchilla-style starts: E below the smallest loss, alpha over a range, A through the smallest
    x's point for each (and 10x either side)."""
    x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
    starts = []
    for e_frac, alpha in itertools.product((0.05, 0.3, 0.6, 0.85, 0.97), (0.05, 0.15, 0.3, 0.6, 1.0, 2.0)):
        E = e_frac * loss.min()
        log_A = math.log(max(loss[np.argmin(x)] - E, 1e-6)) + alpha * math.log(x.min())
        starts += [(math.log(E), log_A + shift, alpha) for shift in (-2.3, 0.0, 2.3)]
    return starts


def fit_power_law(x, loss, *, delta: float = 1e-3, starts=None) -> dict:
    """L(x) = E + A x^-alpha by a Huber loss on log L from a grid of starts (`start_grid` unless given);
    the best fit."""
    from scipy.optimize import minimize

    x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
    log_x, log_loss = np.log(x), np.log(loss)
    best = None
    for start in starts if starts is not None else start_grid(x, loss):
        result = minimize(_objective, np.asarray(start, np.float64), args=(log_x, log_loss, delta),
                          method="L-BFGS-B", jac=True, bounds=[(None, None), (None, None), (0.0, 5.0)])
        if best is None or result.fun < best.fun:
            best = result
    e, a, alpha = best.x
    return {"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha), "objective": float(best.fun),
            "theta": tuple(best.x)}


def power_law(fit: dict, x):
    return fit["E"] + fit["A"] * np.asarray(x, np.float64) ** -fit["alpha"]


def bootstrap_fit(x, loss, *, samples: int, seed: int = 0, delta: float = 1e-3, level: float = 0.9) -> dict:
    """The fit and `level` bootstrap intervals of E, A, alpha: the runs resampled with replacement and
    refitted (from the full fit and a few starts around it, then the grid's best if those do worse
    than it would); resamples with fewer than 3 distinct x cannot determine 3 parameters and are
    skipped. `draws` keeps every refit, for bands and comparisons."""
    x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
    fit = fit_power_law(x, loss, delta=delta)
    e, a, alpha = fit["theta"]
    # Around the full fit: E lower and higher, alpha flatter and steeper (A following through min x).
    starts = [fit["theta"], (e - 0.3, a, alpha), (e + 0.05, a, alpha)]
    for scale in (0.5, 2.0):
        starts.append((e, a + (scale - 1) * alpha * math.log(x.min()), alpha * scale))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < 3:
            continue
        draws.append(fit_power_law(x[idx], loss[idx], delta=delta, starts=starts))
    tail = 100 * (1 - level) / 2
    for key in ("E", "A", "alpha"):
        values = [d[key] for d in draws]
        fit[f"{key}_lo"], fit[f"{key}_hi"] = (np.percentile(values, [tail, 100 - tail]).tolist() if values
                                              else (float("nan"), float("nan")))
    fit["bootstrap_samples"], fit["level"], fit["draws"] = len(draws), level, draws
    return fit


def band(fit: dict, x, level: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise `level` interval of the fitted curve at x over the bootstrap draws."""
    curves = np.array([power_law(d, x) for d in fit["draws"]])
    tail = 100 * (1 - level) / 2
    return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)


def probability_below(fit_a: dict, fit_b: dict, x) -> np.ndarray:
    """P(L_a(x) < L_b(x)) over paired bootstrap draws (draw i of a with draw i of b), at each x."""
    count = min(len(fit_a["draws"]), len(fit_b["draws"]))
    if count == 0:
        return np.full(np.shape(x), np.nan)
    below = [power_law(fit_a["draws"][i], x) < power_law(fit_b["draws"][i], x) for i in range(count)]
    return np.mean(below, axis=0)


def compare(fits: dict, ranges: dict, axis: str, points: int = 3) -> list[dict]:
    """For each pair of mixers, at `points` values of x spread geometrically over the range both curves
    cover: both fits' L, the bootstrap P(L_a < L_b) and a verdict (ordered when P >= 0.95 or <= 0.05)."""
    rows = []
    for a, b in itertools.combinations(fits, 2):
        lo, hi = max(ranges[a][0], ranges[b][0]), min(ranges[a][1], ranges[b][1])
        if lo > hi:
            continue
        xs = np.geomspace(lo, hi, points)
        probabilities = probability_below(fits[a], fits[b], xs)
        for x, prob in zip(xs, probabilities):
            la, lb = float(power_law(fits[a], x)), float(power_law(fits[b], x))
            verdict = (f"{a} below {b}" if prob >= 0.95 else f"{b} below {a}" if prob <= 0.05
                       else "not ordered at 90%")
            rows.append({"axis": axis, "a": a, "b": b, "x": float(x), "L_a": la, "L_b": lb,
                         "P(L_a<L_b)": float(prob), "verdict": verdict})
    return rows


# -------------------------------------------------------------------------------------------- outputs


def fits_of(points: list[dict], x_key: str, samples: int) -> dict:
    fits = {}
    for mixer in dict.fromkeys(pt["mixer"] for pt in points):
        mine = [pt for pt in points if pt["mixer"] == mixer]
        if len({pt[x_key] for pt in mine}) >= 3:  # three parameters
            fits[mixer] = bootstrap_fit([pt[x_key] for pt in mine], [pt["bits_per_byte"] for pt in mine],
                                        samples=samples)
    return fits


def _log_ticks(ax, axis: str) -> None:
    """Log ticks at 1-2-5 steps with short labels (matplotlib's defaults on a narrow log range overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def short(value, _):
        for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= scale:
                return f"{value / scale:g}{unit}" if value < 1e15 else f"{value:.0e}"
        return f"{value:g}"

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    target.set_major_formatter(FuncFormatter(short))
    target.set_minor_formatter(NullFormatter())


def plot(points: list[dict], fits_n: dict, fits_c: dict, path: str) -> str:
    plt = study.pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), gridspec_kw={"height_ratios": [3, 1.3]}, sharex="col")
    for column, (x_key, fits, label) in enumerate((("N", fits_n, "non-embedding parameters N"),
                                                   ("flops", fits_c, "training FLOPs C"))):
        ax, res_ax = axes[0, column], axes[1, column]
        for i, mixer in enumerate(dict.fromkeys(p["mixer"] for p in points)):
            mine = [p for p in points if p["mixer"] == mixer]
            x, y = np.array([p[x_key] for p in mine]), np.array([p["bits_per_byte"] for p in mine])
            color = f"C{i}"
            ax.scatter(x, y, color=color, s=18, zorder=3)
            if mixer not in fits:
                ax.plot([], [], color=color, label=f"{mixer} (too few sizes to fit)")
                continue
            f = fits[mixer]
            grid = np.geomspace(x.min() / 1.3, x.max() * 1.3, 100)
            ax.plot(grid, power_law(f, grid), color=color, lw=1.2,
                    label=f"{mixer}: {f['E']:.2f} + {f['A']:.3g} x^-{f['alpha']:.2f}")
            if f["draws"]:
                lo, hi = band(f, grid, f["level"])
                ax.fill_between(grid, lo, hi, color=color, alpha=0.15, lw=0)
            res_ax.scatter(x, np.log(y) - np.log(power_law(f, x)), color=color, s=14)
        ax.set_xscale("log")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(f"L vs {'N' if x_key == 'N' else 'C'} (bands: 90% bootstrap over runs)", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="major")
        res_ax.axhline(0, color="k", lw=0.5)
        res_ax.set_xscale("log")
        res_ax.set_xlabel(label)
        res_ax.set_ylabel("log L - log fit")
        res_ax.grid(alpha=0.3)
        _log_ticks(res_ax, "x")
    return study.save_figure(fig, path)


def points_of(results: list[dict]) -> list[dict]:
    """The runs the fits use: each size's chosen lr (the sweep's best, or the transferred one), every seed."""
    chosen = {(r["mixer"], r["d_model"], r["lr"]) for r in results if r["phase"] in ("seed", "size")}
    for mixer in dict.fromkeys(r["mixer"] for r in results):
        chosen |= {(mixer, d, lr) for d, lr in best_lrs(results, mixer).items()}
    rows = [{"mixer": r["mixer"], "d_model": r["d_model"], "num_layers": r["num_layers"], "seed": r["seed"],
             "lr": r["lr"], "N": r["non_embedding_params"], "tokens": r["tokens"], "flops": r["flops"],
             "bits_per_byte": r["eval/bits_per_byte"]}
            for r in results if (r["mixer"], r["d_model"], r["lr"]) in chosen]
    return sorted(rows, key=lambda r: (r["mixer"], r["N"], r["seed"]))


def _interval(f: dict, key: str, spec: str) -> str:
    return f"{format(f[key], spec)} [{format(f[key + '_lo'], spec)}, {format(f[key + '_hi'], spec)}]"


def summarize(results: list[dict], p: dict, preset: str, s) -> None:
    points = points_of(results)
    s.write_csv(points, "points.csv")
    fits_n, fits_c = fits_of(points, "N", p["bootstrap"]), fits_of(points, "flops", p["bootstrap"])
    s.write_csv([{"x": x, "mixer": m, **{k: v for k, v in f.items() if k not in ("theta", "draws")}}
                 for x, fits in (("N", fits_n), ("C", fits_c)) for m, f in fits.items()], "fits.csv")
    ranges = {key: {m: (min(pt[key] for pt in points if pt["mixer"] == m),
                        max(pt[key] for pt in points if pt["mixer"] == m)) for m in fits}
              for key, fits in (("N", fits_n), ("flops", fits_c))}
    comparisons = compare(fits_n, ranges["N"], "N") + compare(fits_c, ranges["flops"], "C")
    s.write_csv(comparisons, "comparisons.csv")
    figure = plot(points, fits_n, fits_c, s.path("scaling.png"))
    fit_lines = [f"- {m} vs {x}: E = {_interval(f, 'E', '.3f')}, alpha = {_interval(f, 'alpha', '.3f')}, "
                 f"A = {_interval(f, 'A', '.3g')} ({f['bootstrap_samples']} bootstrap fits)"
                 for x, fits in (("N", fits_n), ("C", fits_c)) for m, f in fits.items()]
    lrs = "; ".join(f"{m}: " + ", ".join(f"d{d} {lr:g}" for d, lr in sorted(best_lrs(results, m).items()))
                    for m in p["mixers"] if best_lrs(results, m))
    s.write_summary(f"Scaling: bits/byte vs non-embedding parameters and FLOPs ({preset} preset)", [
        f"T = {p['seq_len']}, windows of {p['window']} tokens (swa, Titans MAG); token rule {p['token_rule']}; "
        f"learning rates swept over {p['sweep_lrs']} at the {p['sweep_sizes']} smallest size(s) (best: {lrs or '-'}), "
        f"lr ~ d_model^{p['lr_width_exponent']:g} above; seeds {p['small_seeds']} at the swept sizes. Every run "
        "at its chosen lr is a point. Fits: Huber loss on log L (delta 1e-3) from a grid of starts; brackets "
        "are 90% bootstrap intervals over runs (resampled, refitted). C = analytic FLOPs per token x tokens.",
        study.markdown_table(points, ["mixer", "d_model", "num_layers", "seed", "lr", "N", "tokens", "flops",
                                      "bits_per_byte"],
                             {"bits_per_byte": ".4f", "N": ",", "tokens": ",", "flops": ".3g", "lr": ".3g"}),
        "\n".join(fit_lines) or "Too few sizes per mixer for a fit.",
        "**Ordering** (P = bootstrap probability that the first curve lies below the second; ordered when "
        "P >= 0.95 or <= 0.05):\n\n" + (study.markdown_table(
            comparisons, ["axis", "a", "b", "x", "L_a", "L_b", "P(L_a<L_b)", "verdict"],
            {"x": ".3g", "L_a": ".4f", "L_b": ".4f", "P(L_a<L_b)": ".3f"}) if comparisons else "no two fitted curves"),
        "No IsoFLOP view: the token rule gives every N one compute budget, so no two runs share a C; the L(C) "
        "curves are the compute view.",
        f"![curves]({os.path.basename(figure)})",
    ])


def main(argv=None):
    args = study.parse_args("scaling", __doc__, argv, extra=lambda parser: parser.add_argument(
        "--dry_run", action="store_true", help="print the run plan (N, tokens, steps, FLOPs, estimated time) and exit"))
    study.quiet()
    p = PRESETS[args.preset]
    s = study.Study("scaling", args.out)
    if args.dry_run:
        finished = [r for r in (s.result(name) for name, *_ in plan(p)) if r is not None]  # the sweep's
        finished = [r for r in (s.result(name) for name, *_ in plan(p, finished)) if r is not None]
        print_plan(p, finished)
        return

    def as_runs(entries):
        return [(name, cfg, lambda workdir, cfg=cfg, meta=meta: {**meta, **study.train(cfg, workdir)})
                for name, cfg, meta in entries]

    results = s.run_all(as_runs(plan(p)), args.only)  # the sweeps first: the other runs' lrs follow from them
    results = s.run_all(as_runs(plan(p, results)), args.only)
    s.write_csv(results)
    summarize(results, p, args.preset, s)
    print(f"wrote {s.dir}")


if __name__ == "__main__":
    main()
