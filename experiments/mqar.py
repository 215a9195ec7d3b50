"""MQAR (multi-query associative recall): accuracy vs model width and vs recurrent state size per
sequence mixer, Zoology's headline plot.

    python experiments/mqar.py [--preset quick|full] [--out DIR] [--only NAME]

Every mixer (full attention; sliding-window attention with a window far shorter than the sequence;
the same window after a delta-rule memory layer (MAL) or with the Titans memory (MAG, MAL); the
memories alone; full attention with a product-key memory FFN; see study.MIXERS) trains on MQAR
(memjax.tasks.mqar) at each width, through memjax.trainer with the masked loss on the queried
positions, and is scored by memjax.evaluate on held-out examples (task_eval_seed). The quick preset
is the spec's separating setting (V = 256, L = 64, 8 key-value pairs, 2 layers, 1500 steps x 64)
with full attention, SWA (window 8) and SWA + delta-rule memory (MAL) at widths 32 and 64. The full
preset is Zoology's sweep: 16-64 pairs at L = 256, widths 64-512, best of three learning rates.

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
    # lr 3e-3: at 1e-3 full attention was still at 0.14 accuracy after 1000 steps, at 1e-2 at 0.10; at
    # 3e-3 it reached 0.90 after 1500 (its loss drops between steps 600 and 900; 2-core CPU).
    "quick": dict(settings=((64, 8),), vocab=256, widths=(32, 64), num_layers=2, window=8,
                  mixers=("attention", "swa", "delta_mal"), lrs=(3e-3,), steps=1500, batch_size=64,
                  examples=1024),
    "full": dict(settings=((256, 16), (256, 32), (256, 64)), vocab=8192, widths=(64, 128, 256, 512),
                 num_layers=2, window=16,
                 mixers=("attention", "swa", "delta_mal", "delta", "titans_mag", "titans_mal", "titans_lmm", "pkm"),
                 lrs=(3e-4, 1e-3, 3e-3), steps=20_000, batch_size=256, examples=3000),
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

    from memjax.config import block_names, resolve_vocab_size
    from memjax.data import ByteTokenizer
    from memjax.models import lm

    def carry():
        vocab_size = resolve_vocab_size(cfg.model, ByteTokenizer().vocab_size)
        graphdef, params = lm.build(cfg.model, vocab_size, jax.random.key(0))
        return nnx.merge(graphdef, params).init_carry(1)

    m, length = cfg.model, cfg.train.seq_len
    size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    total = 0
    for name, block_carry in zip(block_names(m), jax.eval_shape(carry)):
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
    for (seq_len, kv), mixer, d, lr in itertools.product(p["settings"], p["mixers"], p["widths"], p["lrs"]):
        cfg = study.task_config("mqar", f"vocab_size={p['vocab']},num_kv_pairs={kv}", seq_len=seq_len, mixer=mixer,
                                d_model=d, num_layers=p["num_layers"], steps=p["steps"], batch_size=p["batch_size"],
                                lr=lr, window=p["window"], vocab_size=model_vocab,
                                **(PKM_SETTINGS if mixer == "pkm" else {}))

        def run(workdir, cfg=cfg, meta=dict(seq_len=seq_len, num_kv_pairs=kv, mixer=mixer, d_model=d, lr=lr)):
            trained = study.train(cfg, workdir)
            scored = evaluate.evaluate_run(workdir, "mqar", [cfg.train.seq_len], examples=p["examples"],
                                           batch_size=min(p["examples"], 256))
            return {**meta, "accuracy": scored[0]["value"], "n": scored[0]["n"], "params": trained["params"],
                    "train_loss": trained["learning/loss"], "eval_loss": trained["eval/loss"]}

        name = f"L{seq_len}_kv{kv}_{mixer}_d{d}_lr{lr:g}"
        runs.append((name, cfg, run))
        configs[name] = cfg
    results = s.run_all(runs, args.only)
    for r in results:  # from the config (cheap, abstract): not part of a run's saved result
        r["state_floats"] = state_floats(configs[r["run"]])
    s.write_csv(results)

    # Per (setting, mixer, width): the best learning rate (Zoology's protocol).
    best: dict = {}
    for r in results:
        key = (r["seq_len"], r["num_kv_pairs"], r["mixer"], r["d_model"])
        if key not in best or r["accuracy"] > best[key]["accuracy"]:
            best[key] = r
    points = list(best.values())
    settings = list(dict.fromkeys((r["seq_len"], r["num_kv_pairs"]) for r in points))
    plt = study.pyplot()
    fig, axes = plt.subplots(len(settings), 2, figsize=(10, 3.8 * len(settings)), squeeze=False)
    summary = [f"MQAR, vocabulary {p['vocab']}, {p['num_layers']} layers, sliding windows of {p['window']} tokens, "
               f"{p['steps']} steps x batch {p['batch_size']}, best of learning rates {p['lrs']}; accuracy over the "
               f"queried positions of {p['examples']} held-out examples (chance: 1/{p['vocab'] // 2} values)."]
    for (seq_len, kv), row_axes in zip(settings, axes):
        mine = [r for r in points if (r["seq_len"], r["num_kv_pairs"]) == (seq_len, kv)]
        for ax, x in zip(row_axes, ("d_model", "state_floats")):
            study.plot_groups(ax, mine, x, "accuracy", "mixer", logx=True)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"L={seq_len}, {kv} key-value pairs")
            ax.legend(fontsize=8)
        summary += [f"**L = {seq_len}, {kv} pairs**",
                    study.markdown_table(sorted(mine, key=lambda r: (r["mixer"], r["d_model"])),
                                         ["mixer", "d_model", "accuracy", "state_floats", "params", "lr", "seconds"],
                                         {"accuracy": ".4f", "state_floats": ",", "params": ",", "seconds": ".0f"})]
    figure = study.save_figure(fig, s.path("mqar.png"))
    s.write_summary(f"MQAR: accuracy vs width and state size ({args.preset} preset)",
                    summary + [f"![mqar]({figure.rsplit('/', 1)[-1]})"])
    print(f"wrote {s.dir}")


if __name__ == "__main__":
    main()
