"""Training throughput and achieved/peak FLOP ratio of a config, measured side by side in one run.

`python -m memjax.benchmark --config configs/bench_512x6.py [--steps 20] [--config.train.batch_size=8]`

The train step runs on random tokens (no input pipeline in the measurement). After warm-up it times
`--steps` steps (median, each synchronised), and interleaves timings of a float32 matmul to measure the
device peak in the same process (on accelerators the data-sheet peak is printed too).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from memjax import config, flops, parallel, trainer
from memjax.data import ByteTokenizer
from memjax.models import factory


def benchmark(cfg, steps: int = 20, warmup: int = 3) -> dict[str, float]:
    run = trainer.setup(cfg, None, tokenizer=ByteTokenizer())
    with jax.set_mesh(run.mesh):
        return _benchmark(run, steps, warmup)


def _benchmark(run, steps: int, warmup: int) -> dict[str, float]:
    cfg, vocab = run.cfg, run.vocab_size
    state = trainer.initial_state(run)
    step_fn = trainer.make_train_step(run)
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch = {"inputs": rng.integers(0, 256, shape, dtype=np.int32),
             "targets": rng.integers(0, 256, shape, dtype=np.int32)}
    batch = parallel.global_batch(batch, run.mesh)
    for _ in range(warmup):
        state, stats = step_fn(state, batch)
    jax.block_until_ready(state)

    step_times, peaks = [], []
    for i in range(steps):
        start = time.perf_counter()
        state, stats = step_fn(state, batch)
        jax.block_until_ready((state, stats))
        step_times.append(time.perf_counter() - start)
        if i % 4 == 0:  # interleaved, so both see the same machine conditions
            peaks.append(flops.measure_matmul_peak(repeats=3))
    step_time = statistics.median(step_times)
    tokens_per_sec = cfg.train.batch_size * cfg.train.seq_len / step_time
    flops_per_token = factory.flops_per_token(cfg.model, vocab, cfg.train.seq_len)
    measured_peak = max(peaks) * run.mesh.size
    achieved = tokens_per_sec * flops_per_token
    result = {
        "params": float(factory.count_params(state["params"])),
        "step_time_s": step_time,
        "tokens_per_sec": tokens_per_sec,
        "model_flops_per_token": flops_per_token,
        "achieved_flops_per_sec": achieved,
        "measured_matmul_peak": measured_peak,
        "achieved_over_measured_peak": achieved / measured_peak,
    }
    if jax.devices()[0].platform != "cpu":
        table_peak, source = flops.device_peak(cfg.model.dtype)
        result["datasheet_peak"] = table_peak * run.mesh.size
        result["mfu_vs_datasheet"] = achieved / result["datasheet_peak"]
    return result


def _flags() -> tuple:
    """Defined when the CLI runs, not at import (see memjax.train._flags)."""
    config_file = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    steps = flags.DEFINE_integer("steps", 20, "Timed steps (median is reported).")
    warmup = flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation included).")
    flags.mark_flags_as_required(["config"])
    return config_file, steps, warmup


def main(argv, flag_values) -> None:
    del argv
    config_file, steps, warmup = flag_values
    cfg = config_file.value
    m, t = cfg.model, cfg.train
    print(f"benchmark: d_model={m.d_model} layers={m.num_layers} heads={m.num_heads} blocks={m.block_pattern} "
          f"T={t.seq_len} batch={t.batch_size} dtype={m.dtype} "
          f"on {jax.device_count()} x {jax.devices()[0].device_kind}")
    result = benchmark(cfg, steps.value, warmup.value)
    width = max(map(len, result))
    for name, value in result.items():
        print(f"  {name:<{width}}  {value:.4g}")


if __name__ == "__main__":
    _FLAG_VALUES = _flags()
    app.run(lambda argv: main(argv, _FLAG_VALUES), flags_parser=config.parse_command_line)
