"""MQAR (multi-query associative recall): accuracy vs model width and vs recurrent state size per
sequence mixer, Zoology's headline plot.

    python experiments/mqar.py [--preset quick|full] [--out DIR] [--only NAME]

Every mixer (full attention; sliding-window attention with a window far shorter than the sequence;
the same window after a delta-rule memory layer (MAL) or with the Titans memory (MAG, MAL); the
memories alone; full attention with a product-key memory FFN; see study.MIXERS) trains on MQAR
(memjax.tasks.mqar) at each width, learning rate and seed, through memjax.trainer with the masked loss
on the queried positions; evaluations during training log eval/mqar_accuracy (the curve shows when
recall clicks), and the finished run is scored by memjax.evaluate on held-out examples
(task_eval_seed). Per mixer and width the learning rate with the best mean over seeds counts
(Zoology's protocol); the summary gives that mean and each seed's accuracy. The quick preset is the
spec's separating setting (V = 256, L = 64, 8 key-value pairs, 2 layers, 1500 steps x 64) at width 64
with full attention, SWA (window 8), SWA + delta-rule memory (MAL) and Titans MAG / MAL, three
learning rates and two seeds. The full preset is Zoology's sweep: 16-64 pairs at L = 256, widths
64-512. Neural memories start from weights of std 1/sqrt(d_model) (study.task_config says why).

State size: floats a layer keeps per sequence to decode the next token, summed over layers: the keys
and values of the positions attention sees (all L for full attention, the window plus persistent
tokens for sliding windows) plus a memory's weights (and momentum, if its optimizer has one).
Outputs under experiments/results/mqar/: results.csv (every run), mqar.png, README.md. A rerun skips
finished runs.
"""

from __future__ import annotations

import itertools

import study

PRESETS = {
    # Zoology's protocol at the spec's separating setting (V = 256, L = 64, 8 key-value pairs, 2 layers,
    # 1500 steps x 64): per mixer the best of three learning rates, two seeds each (mean and spread).
    # Zoology's own MQAR configs leave the query region's other tokens at 0 (random_non_queries=False);
    # with random tokens there, a key drawn again as noise before its query is followed by a random
    # token, which a delta rule writes over the real value (experiments/README.md). One attention head
    # of width 64 (Zoology's attention has one): two heads of 32 learnt recall later (see README).
    "quick": dict(settings=((64, 8),), vocab=256, widths=(64,), num_layers=2, num_heads=1, window=8,
                  task_options="random_non_queries=false",
                  mixers=("attention", "swa", "delta_mal", "titans_mag", "titans_mal"), lrs=(1e-3, 3e-3, 1e-2),
                  seeds=(0, 1), steps=1500, batch_size=64, examples=1024, evals=15),
    "full": dict(settings=((256, 16), (256, 32), (256, 64)), vocab=8192, widths=(64, 128, 256, 512),
                 num_layers=2, num_heads=1, window=16, task_options="random_non_queries=false",
                 mixers=("attention", "swa", "delta_mal", "delta", "titans_mag", "titans_mal", "titans_lmm", "pkm",
                         "gated_deltanet", "hope"),
                 lrs=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0, 1), steps=20_000, batch_size=256, examples=3000, evals=20),
}
# Small product-key tables (4,096 slots) for the CPU-sized widths.
PKM_SETTINGS = {"n_keys": 64, "k_dim": 64, "k": 16}


def state_floats(cfg) -> int:
    """Per sequence, summed over layers: attended keys and values (2 x d per position) plus a memory's
    recurrent state: a neural memory's weights (and momentum, when its optimizer has one; its carry's
    chunk buffers are an implementation detail), or a block's whole carry (LM2's slots)."""
    import jax
    import numpy as np
    from flax import nnx

    from memjax.config import resolve_vocab_size
    from memjax.data import ByteTokenizer
    from memjax.models import factory, registry

    def carry():
        vocab_size = resolve_vocab_size(cfg.model, ByteTokenizer().vocab_size)
        graphdef, params = factory.build(cfg.model, vocab_size, jax.random.key(0))
        return nnx.merge(graphdef, params).init_carry(1)

    m, length = cfg.model, cfg.train.seq_len
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    total = 0
    for name, block_carry in zip(registry.block_names(m), jax.eval_shape(carry)):
        if name in ("attention", "pkm", "lm2"):
            total += 2 * m.d_model * length
        elif name == "swa":
            total += 2 * m.d_model * min(m.swa.window, length)
        if name.startswith("titans"):
            p = m[name]
            if p.hybrid in ("mag", "mal"):
                total += 2 * m.d_model * (min(p.window, length) + p.persistent_tokens)
            memory = block_carry["memory"]
            total += size(memory["memory"]) + (size(memory["momentum"]) if p.optimizer != "gd" else 0)
        elif block_carry is not None:
            total += size(block_carry)
    return total


def main(argv=None):
    from memjax import evaluate

    args = study.parse_args("mqar", __doc__, argv)
    study.quiet()
    p = PRESETS[args.preset]
    s = study.Study("mqar", args.out)
    model_vocab = 0 if p["vocab"] <= 256 else -(-p["vocab"] // 8) * 8  # the byte tokenizer's covers 256
    runs, configs = [], {}
    grid = itertools.product(p["settings"], p["mixers"], p["widths"], p["lrs"], p["seeds"])
    for (seq_len, kv), mixer, d, lr, seed in grid:
        options = f"vocab_size={p['vocab']},num_kv_pairs={kv},{p['task_options']}".rstrip(",")
        cfg = study.task_config("mqar", options, seq_len=seq_len, mixer=mixer, d_model=d, num_layers=p["num_layers"],
                                num_heads=p["num_heads"], steps=p["steps"], batch_size=p["batch_size"], lr=lr,
                                window=p["window"], vocab_size=model_vocab, seed=seed, evals=p["evals"],
                                **(PKM_SETTINGS if mixer == "pkm" else {}))

        # The defaults bind this iteration's values (read only, never mutated).
        def run(workdir, cfg=cfg, meta=dict(seq_len=seq_len, num_kv_pairs=kv, mixer=mixer, d_model=d, lr=lr,  # noqa: B006
                                             seed=seed)):
            trained = study.train(cfg, workdir)
            scored = evaluate.evaluate_run(workdir, "mqar", [cfg.train.seq_len], examples=p["examples"],
                                           batch_size=min(p["examples"], 256))
            return {**meta, "accuracy": scored[0]["value"], "n": scored[0]["n"], "params": trained["params"],
                    "train_loss": trained["learning/loss"], "eval_loss": trained["eval/loss"],
                    "curve": study.curve(workdir, "eval/mqar_accuracy")}

        name = f"L{seq_len}_kv{kv}_{mixer}_d{d}_lr{lr:g}_s{seed}"
        runs.append((name, cfg, run))
        configs[name] = cfg
    results = s.run_all(runs, args.only)
    for r in results:  # from the config (cheap, abstract): not part of a run's saved result
        r["state_floats"] = state_floats(configs[r["run"]])
    s.write_csv([{k: v for k, v in r.items() if k != "curve"} for r in results])

    points = study.best_over_lrs(results, ("seq_len", "num_kv_pairs", "mixer", "d_model"), "accuracy")
    for point in points:
        point["state_floats"] = point["runs"][0]["state_floats"]
        point["per_seed"] = " / ".join(f"{r['accuracy']:.3f}" for r in point["runs"])
    settings = list(dict.fromkeys((r["seq_len"], r["num_kv_pairs"]) for r in points))
    plt = study.pyplot()
    fig, axes = plt.subplots(len(settings), 3, figsize=(15, 3.8 * len(settings)), squeeze=False)
    summary = [f"MQAR, vocabulary {p['vocab']} ({p['task_options'] or 'random_non_queries=true'}), "
               f"{p['num_layers']} layers, {p['num_heads']} attention head(s), sliding windows of {p['window']} "
               f"tokens, {p['steps']} steps x batch {p['batch_size']}. Per mixer and width the best of learning "
               f"rates {p['lrs']} by the mean over seeds {p['seeds']}; accuracy over the queried positions of "
               f"{p['examples']} held-out examples (chance: 1/{p['vocab'] // 2} values), mean with min-max over "
               f"seeds as error bars. Right: accuracy on the evaluation batches during training (best learning "
               f"rate, widest model, one line per seed): where recall 'clicks'."]
    for (seq_len, kv), row_axes in zip(settings, axes):
        mine = sorted((r for r in points if (r["seq_len"], r["num_kv_pairs"]) == (seq_len, kv)),
                      key=lambda r: (r["mixer"], r["d_model"]))
        for ax, x in zip(row_axes, ("d_model", "state_floats")):
            for mixer in dict.fromkeys(r["mixer"] for r in mine):
                line = sorted((r for r in mine if r["mixer"] == mixer), key=lambda r: r[x])
                ax.errorbar([r[x] for r in line], [r["accuracy"] for r in line], marker="o", capsize=3, label=mixer,
                            yerr=[[r["accuracy"] - r["accuracy_min"] for r in line],
                                  [r["accuracy_max"] - r["accuracy"] for r in line]])
            ax.set_xscale("log", base=2 if x == "d_model" else 10)
            ax.set_xlabel(x)
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"L={seq_len}, {kv} key-value pairs")
            ax.legend(fontsize=8)
        ax = row_axes[2]
        widest = max(r["d_model"] for r in mine)
        for i, point in enumerate(r for r in mine if r["d_model"] == widest):
            for j, run in enumerate(point["runs"]):
                steps, values = zip(*run["curve"]) if run["curve"] else ((), ())
                ax.plot(steps, values, color=f"C{i}", ls=("-", "--", ":")[j % 3],
                        label=f"{point['mixer']} (lr {point['lr']:g})" if j == 0 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("eval accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"training curves, d_model {widest}")
        ax.legend(fontsize=8)
        summary += [f"**L = {seq_len}, {kv} pairs**",
                    study.markdown_table(mine, ["mixer", "d_model", "accuracy", "per_seed", "lr", "lrs_tried",
                                                "state_floats"],
                                         {"accuracy": ".4f", "state_floats": ","})]
    figure = study.save_figure(fig, s.path("mqar.png"))
    s.write_summary(f"MQAR: accuracy vs width and state size ({args.preset} preset)",
                    summary + [f"![mqar]({figure.rsplit('/', 1)[-1]})"])
    print(f"wrote {s.dir}")


if __name__ == "__main__":
    main()
