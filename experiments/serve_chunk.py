"""Serving a neural memory at another chunk size than it was trained at: held-out bits per byte vs the
serving chunk.

    python experiments/serve_chunk.py [--preset quick|full] [--out DIR] [--only NAME]

A neural memory takes every inner gradient of a chunk at the chunk-start state, so its chunk size is
part of the function it learns: TNT (Li et al. 2025, arXiv 2511.07343) trains with large chunks and then
fine-tunes its memories at the small chunk it serves them at, for this reason. Each run here trains the model of
configs/titans_lmm_quickstart.py (the Titans memory alone in every layer, on the embedded corpus) with
its memory at one training chunk, then scores the run's validation batches (the trainer's own
evaluation: memjax.trainer.validation_batches and loss_sums) with the same weights at every serving
chunk (memjax.evaluate.serve_config, what `python -m memjax.evaluate --chunk N` uses). Chunk 1 is the
exact token-by-token recurrence. Outputs under experiments/results/serve_chunk/: results.csv (one row
per run and serving chunk), serve_chunk.png (bits per byte vs serving chunk, one line per training
chunk, dotted: each run's training chunk) and README.md (the table of bits per byte, `value`, averaged
over seeds). A rerun skips finished runs.
"""

from __future__ import annotations

import os

import study

CONFIG = os.path.join(study.REPO, "configs", "titans_lmm_quickstart.py")
BLOCK = "titans_lmm"
PRESETS = {
    # About 10 minutes alone on 2 CPU cores: 2 x 400 steps of the quickstart model (0.44 s a step) and the
    # evaluations (chunk 1 is a 256-step scan per layer).
    "quick": dict(train_chunks=(4, 16), serve_chunks=(1, 2, 4, 8, 16, 32, 64), steps=400, seeds=(0,)),
    # TNT's contrast: large training chunks (64) served down to the exact recurrence.
    "full": dict(train_chunks=(8, 16, 64), serve_chunks=(1, 2, 4, 8, 16, 32, 64, 128), steps=1200, seeds=(0, 1)),
}


def run_config(train_chunk: int, steps: int, seed: int):
    from memjax import config

    cfg = config.load_config(CONFIG)
    cfg.seed = seed
    cfg.model[BLOCK].chunk = train_chunk
    t = cfg.train
    t.steps, t.eval_every, t.checkpoint_every = steps, steps, steps
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, steps // 10)
    return cfg


def serve_losses(workdir: str, serve_chunks) -> dict[int, float]:
    """Bits per byte of the run's validation batches, its chunked blocks served at each chunk."""
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
        losses[chunk] = trainer.evaluate(eval_fn, params, batches)["eval/bits_per_byte"]
    return losses


def main(argv=None) -> None:
    args = study.parse_args("serve_chunk", __doc__, argv)
    study.quiet()
    p = PRESETS[args.preset]
    runs = []
    for train_chunk in p["train_chunks"]:
        for seed in p["seeds"]:
            cfg = run_config(train_chunk, p["steps"], seed)

            def fn(workdir, cfg=cfg, train_chunk=train_chunk, seed=seed):
                trained = study.train(cfg, workdir)
                served = serve_losses(workdir, p["serve_chunks"])
                return {"train_chunk": train_chunk, "seed": seed, "train_loss": trained.get("train/loss"),
                        **{f"bpb_chunk{c}": v for c, v in served.items()}}

            runs.append((f"train_chunk{train_chunk}_s{seed}", cfg, fn))
    s = study.Study("serve_chunk", args.out)
    results = s.run_all(runs, only=args.only)
    rows = [{"run": r["run"], "train_chunk": r["train_chunk"], "seed": r["seed"], "serve_chunk": c,
             "metric": "bits_per_byte", "value": r[f"bpb_chunk{c}"]}
            for r in results for c in p["serve_chunks"] if f"bpb_chunk{c}" in r]
    s.write_csv(rows)
    means = study.mean_over_seeds(rows, ("train_chunk", "serve_chunk"))
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    study.plot_groups(ax, means, "serve_chunk", "value", "train_chunk", logx=True,
                      label=lambda c: f"trained at chunk {c}")
    for train_chunk in p["train_chunks"]:
        ax.axvline(train_chunk, linestyle=":", color="grey", linewidth=0.8)
    ax.set_xlabel("serving chunk (log)")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title(f"{BLOCK}: the chunk a memory is served at vs trained at")
    study.save_figure(fig, s.path("serve_chunk.png"))
    ax.legend()
    table = study.markdown_table(means, ["train_chunk", "serve_chunk", "value"], {"value": ".4f"})
    s.write_summary("Serving chunk vs training chunk", [__doc__.split("\n\n")[2], table])
    print(table)


if __name__ == "__main__":
    main()
