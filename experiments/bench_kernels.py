"""Pallas kernels against their pure-JAX references: time per op, and in the full train step.

    python experiments/bench_kernels.py [--ops neural_memory] [--runs 5] [--warmup 1] \
        [--set neural_memory.seq_len=1024 ...] [--csv PATH]

Every op (OPS below) has a small interpret-mode correctness check, which runs anywhere, and a benchmark,
which needs the accelerator its kernel is built for: on a TPU or GPU the script prints, per op, the
median time of the reference and of the kernel (jitted, synchronised, after --warmup untimed runs
that include compilation) and their ratio, for the op alone (forward, and forward + backward) and for
a full training step of a model using it. On CPU the kernels only run in interpret mode, whose times
mean nothing: the script says so, runs the correctness checks and exits 0 (1 if a check fails).

Settings per op are in DEFAULTS and changed with --set OP.KEY=VALUE. Adding an op: a check_<op> and a
bench_<op> function, an entry in OPS and in DEFAULTS.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_titans' train-step timing

import study  # noqa: E402  (experiments/, this script's directory)

DEFAULTS: dict[str, dict] = {
    # One Titans memory (per head: a 2-layer GELU MLP of expansion 4, momentum and decay) over a batch of
    # sequences; the train step is a titans_lmm decoder of this width.
    "neural_memory": {"batch": 8, "heads": 8, "head_dim": 64, "seq_len": 4096, "chunk": 16, "depth": 2,
                      "activation": "gelu", "remat_chunks": 4, "dtype": "float32", "block": "titans_lmm",
                      "d_model": 512, "num_layers": 4, "step_batch": 8},
    # The product-key value lookup (weighted embedding bag) of one pkm layer: tokens x (heads * k) slots
    # of an n_keys^2 x v_dim table; the train step is a pkm decoder (attention + Memory+) of this width.
    "pkm_lookup": {"tokens": 4096, "heads": 4, "k": 32, "n_keys": 256, "v_dim": 1024, "dtype": "float32",
                   "d_model": 512, "num_layers": 4, "step_batch": 8, "seq_len": 512},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(DEFAULTS), help="comma-separated ops")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="OP.KEY=VALUE",
                        help="change an op's setting, e.g. neural_memory.chunk=64 (repeatable)")
    parser.add_argument("--csv", default="", help="also write the timings to this CSV file")
    return parser.parse_args(argv)


def settings(args, op: str) -> dict:
    values = dict(DEFAULTS[op])
    for item in args.set:
        key, _, value = item.partition("=")
        name, _, field = key.partition(".")
        if name != op:
            continue
        if field not in values:
            raise SystemExit(f"error: --set {item}: {op} has no setting {field!r} (one of {sorted(values)})")
        values[field] = type(values[field])(value)
    return values


def median_seconds(fn, args, runs: int, warmup: int) -> float:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_error(actual, expected) -> float:
    """Largest difference over the leaves, relative to each expected leaf's largest magnitude."""
    import jax
    import numpy as np

    errors = [float(np.abs(np.asarray(a, np.float64) - np.asarray(e, np.float64)).max()
                    / max(float(np.abs(np.asarray(e, np.float64)).max()), 1e-30))
              for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected))]
    return max(errors)


# ------------------------------------------------------------------------------------------ neural memory


def _memory_problem(s: dict, dtype):
    """Random state, momentum and streams at the settings' shape (NeuralMemory's layout)."""
    import jax
    import jax.numpy as jnp

    from memjax.kernels.neural_memory import engine

    spec = engine.Spec(depth=s["depth"], activation=s["activation"], chunk=s["chunk"], remat_chunks=s["remat_chunks"])
    b, h, d, t = s["batch"], s["heads"], s["head_dim"], s["seq_len"]
    n = engine.num_chunks(t, spec.chunk)
    keys = iter(jax.random.split(jax.random.key(0), 16))
    normal = lambda *shape: jax.random.normal(next(keys), shape, dtype)
    gate = lambda lo, hi: jax.random.uniform(next(keys), (b, h, n * spec.chunk), dtype, lo, hi)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    streams = {"q": unit(normal(b, h, n * spec.chunk, d)), "k": unit(normal(b, h, n * spec.chunk, d)),
               "v": normal(b, h, n * spec.chunk, d), "lr": gate(0.001, 0.01), "mom": gate(0.5, 0.95),
               "keep": gate(0.95, 1.0), "gamma": jnp.ones((b, h, n * spec.chunk), dtype)}
    state = [normal(b, h, i, o) * i**-0.5 for i, o in engine.layer_shapes(spec, d, d)]
    momentum = [jnp.zeros_like(a) for a in state]
    return spec, state, momentum, streams, jnp.arange(1, n + 1) * spec.chunk <= t


def _memory_loss(spec, kernel, backend=None):
    import jax.numpy as jnp

    from memjax.kernels.neural_memory import api, engine

    def loss(state, momentum, streams, full):
        if kernel == "reference":
            y, end, end_momentum, stats = engine.scan_chunks(spec, state, momentum, streams, full)
        elif backend:
            y, end, end_momentum, stats = api.fused_scan_chunks(spec, state, momentum, streams, full, backend=backend)
        else:
            y, end, end_momentum, stats = api.scan_chunks(spec, state, momentum, streams, full, kernel=kernel)
        return jnp.sum(y * y) + sum(jnp.sum(a * a) for a in end + end_momentum) + jnp.sum(stats["loss_before"])

    return loss


def check_neural_memory(s: dict) -> list[str]:
    """Interpret-mode kernels (TPU and GPU bodies) against the reference, values and gradients, at a tiny
    shape with a ragged tail."""
    import jax

    small = {**s, "batch": 2, "heads": 2, "head_dim": 16, "seq_len": 44, "chunk": 16, "remat_chunks": 2,
             "activation": "silu"}
    spec, state, momentum, streams, full = _memory_problem(small, "float32")
    grad = lambda kernel, backend=None: jax.jit(jax.value_and_grad(_memory_loss(spec, kernel, backend),
                                                                   argnums=(0, 1, 2)))
    expected = grad("reference")(state, momentum, streams, full)
    lines = []
    for backend in ("tpu", "gpu"):
        error = relative_error(grad("pallas", backend)(state, momentum, streams, full), expected)
        verdict = "ok" if error < 1e-4 else "FAILED"
        lines.append(f"{backend} kernel (interpret) vs reference, loss and gradients: "
                     f"max rel. error {error:.1e}: {verdict}")
    return lines


def bench_neural_memory(s: dict, runs: int, warmup: int) -> list[dict]:
    import bench_titans
    import jax

    from memjax.kernels.neural_memory import api

    spec, state, momentum, streams, full = _memory_problem(s, s["dtype"])
    ok, why = api.supported(spec, s["head_dim"], s["head_dim"])
    if not ok:
        raise SystemExit(f"error: neural_memory: the kernel does not run these settings on "
                         f"{jax.default_backend()}: {why}")
    args = (state, momentum, streams, full)
    rows = []
    for what, make in (("op forward", lambda k: jax.jit(_memory_loss(spec, k))),
                       ("op forward+backward", lambda k: jax.jit(jax.value_and_grad(_memory_loss(spec, k),
                                                                                    argnums=(0, 1, 2))))):
        times = {k: median_seconds(make(k), args, runs, warmup) for k in ("reference", "pallas")}
        rows.append({"op": "neural_memory", "what": what, **times})

    block = s["block"]
    step = SimpleNamespace(d_model=s["d_model"], num_layers=s["num_layers"], num_heads=0, batch=s["step_batch"],
                           dtype=s["dtype"], set=[])
    times = {}
    for kernel in ("reference", "pallas"):
        step.set = [f"{block}.kernel={kernel}", f"{block}.chunk={s['chunk']}",
                    f"{block}.heads={s['d_model'] // s['head_dim']}", f"{block}.memory_depth={s['depth']}",
                    f"{block}.activation={s['activation']}", f"{block}.remat_chunks={s['remat_chunks']}"]
        cfg = bench_titans.model_config(step, block, s["seq_len"])
        times[kernel] = bench_titans.time_train_step(cfg, runs, warmup)[0]
    rows.append({"op": "neural_memory", "what": f"train step ({block}, d_model {s['d_model']}, "
                                                f"{s['num_layers']} layers)", **times})
    return rows


# ------------------------------------------------------------------------------------------- pkm lookup


def _bag_problem(tokens: int, slots: int, n: int, v: int, dtype, seed: int = 0):
    """A table, slot ids with repeats (a quarter of the rows drawn), softmax weights and an output
    cotangent."""
    import jax

    keys = jax.random.split(jax.random.key(seed), 4)
    table = (jax.random.normal(keys[0], (n, v)) * v**-0.5).astype(dtype)
    idx = jax.random.randint(keys[1], (tokens, slots), 0, max(n // 4, 1))
    w = jax.nn.softmax(jax.random.normal(keys[2], (tokens, slots)), axis=-1)
    g = jax.random.normal(keys[3], (tokens, v), dtype)
    return table, idx, w, g


def _bag_loss(kernel):
    import jax.numpy as jnp

    from memjax.kernels.pkm_lookup import api

    def loss(table, w, idx, g):
        return jnp.sum(api.embedding_bag(table, idx, w, kernel=kernel).astype(jnp.float32) * g)

    return loss


def check_pkm_lookup(s: dict) -> list[str]:
    """Interpret-mode kernels (TPU and GPU bodies) against the reference, output and gradients (table,
    weights), at a tiny shape with a ragged token count and repeated rows."""
    import jax

    from memjax.kernels.pkm_lookup import api

    table, idx, w, g = _bag_problem(37, 6, 64, 128, "float32")
    grad = lambda kernel: jax.jit(jax.value_and_grad(_bag_loss(kernel), argnums=(0, 1)))
    expected = grad("reference")(table, w, idx, g)
    lines = []
    saved = api.INTERPRET_AS
    try:
        for target in ("tpu", "gpu"):
            api.INTERPRET_AS = target
            error = relative_error(grad("pallas")(table, w, idx, g), expected)
            verdict = "ok" if error < 1e-5 else "FAILED"
            lines.append(f"{target} kernel (interpret) vs reference, value and gradients: max rel. error {error:.1e}: "
                         f"{verdict}")
    finally:
        api.INTERPRET_AS = saved
    return lines


def bench_pkm_lookup(s: dict, runs: int, warmup: int) -> list[dict]:
    import bench_titans
    import jax

    from memjax.kernels.pkm_lookup import api

    n, slots = s["n_keys"] ** 2, s["heads"] * s["k"]
    table, idx, w, g = _bag_problem(s["tokens"], slots, n, s["v_dim"], s["dtype"])
    ok, why = api.support(table)
    if not ok:
        raise SystemExit(f"error: pkm_lookup: the kernel does not run these settings on {jax.default_backend()}: {why}")
    args = (table, w, idx, g)
    rows = []
    for what, make in (("op forward", lambda k: jax.jit(_bag_loss(k))),
                       ("op forward+backward", lambda k: jax.jit(jax.value_and_grad(_bag_loss(k), argnums=(0, 1))))):
        times = {k: median_seconds(make(k), args, runs, warmup) for k in ("reference", "pallas")}
        rows.append({"op": "pkm_lookup", "what": f"{what} ({s['tokens']} x {slots} of {n} x {s['v_dim']})", **times})

    step = SimpleNamespace(d_model=s["d_model"], num_layers=s["num_layers"], num_heads=0, batch=s["step_batch"],
                           dtype=s["dtype"], set=[])
    times = {}
    for kernel in ("reference", "pallas"):
        step.set = [f"pkm.kernel={kernel}", f"pkm.heads={s['heads']}", f"pkm.k={s['k']}", f"pkm.n_keys={s['n_keys']}",
                    f"pkm.v_dim={s['v_dim']}"]
        cfg = bench_titans.model_config(step, "pkm", s["seq_len"])
        times[kernel] = bench_titans.time_train_step(cfg, runs, warmup)[0]
    rows.append({"op": "pkm_lookup", "what": f"train step (pkm, d_model {s['d_model']}, {s['num_layers']} layers)",
                 **times})
    return rows


OPS = {"neural_memory": (check_neural_memory, bench_neural_memory),
       "pkm_lookup": (check_pkm_lookup, bench_pkm_lookup)}


def main(argv=None):
    args = parse_args(argv)
    import jax

    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise SystemExit(f"error: unknown ops {unknown}; one of {sorted(OPS)}")
    platform = jax.default_backend()
    print(f"device: {jax.devices()[0].device_kind} ({platform}), jax {jax.__version__}")
    failed = False
    for op in ops:
        for line in OPS[op][0](settings(args, op)):
            print(f"{op}: {line}", flush=True)
            failed |= line.endswith("FAILED")
    if platform == "cpu":
        print("\nCPU: the kernels run only in interpret mode here, so only their correctness is measurable "
              "(above); timings need a TPU or GPU.")
        sys.exit(1 if failed else 0)

    print(f"\nmedian of {args.runs} runs after {args.warmup} warm-up\n")
    print(f"{'op':<15}{'what':<52}{'reference ms':>14}{'pallas ms':>11}{'speed-up':>10}")
    rows = []
    for op in ops:
        for row in OPS[op][1](settings(args, op), args.runs, args.warmup):
            row = {**row, "reference_ms": row.pop("reference") * 1e3, "pallas_ms": row.pop("pallas") * 1e3}
            row["speedup"] = row["reference_ms"] / row["pallas_ms"]
            rows.append(row)
            print(f"{row['op']:<15}{row['what']:<52}{row['reference_ms']:>14.2f}{row['pallas_ms']:>11.2f}"
                  f"{row['speedup']:>9.2f}x", flush=True)
    if args.csv and rows:
        print(f"wrote {study.write_csv(args.csv, rows)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
