"""Serving a neural memory at another chunk size than it was trained at: MQAR accuracy and held-out loss
vs the serving chunk.

    python experiments/serve_chunk.py [--preset quick|full] [--out DIR] [--only NAME]

A neural memory takes every inner gradient of a chunk at the chunk-start state, so its chunk size is
part of the function it learns: TNT (Li et al. 2025, arXiv 2511.07343) trains with large chunks and then
fine-tunes its memories at the small chunk it serves them at, for this reason. Each run here trains
Titans MAL (the memory, then a sliding window of 8) on MQAR at the MQAR study's separating setting (L 64,
8 pairs, width 64, 2 layers) with its memory at one training chunk, then scores the same weights at
every serving chunk (`memjax.evaluate --chunk`, memjax.evaluate.serve_config): MQAR accuracy on
held-out examples and the masked loss on the run's validation batches. Chunk 1 is the exact token-by-
token recurrence. The memory is study.TITANS_RECALL's, with the inner step scaled to the training
chunk (theta_max = min(0.5, 2 / chunk): a chunk's step grows with its length, see study.py), so each
run trains stably at its own chunk; served at a longer chunk its step is no longer bounded.

On a recall task the memory is what answers (the window sees 8 tokens), so the chunk matters; on text
at configs/titans_lmm_quickstart.py's inner step (theta <= 0.01) it did not: trained at chunk 4 for 400
steps, held-out bits per byte at serving chunks 1-64 agreed to 4 decimals (2.7040 - 2.7038), the writes
being too small for the chunk to change them (experiments/README.md).

Outputs under experiments/results/serve_chunk/: results.csv (one row per run and serving chunk),
serve_chunk.png (accuracy and loss vs serving chunk, one line per training chunk, dotted: the training
chunks) and README.md (the table). A rerun skips finished runs.
"""

from __future__ import annotations

import study

MIXER = "titans_mal"
LABELS = {"accuracy": "MQAR accuracy (held out)", "loss": "validation loss (nats, scored targets)"}
PRESETS = {
    # About 10 minutes alone on 2 CPU cores (the memory clicks on MQAR by step ~400 at chunk 4).
    "quick": dict(train_chunks=(4, 16), serve_chunks=(1, 2, 4, 8, 16, 32, 64), steps=800, seeds=(0,), d_model=64,
                  seq_len=64, kv_pairs=8, lr=3e-3, batch_size=64, examples=512),
    # TNT's contrast: large training chunks served down to the exact recurrence, at Zoology's longer L.
    "full": dict(train_chunks=(4, 16, 64), serve_chunks=(1, 2, 4, 8, 16, 32, 64, 128, 256), steps=5000, seeds=(0, 1),
                 d_model=128, seq_len=256, kv_pairs=32, lr=1e-3, batch_size=128, examples=2048),
}


def run_config(p: dict, train_chunk: int, seed: int):
    theta_max = min(study.TITANS_RECALL["theta_max"], 2.0 / train_chunk)
    memory = {**study.TITANS_RECALL, "chunk": train_chunk, "theta_max": theta_max, "theta_init": theta_max / 2}
    options = f"vocab_size=256,num_kv_pairs={p['kv_pairs']},random_non_queries=false"
    return study.task_config("mqar", options, seq_len=p["seq_len"], mixer=MIXER, d_model=p["d_model"], num_layers=2,
                             num_heads=1, steps=p["steps"], batch_size=p["batch_size"], lr=p["lr"], window=8,
                             seed=seed, evals=4, memory=memory)


def serve_losses(workdir: str, serve_chunks) -> dict[int, float]:
    """Mean loss (nats per scored target) on the run's validation batches, its chunked blocks served at
    each chunk: the trainer's own evaluation (validation_batches, loss_sums), the weights as trained."""
    import jax

    from memjax import checkpoint, config, evaluate, trainer
    from memjax.models import factory

    cfg = config.load_config(workdir)
    run = trainer.setup(cfg, None)
    batches = trainer.validation_batches(run)
    token_bytes = trainer.target_bytes(run)
    params, _ = checkpoint.load_params(workdir, factory.abstract(cfg.model, run.vocab_size)[1])
    losses = {}
    for chunk in serve_chunks:
        graphdef, _ = factory.abstract(evaluate.serve_config(cfg, chunk).model, run.vocab_size)
        eval_fn = jax.jit(lambda p, b, graphdef=graphdef: trainer.loss_sums(graphdef, p, b, token_bytes))
        losses[chunk] = trainer.evaluate(eval_fn, params, batches)["eval/loss"]
    return losses


def main(argv=None) -> None:
    from memjax import evaluate

    args = study.parse_args("serve_chunk", __doc__, argv)
    study.quiet()
    p = PRESETS[args.preset]
    runs = []
    for train_chunk in p["train_chunks"]:
        for seed in p["seeds"]:
            cfg = run_config(p, train_chunk, seed)

            def fn(workdir, cfg=cfg, train_chunk=train_chunk, seed=seed):
                study.train(cfg, workdir)
                losses = serve_losses(workdir, p["serve_chunks"])
                rows = []
                for chunk in p["serve_chunks"]:
                    scored = evaluate.evaluate_run(workdir, "mqar", [cfg.train.seq_len], examples=p["examples"],
                                                   batch_size=min(p["examples"], 256), chunk=chunk, progress=False)
                    rows.append({"serve_chunk": chunk, "accuracy": scored[0]["value"], "loss": losses[chunk]})
                return {"train_chunk": train_chunk, "seed": seed, "served": rows}

            runs.append((f"train_chunk{train_chunk}_s{seed}", cfg, fn))
    s = study.Study("serve_chunk", args.out)
    results = s.run_all(runs, only=args.only)
    rows = [{"run": r["run"], "train_chunk": r["train_chunk"], "seed": r["seed"], **served}
            for r in results for served in r["served"]]
    s.write_csv(rows)
    means = []
    for metric in ("accuracy", "loss"):
        for row in study.mean_over_seeds([{**r, "value": r[metric]} for r in rows], ("train_chunk", "serve_chunk")):
            means.append({**row, "metric": metric})
    plt = study.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        study.plot_groups(ax, [r for r in means if r["metric"] == metric], "serve_chunk", "value", "train_chunk",
                          logx=True, label=lambda c: f"trained at chunk {c}")
        for train_chunk in p["train_chunks"]:
            ax.axvline(train_chunk, linestyle=":", color="grey", linewidth=0.8)
        ax.set_xlabel("serving chunk")
        ax.set_ylabel(LABELS[metric])
        ax.legend()
    fig.suptitle(f"{MIXER} on MQAR: served at other chunks than trained at")
    study.save_figure(fig, s.path("serve_chunk.png"))
    table = study.markdown_table(rows, ["train_chunk", "seed", "serve_chunk", "accuracy", "loss"],
                                 {"accuracy": ".3f", "loss": ".4f"})
    s.write_summary("Serving chunk vs training chunk", [__doc__.split("\n\n")[2], table, "![](serve_chunk.png)"])
    print(table)


if __name__ == "__main__":
    main()
