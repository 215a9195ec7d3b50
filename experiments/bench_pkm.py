"""Cost of a product-key memory layer against its number of slots, and against a dense SwiGLU FFN.

    python experiments/bench_pkm.py [--d_model 1024 --v_dim 512 --k_dim 256 --heads 4 --k 32 \
        --batch 8 --seq_len 256 --runs 10] [--blocks] [--allocator system]

Times, in one process, forward+backward (gradients of every parameter, value table included, and of
the input) of the memory layer, x + Memory+(RMSNorm(x)), at 16K, 262K and 1M slots with the same
width, heads and k; then a dense SwiGLU FFN layer whose forward FLOPs per token equal the 1M-slot
memory's; with --blocks also the whole pkm block (attention + memory) and an attention + SwiGLU block.
The steps are timed in interleaved rounds (each round runs every one once, after --warmup untimed runs
of each): a figure is the median over --runs rounds, a ratio the median of the ratios within a round,
so a change of the machine's speed mid-run (other load) does not skew the comparison. On a CPU host
the ratios still move by up to ~0.2x between runs with the memory system's state (several GB of tables
alive with --blocks): compare figures from one run. The AdamW update of
the value table alone is timed separately, as is allocating and zeroing a table-sized buffer (the dense
gradient dV that the layer's backward must return; the rest of its backward does not grow with N).

Two properties of a CPU host's default memory system dominate the large tables and are not what an
accelerator does: glibc hands every freed buffer above 32 MB back to the OS, so each step page-faults
its fresh gradient buffer (about 0.25 s per GB here), and 4 KB pages make the scattered row reads and
writes of a 2 GB table TLB-bound (a sorted scatter of 262K rows: 570 ms, 110 ms on huge pages).
Accelerator allocators keep their memory and map it with large pages. By default this script re-runs
itself with glibc told to do the same (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_, and
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for transparent huge pages, glibc >= 2.35); the header says which.
--allocator system measures the default behaviour.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import study  # noqa: E402  (experiments/, the directory of this script)

_KEEP_FREED = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 46),
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--v_dim", type=int, default=512)
    parser.add_argument("--k_dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--n_keys", default="128,512,1024", help="comma-separated; slots = n_keys^2")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--blocks", action="store_true", help="also time whole blocks (attention included)")
    parser.add_argument("--allocator", choices=("keep", "system"), default="keep")
    return parser.parse_args()


def main():
    args = parse_args()
    if args.allocator == "keep" and any(os.environ.get(k) != v for k, v in _KEEP_FREED.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_KEEP_FREED})

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from tqdm import tqdm

    from memjax.config import base_config
    from memjax.memory import pkm
    from memjax.models import attention, layers

    def model_config(n_keys: int, d_ff: int = 0):
        cfg = base_config()
        m = cfg.model
        m.d_model, m.num_heads, m.num_layers, m.d_ff = args.d_model, max(args.d_model // 128, 1), 1, d_ff
        m.pkm.heads, m.pkm.k, m.pkm.n_keys, m.pkm.k_dim, m.pkm.v_dim = (
            args.heads, args.k, n_keys, args.k_dim, args.v_dim)
        return m

    class MemoryLayer(nnx.Module):
        def __init__(self, m, rngs):
            self.norm = layers.RMSNorm(m.d_model, eps=m.norm_eps, dtype=jnp.float32)
            self.memory = pkm.ProductKeyMemory(m, pkm.ValueTable(m, rngs=rngs), rngs=rngs)

        def __call__(self, x):
            return x + self.memory(self.norm(x))

    class DenseLayer(nnx.Module):
        def __init__(self, m, rngs):
            self.norm = layers.RMSNorm(m.d_model, eps=m.norm_eps, dtype=jnp.float32)
            self.mlp = layers.SwiGLU(m.d_model, m.d_ff, std=0.02, out_std=0.02, dtype=jnp.float32, rngs=rngs)

        def __call__(self, x):
            return x + self.mlp(self.norm(x))

    class Block(nnx.Module):
        def __init__(self, cls, m, rngs):
            self.block = cls(m, 0, shared=cls.make_shared(m, rngs=rngs), rngs=rngs)

        def __call__(self, x):
            return self.block(x)[0]

    x = jax.random.normal(jax.random.key(1), (args.batch, args.seq_len, args.d_model), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

    def median_time(fn, *inputs):
        for _ in range(args.warmup):
            jax.block_until_ready(fn(*inputs))
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def forward_backward(module, table_gradient: bool = True):
        """(jitted step, its inputs). With table_gradient=False the value table is a constant: no dense dV
        is formed (isolates the work of the layer itself from the table-sized gradient buffer)."""
        graphdef, table, params = nnx.split(module, nnx.PathContains("values"), nnx.Param)

        def loss(params, table, x):
            return jnp.sum(nnx.merge(graphdef, table, params)(x) * cotangent)

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2) if table_gradient else (0, 2))), (params, table, x)

    def interleaved_times(steps: dict) -> dict:
        """Seconds of each step per round: every round times every step in turn, so a change of the
        machine's speed during the benchmark (other load) hits all of them alike and the ratios of one
        round stay comparable. Each timed run follows an untimed run of the same step: steady state, as
        in training, not the caches and heap that the previous step left."""
        for fn, inputs in steps.values():
            for _ in range(args.warmup):
                jax.block_until_ready(fn(*inputs))
        times = {name: [] for name in steps}
        for _ in tqdm(range(args.runs), desc="timing rounds", leave=False):
            for name, (fn, inputs) in steps.items():
                jax.block_until_ready(fn(*inputs))
                start = time.perf_counter()
                jax.block_until_ready(fn(*inputs))
                times[name].append(time.perf_counter() - start)
        return times

    def table_update_time(n: int, v: int) -> tuple[float, float]:
        """AdamW update of an [n, v] table (donated state), and allocating + zeroing an [n, v] buffer."""
        tx = optax.adamw(1e-3, weight_decay=0.0)
        table = jnp.zeros((n, v), jnp.float32)
        grad = jnp.full((n, v), 1e-3, jnp.float32)
        state = tx.init(table)

        def update(table, state, grad):
            updates, state = tx.update(grad, state, table)
            return optax.apply_updates(table, updates), state

        update = jax.jit(update, donate_argnums=(0, 1))
        for _ in range(args.warmup):
            table, state = update(table, state, grad)
        jax.block_until_ready(table)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            table, state = update(table, state, grad)
            jax.block_until_ready(table)
            times.append(time.perf_counter() - start)
        del table, state
        zeros = jax.jit(lambda g: jnp.zeros_like(g).at[0, 0].add(g[0, 0]))
        return statistics.median(times), median_time(zeros, grad)

    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; "
          f"allocator: {'keeps freed memory, huge pages' if args.allocator == 'keep' else 'system default'}")
    print(f"d_model={args.d_model} v_dim={args.v_dim} k_dim={args.k_dim} heads={args.heads} k={args.k} "
          f"tokens={args.batch}x{args.seq_len}; median of {args.runs} interleaved rounds after {args.warmup} "
          f"warm-up runs\n")

    sizes = [int(n) for n in args.n_keys.split(",")]
    d_ff = study.matched_swiglu_width(model_config(sizes[-1]))
    dense_cfg = model_config(sizes[0], d_ff=d_ff)
    steps = {}  # (what, size) -> (jitted step, inputs); size = n_keys, or "dense"
    for n in sizes:
        layer = MemoryLayer(model_config(n), nnx.Rngs(params=0))
        steps["layer", n] = forward_backward(layer)
        steps["no-dV", n] = forward_backward(layer, table_gradient=False)  # the same arrays
        if args.blocks:
            steps["block", n] = forward_backward(Block(pkm.ProductKeyMemoryBlock, model_config(n), nnx.Rngs(params=0)))
    steps["layer", "dense"] = forward_backward(DenseLayer(dense_cfg, nnx.Rngs(params=0)))
    if args.blocks:
        steps["block", "dense"] = forward_backward(Block(attention.FullAttention, dense_cfg, nnx.Rngs(params=0)))
    times = interleaved_times(steps)
    del steps

    def ms(what, size):
        return statistics.median(times[what, size]) * 1e3

    def vs_base(what, size):
        """Median over rounds of this step's time / the smallest table's in the same round."""
        return statistics.median(t / t0 for t, t0 in zip(times[what, size], times[what, sizes[0]]))

    header = f"{'layer':<24}{'fwd MFLOP/tok':>14}{'fwd+bwd ms':>12}{'vs 16K':>8}"
    header += f"{'block ms':>10}{'vs 16K':>8}" if args.blocks else ""
    header += f"{'no-dV ms':>10}{'vs 16K':>8}{'AdamW(V) ms':>13}{'zero dV ms':>12}"
    print(header)
    for n in [*sizes, "dense"]:
        if n == "dense":
            line = f"{f'SwiGLU d_ff={d_ff:>6}':<24}{6.0 * args.d_model * d_ff / 1e6:>14.2f}"
        else:
            line = f"{f'memory {n * n:>9,} slots':<24}{study.pkm_forward_flops(model_config(n)) / 1e6:>14.2f}"
        line += f"{ms('layer', n):>12.1f}{vs_base('layer', n):>8.2f}"
        if args.blocks:
            line += f"{ms('block', n):>10.1f}{vs_base('block', n):>8.2f}"
        if n != "dense":
            update_s, zero_s = table_update_time(n * n, pkm.value_dim(model_config(n)))
            line += f"{ms('no-dV', n):>10.1f}{vs_base('no-dV', n):>8.2f}{update_s * 1e3:>13.1f}{zero_s * 1e3:>12.1f}"
        print(line)
    print(f"\n1M-slot / 16K-slot memory layer: {vs_base('layer', sizes[-1]):.2f}x (target <= 1.5x); without the "
          f"dense table gradient: {vs_base('no-dV', sizes[-1]):.2f}x; SwiGLU with the 1M layer's FLOPs: "
          f"{vs_base('layer', 'dense'):.2f}x (medians of per-round ratios)")


if __name__ == "__main__":
    main()
