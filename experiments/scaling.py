"""Scaling curves: held-out bits per byte vs non-embedding parameters, per sequence mixer.

    python experiments/scaling.py [--preset quick|full] [--out DIR] [--only NAME]

Byte-level LMs on the embedded corpus (the Python standard library) at T = 256, over the spec's size
grid d_model / layers = 48/2, 64/3, 96/3, 128/4, 192/4, 256/4 (quick: the first three, one seed, one
learning rate). Every run sees the same number of tokens (fixed-token curves L(N)) with a cosine
schedule sized to it; per size the best of the learning rates counts, averaged over seeds. Per mixer,
L(N) = E + A N^-alpha is fitted by a Huber loss on log L (delta 1e-3, Chinchilla's fit) from a grid
of initialisations, with bootstrap confidence intervals over the points. Outputs (under
experiments/results/scaling/): results.csv (every run), points.csv, fits.csv, scaling.png (curves with
fits, and the residuals), README.md. A rerun skips finished runs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import study

PRESETS = {
    # 1M tokens in 244 steps of 16 x 256 left every size near the unigram entropy (3.4-3.9 bits/byte)
    # with the larger models behind the smaller ones: too few optimizer steps to order the sizes.
    "quick": dict(mixers=("attention", "titans_mag"), sizes=((48, 2), (64, 3), (96, 3)), lrs=(3e-3,),
                  seeds=lambda d: (0,), tokens=3_000_000, batch_size=8, eval_batches=32, bootstrap=200),
    "full": dict(mixers=("attention", "swa", "titans_mag", "titans_mal", "delta_mal"),
                 sizes=((48, 2), (64, 3), (96, 3), (128, 4), (192, 4), (256, 4)), lrs=(1e-3, 3e-3, 1e-2),
                 seeds=lambda d: (0, 1, 2) if d <= 64 else (0,), tokens=100_000_000, batch_size=32,
                 eval_batches=64, bootstrap=1000),
}
SEQ_LEN, WINDOW = 256, 64


def run_config(mixer: str, d_model: int, num_layers: int, lr: float, seed: int, p: dict):
    from memjax.config import base_config

    cfg = base_config()
    cfg.seed = seed
    cfg.model.d_model, cfg.model.num_layers = d_model, num_layers
    cfg.model.num_heads = max(1, round(d_model / 32))  # heads of width 32 (48: two of 24)
    study.set_mixer(cfg, mixer, window=WINDOW, memory=study.TITANS_MEMORY if mixer.startswith("titans") else None)
    t = cfg.train
    t.seq_len, t.batch_size = SEQ_LEN, p["batch_size"]
    t.steps = max(p["tokens"] // (t.batch_size * t.seq_len), 20)
    t.eval_every, t.eval_batches, t.log_every = t.steps, p["eval_batches"], 20
    t.checkpoint_every, t.keep_checkpoints = max(t.steps // 4, 1), 1
    cfg.optim.lr, cfg.optim.warmup_steps = lr, max(t.steps // 20, 1)
    return cfg


# ---------------------------------------------------------------------------------------- the L(N) fit


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta, log_n, log_loss, delta):
    """Huber loss of log-space residuals and its gradient; E = exp(e), A = exp(a) stay positive."""
    e, a, alpha = theta
    power = a - alpha * log_n
    predicted = np.logaddexp(e, power)
    r = predicted - log_loss
    slope = np.clip(r, -delta, delta)  # d huber / d r
    w_e, w_a = np.exp(e - predicted), np.exp(power - predicted)
    grad = np.array([(slope * w_e).sum(), (slope * w_a).sum(), -(slope * w_a * log_n).sum()])
    return float(_huber(r, delta).sum()), grad


def fit_power_law(n, loss, *, delta: float = 1e-3, inits=None) -> dict:
    """L(N) = E + A N^-alpha by a Huber loss on log L from a grid of initialisations; the best fit."""
    from scipy.optimize import minimize

    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    log_n, log_loss = np.log(n), np.log(loss)
    if inits is None:  # E below the smallest loss; A through the smallest model's point for each alpha
        inits = []
        for e_frac, alpha in itertools.product((0.1, 0.5, 0.8, 0.95), (0.1, 0.3, 0.6, 1.0, 1.5)):
            E = e_frac * loss.min()
            A = max(loss[np.argmin(n)] - E, 1e-6) * n.min() ** alpha
            for a_scale in (0.3, 3.0):
                inits.append((math.log(E), math.log(A * a_scale), alpha))
    best = None
    for init in inits:
        result = minimize(_objective, np.asarray(init, np.float64), args=(log_n, log_loss, delta), method="L-BFGS-B",
                          jac=True, bounds=[(None, None), (None, None), (0.0, 5.0)])
        if best is None or result.fun < best.fun:
            best = result
    e, a, alpha = best.x
    return {"E": math.exp(e), "A": math.exp(a), "alpha": float(alpha), "objective": float(best.fun),
            "init": tuple(best.x)}


def power_law(fit: dict, n):
    return fit["E"] + fit["A"] * np.asarray(n, np.float64) ** -fit["alpha"]


def bootstrap_fit(n, loss, *, samples: int, seed: int = 0, delta: float = 1e-3) -> dict:
    """The fit and 95% bootstrap intervals of E, A, alpha (points resampled with replacement; resamples
    with fewer than 3 distinct sizes cannot determine 3 parameters and are skipped)."""
    n, loss = np.asarray(n, np.float64), np.asarray(loss, np.float64)
    fit = fit_power_law(n, loss, delta=delta)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(samples):
        idx = rng.integers(0, len(n), len(n))
        if len(np.unique(n[idx])) < 3:
            continue
        # Started from the full fit (and its neighbours), which is enough for a small perturbation.
        e, a, alpha = fit["init"]
        inits = [(e, a, alpha), (e - 0.5, a, alpha * 0.5 + 0.05)]
        draws.append(fit_power_law(n[idx], loss[idx], delta=delta, inits=inits))
    for key in ("E", "A", "alpha"):
        values = [d[key] for d in draws]
        fit[f"{key}_lo"], fit[f"{key}_hi"] = (np.percentile(values, [2.5, 97.5]).tolist() if values
                                              else (float("nan"), float("nan")))
    fit["bootstrap_samples"] = len(draws)
    return fit


# -------------------------------------------------------------------------------------------- the study


def points_of(results: list[dict]) -> list[dict]:
    """Per (mixer, size): the best learning rate of each seed, averaged over seeds."""
    best: dict = {}
    for r in results:
        key = (r["mixer"], r["d_model"], r["num_layers"], r["seed"])
        if key not in best or r["eval/bits_per_byte"] < best[key]["eval/bits_per_byte"]:
            best[key] = r
    groups: dict = {}
    for (mixer, d, layers, _), r in best.items():
        groups.setdefault((mixer, d, layers), []).append(r)
    return [{"mixer": mixer, "d_model": d, "num_layers": layers, "N": rs[0]["non_embedding_params"],
             "bits_per_byte": float(np.mean([r["eval/bits_per_byte"] for r in rs])),
             "seeds": len(rs), "lr": rs[0]["lr"] if len(rs) == 1 else ""}
            for (mixer, d, layers), rs in sorted(groups.items())]


def plot(points: list[dict], fits: dict, path: str) -> str:
    plt = study.pyplot()
    fig, (ax, res_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, mixer in enumerate(dict.fromkeys(p["mixer"] for p in points)):
        mine = sorted((p["N"], p["bits_per_byte"]) for p in points if p["mixer"] == mixer)
        n, y = np.array([m[0] for m in mine]), np.array([m[1] for m in mine])
        color = f"C{i}"
        ax.scatter(n, y, color=color, label=mixer)
        if mixer in fits:
            f = fits[mixer]
            grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 100)
            ax.plot(grid, power_law(f, grid), color=color, lw=1,
                    label=f"{mixer}: {f['E']:.2f} + {f['A']:.3g} N^-{f['alpha']:.2f}")
            res_ax.plot(n, np.log(y) - np.log(power_law(f, n)), marker="o", color=color, label=mixer)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("held-out bits per byte")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    res_ax.axhline(0, color="k", lw=0.5)
    res_ax.set_xscale("log")
    res_ax.set_xlabel("N")
    res_ax.set_ylabel("log L - log fit")
    res_ax.grid(alpha=0.3)
    return study.save_figure(fig, path)


def main(argv=None):
    args = study.parse_args("scaling", __doc__, argv)
    study.quiet()
    p = PRESETS[args.preset]
    s = study.Study("scaling", args.out)
    runs = []
    for mixer, (d, layers) in itertools.product(p["mixers"], p["sizes"]):
        for lr, seed in itertools.product(p["lrs"], p["seeds"](d)):
            cfg = run_config(mixer, d, layers, lr, seed, p)
            meta = {"mixer": mixer, "d_model": d, "num_layers": layers, "lr": lr, "seed": seed,
                    "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len}
            runs.append((f"{mixer}_d{d}_l{layers}_lr{lr:g}_s{seed}", cfg,
                         lambda workdir, cfg=cfg, meta=meta: {**meta, **study.train(cfg, workdir)}))
    results = s.run_all(runs, args.only)
    s.write_csv(results)
    points = points_of(results)
    s.write_csv(points, "points.csv")
    fits = {}
    for mixer in dict.fromkeys(pt["mixer"] for pt in points):
        mine = [pt for pt in points if pt["mixer"] == mixer]
        if len(mine) >= 3:  # three parameters
            fits[mixer] = bootstrap_fit([pt["N"] for pt in mine], [pt["bits_per_byte"] for pt in mine],
                                        samples=p["bootstrap"])
    s.write_csv([{"mixer": m, **{k: v for k, v in f.items() if k != "init"}} for m, f in fits.items()], "fits.csv")
    figure = plot(points, fits, s.path("scaling.png"))
    fit_lines = [f"- {m}: L(N) = {f['E']:.3f} [{f['E_lo']:.3f}, {f['E_hi']:.3f}] + {f['A']:.3g} "
                 f"[{f['A_lo']:.3g}, {f['A_hi']:.3g}] N^-{f['alpha']:.3f} [{f['alpha_lo']:.3f}, {f['alpha_hi']:.3f}] "
                 f"({f['bootstrap_samples']} bootstrap fits)" for m, f in fits.items()]
    s.write_summary(f"Scaling: bits/byte vs non-embedding parameters ({args.preset} preset)", [
        f"Byte-level LMs on the embedded corpus, T = {SEQ_LEN}, {runs and results[0]['tokens']:,} tokens per run, "
        f"learning rates {p['lrs']}, sliding windows of {WINDOW} tokens. Each point is the best learning rate, "
        "averaged over seeds. Fits: Huber loss on log L (delta 1e-3) from a grid of initialisations; brackets "
        "are 95% bootstrap intervals over the points (with 3 points a fit is exactly determined and the "
        "intervals say little: the quick preset checks the pipeline, the full one makes the claim).",
        study.markdown_table(points, ["mixer", "d_model", "num_layers", "N", "bits_per_byte", "seeds"],
                             {"bits_per_byte": ".4f", "N": ","}),
        "\n".join(fit_lines) or "Too few sizes per mixer for a fit.",
        f"![curves]({figure.rsplit('/', 1)[-1]})",
    ])
    print(f"wrote {s.dir}")


if __name__ == "__main__":
    main()
