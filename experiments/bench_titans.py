"""Training-step throughput of memory blocks against full attention as the context grows.

    python experiments/bench_titans.py [--d_model 256 --num_layers 4 --num_heads 4 --batch 1 \
        --seq_lens 256,1024,4096 --blocks titans_lmm,titans_mag,atlas,moneta,yaad,memora,attention \
        --runs 5] \
        [--set titans_mag.chunk=16 ...] [--csv PATH]

Times, in one process, the forward+backward train step of a decoder LM made of one block kind in every
layer (`model.block_pattern = <block>`): jax.value_and_grad of the mean cross-entropy on random tokens,
jitted; each figure is the median of --runs synchronised runs after --warmup untimed ones (compilation
included in those). Every model has the same width, depth, heads and byte-level vocabulary; memory
blocks run with their registered defaults (`config.model.<block>`), except for SETTINGS below, unless
--set changes them. The defaults are the papers' deep memories (a 2-layer MLP of expansion 4), not the
linear memory of the Titans quickstart configs.

The batch is fixed (--batch sequences per step at every T), so a step at T holds batch x T tokens and a
block whose cost is linear in T takes 4x the time at 4096 as at 1024; full attention's score term grows
16x. Printed per block: step time and tokens/s at every T, the ratio of step time at 4096 vs 1024, and
whether each target below is met.

FLOPs: the analytic count of each step (memjax.models.factory.flops_per_token: 6 x the parameter matmuls,
plus each memory block's engine, forward and outer backward, 3x the forward) gives the achieved FLOP/s and
its share of a float32 matmul peak measured in the same run (memjax.flops.measure_matmul_peak, before and
after the timings; the larger is the peak). Per memory block, the engine's forward FLOPs per token (all
layers and heads) are printed by part (memjax.kernels.neural_memory.engine.engine_flops: inner gradient,
gates, read, write, Newton-Schulz, softmax retention), with the outer backward as 2x their sum.

Adding a block: any registered name works in --blocks; its targets go in TARGETS (below).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import study  # noqa: E402  (experiments/, this script's directory)

# Per block: the largest allowed step-time ratio between the longest and the second-longest context
# (4096 vs 1024 by default; 4.0 is linear), and whether it must beat the baseline at the longest one.
# Blocks not listed are timed and their ratio printed, with no target.
TARGETS: dict[str, dict] = {
    "titans_lmm": {"max_ratio": 4.6, "faster_than_baseline": True},
    "titans_mag": {"max_ratio": 4.6, "faster_than_baseline": True},
}
BASELINE = "attention"
VOCAB = 256
# Per block, settings applied before --set (which can change them). ATLAS's degree-2 feature map has
# 1 + w + w^2 features for heads of width w, and Muon orthogonalises every token's update within a chunk:
# heads of width 16 (273 features) and expansion 2, as in configs/atlas_340m.py, keep it affordable
# (width 64 would give 4,161 features).
SETTINGS: dict[str, dict] = {
    "atlas": {"heads": lambda d_model: d_model // 16, "memory_expansion": 2},
}
DEFAULT_BLOCKS = ("titans_lmm", "titans_mag", "atlas", "moneta", "yaad", "memora", BASELINE)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=0, help="attention heads; 0 = d_model / 64")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step, the same at every T")
    parser.add_argument("--seq_lens", default="256,1024,4096", help="comma-separated context lengths")
    parser.add_argument("--blocks", default=",".join(DEFAULT_BLOCKS),
                        help=f"comma-separated registered block names; '{BASELINE}' is the baseline")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--set", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                        help="override a block setting, e.g. titans_mag.chunk=8 (repeatable)")
    parser.add_argument("--csv", default="", help="also write the table to this CSV file")
    return parser.parse_args(argv)


def model_config(args, block: str, seq_len: int):
    """The full config of one measurement (validated like a training run's)."""
    from ml_collections import config_dict

    from memjax import config

    cfg = config.base_config()
    m = cfg.model
    m.d_model, m.num_layers = args.d_model, args.num_layers
    m.num_heads = args.num_heads or max(args.d_model // 64, 1)
    m.block_pattern, m.dtype, m.vocab_size = block, args.dtype, VOCAB
    cfg.train.seq_len, cfg.train.batch_size = seq_len, args.batch
    for key, value in SETTINGS.get(block, {}).items():
        m[block][key] = value(args.d_model) if callable(value) else value
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        if name in m and isinstance(m[name], config_dict.ConfigDict) and field in m[name]:
            current = m[name][field]
            m[name][field] = (value.lower() in ("1", "true", "yes") if isinstance(current, bool)
                              else type(current)(value))
        else:
            raise SystemExit(f"error: --set {item}: no setting model.{key}")
    config.validate(cfg)
    return cfg


def engine_breakdown(cfg, block: str) -> dict[str, float] | None:
    """The neural-memory engine's forward FLOPs per token by part, over all layers and heads, and the outer
    backward's (2x the forward); None for a block without the engine."""
    from memjax.kernels.neural_memory import engine
    from memjax.memory import neural

    p = cfg.model.get(block)
    if p is None or "optimizer" not in p:
        return None
    head_dim = cfg.model.d_model // p.heads
    in_dim = neural.feature_dim(head_dim, p.feature_degree)
    parts = engine.engine_flops(neural.engine_spec(p, cfg.model.norm_eps), in_dim, head_dim)
    parts = {name: value * p.heads * cfg.model.num_layers for name, value in parts.items()}
    parts["outer_backward"] = 2.0 * sum(parts.values())
    return parts


def op_ceilings(cfg, block: str) -> dict[str, float]:
    """Measured FLOP/s of the operation that bounds a memory block's engine where it is not a large
    matmul, at the block's shapes: Muon's Newton-Schulz on the Gram path runs [m, m] matmuls batched over
    the heads and a chunk's tokens; softmax retention reads every token's [in, out] weights through an
    elementwise softmax (`engine.softmax_read`: max, subtract, exp, sum and the read's multiply-add, 6 FLOPs per
    entry as `engine_flops` counts them)."""
    import jax

    from memjax import flops
    from memjax.kernels.neural_memory import engine
    from memjax.memory import neural

    p = cfg.model.get(block)
    if p is None or "optimizer" not in p:
        return {}
    spec = neural.engine_spec(p, cfg.model.norm_eps)
    head_dim = cfg.model.d_model // p.heads
    shapes = engine.layer_shapes(spec, neural.feature_dim(head_dim, p.feature_degree), head_dim)
    batch = cfg.train.batch_size * p.heads * spec.chunk
    ceilings = {}
    if spec.optimizer == "muon" and spec.ns_form == "gram" and spec.retention != "softmax":
        m = max(min(shape) for shape in shapes)
        ceilings[f"[{batch}, {m}, {m}] batched matmul"] = flops.measure_matmul_peak(m, batch=batch)
    if spec.retention == "softmax" and spec.optimizer != "muon":
        fan_in, fan_out = max(shapes, key=lambda shape: shape[0] * shape[1])
        keys = jax.random.split(jax.random.key(0))
        weights = jax.random.normal(keys[0], (batch, fan_in, fan_out))
        x = jax.random.normal(keys[1], (batch, fan_in))
        seconds = flops.median_seconds(jax.jit(jax.vmap(engine.softmax_read)), weights, x)
        ceilings[f"softmax read of [{batch}, {fan_in}, {fan_out}]"] = 6.0 * batch * fan_in * fan_out / seconds
    return ceilings


def time_train_step(cfg, runs: int, warmup: int) -> tuple[float, bool]:
    """Median seconds of one jitted forward+backward step, and whether its loss was finite."""
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from memjax.models import factory

    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))

    def mean_loss(params, inputs, targets):
        logits, _ = nnx.merge(graphdef, params)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    step = jax.jit(jax.value_and_grad(mean_loss))
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    inputs, targets = (jax.device_put(rng.integers(0, VOCAB, shape, dtype=np.int32)) for _ in range(2))
    for _ in range(warmup):
        loss, _ = jax.block_until_ready(step(params, inputs, targets))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        loss, grads = jax.block_until_ready(step(params, inputs, targets))
        times.append(time.perf_counter() - start)
    return statistics.median(times), bool(np.isfinite(float(loss)))


def main(argv=None):
    args = parse_args(argv)
    import jax

    from memjax import flops
    from memjax.models import factory

    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    blocks.sort(key=lambda b: b != BASELINE)  # the baseline first: every later row compares with it
    heads = args.num_heads or max(args.d_model // 64, 1)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.devices()[0].platform}), "
          f"jax {jax.__version__}")
    print(f"d_model={args.d_model} layers={args.num_layers} heads={heads} dtype={args.dtype} vocab={VOCAB}; "
          f"fixed batch={args.batch} sequence(s) per step (tokens per step grow with T); "
          f"median of {args.runs} runs after {args.warmup} warm-up")
    if args.set:
        print("overrides: " + ", ".join(args.set))
    peaks = [flops.measure_matmul_peak()]
    print(f"measured float32 matmul peak (2048^3, before the timings): {peaks[0] / 1e9:.1f} GFLOP/s")
    print()

    rows, seconds = [], {}
    header = (f"{'block':<14}{'T':>6}{'params':>12}{'step ms':>11}{'tokens/s':>11}{'vs ' + BASELINE:>14}"
              f"{'GFLOP/token':>13}{'GFLOP/s':>9}{'% peak':>8}")
    print(header)
    for block in blocks:
        for t in seq_lens:
            cfg = model_config(args, block, t)
            params = factory.count_params(factory.abstract(cfg.model, VOCAB)[1])
            flops_per_token = factory.flops_per_token(cfg.model, VOCAB, t)
            step_s, finite = time_train_step(cfg, args.runs, args.warmup)
            seconds[block, t] = step_s
            tokens_per_s = args.batch * t / step_s
            achieved = tokens_per_s * flops_per_token
            versus = seconds.get((BASELINE, t))
            rows.append({"block": block, "seq_len": t, "batch": args.batch, "params": params,
                         "step_ms": step_s * 1e3, "tokens_per_s": tokens_per_s,
                         f"time_vs_{BASELINE}": step_s / versus if versus else "", "finite_loss": finite,
                         "flops_per_token": flops_per_token, "achieved_flops_per_s": achieved})
            note = "" if finite else "  (non-finite loss)"
            print(f"{block:<14}{t:>6}{params:>12,}{step_s * 1e3:>11.1f}{tokens_per_s:>11,.0f}"
                  f"{(f'{step_s / versus:.2f}x' if versus else '-'):>14}{flops_per_token / 1e9:>13.4f}"
                  f"{achieved / 1e9:>9.1f}{100 * achieved / peaks[0]:>7.1f}%{note}", flush=True)

    peaks.append(flops.measure_matmul_peak())
    peak = max(peaks)
    print(f"\nmeasured float32 matmul peak after the timings: {peaks[1] / 1e9:.1f} GFLOP/s; achieved share of the "
          f"larger ({peak / 1e9:.1f}) at the longest T:")
    for block in blocks:
        row = next(r for r in rows if r["block"] == block and r["seq_len"] == seq_lens[-1])
        print(f"  {block:<14}{100 * row['achieved_flops_per_s'] / peak:>6.1f}%")
        row["measured_matmul_peak"] = peak
    ceilings = {block: op_ceilings(model_config(args, block, seq_lens[-1]), block) for block in blocks}
    if any(ceilings.values()):
        print("\nmeasured rate of the operation that bounds each engine, at its shapes (share of the matmul peak):")
        for block, rates in ceilings.items():
            for name, rate in rates.items():
                print(f"  {block:<14}{name}: {rate / 1e9:.1f} GFLOP/s ({100 * rate / peak:.1f}%)")
                for row in rows:
                    if row["block"] == block:
                        row["bounding_op_flops_per_s"] = rate
    print("\nengine forward MFLOPs per token (all layers and heads) by part; outer backward = 2x their sum:")
    for block in blocks:
        parts = engine_breakdown(model_config(args, block, seq_lens[-1]), block)
        if parts:
            print(f"  {block:<14}" + "  ".join(f"{name} {value / 1e6:,.2f}" for name, value in parts.items()
                                               if value))

    if len(seq_lens) >= 2:
        long, short = seq_lens[-1], seq_lens[-2]
        print(f"\nstep time at T={long} vs T={short} ({long / short:.0f}x the tokens; fixed batch):")
        met_all = True
        for block in blocks:
            ratio = seconds[block, long] / seconds[block, short]
            target = TARGETS.get(block, {})
            verdicts = []
            if "max_ratio" in target:
                ok = ratio <= target["max_ratio"]
                met_all &= ok
                verdicts.append(f"target <= {target['max_ratio']}: {'met' if ok else 'NOT met'}")
            if target.get("faster_than_baseline") and (BASELINE, long) in seconds:
                base = seconds[BASELINE, long]
                ok = seconds[block, long] < base
                met_all &= ok
                verdicts.append(f"faster than {BASELINE} at T={long} ({seconds[block, long] / base:.2f}x): "
                                f"{'met' if ok else 'NOT met'}")
            print(f"  {block:<14}{ratio:>6.2f}" + (f"   {'; '.join(verdicts)}" if verdicts else ""))
        print(f"\nall targets met: {'yes' if met_all else 'no'}")

    if args.csv:
        print(f"wrote {study.write_csv(args.csv, rows)}")


if __name__ == "__main__":
    main()
