"""Peak host memory of evaluating one long input segment by segment, as the input grows.

    python experiments/segment_eval_memory.py [--lengths 4096,16384,65536 --segment 512 \
        --models titans_lmm,lm2,hmt --one_call titans_lmm] [--csv PATH]

Each measurement runs in a fresh process: build a small model (d_model 64, 2 layers, byte vocabulary),
then score a random input of N tokens with memjax.segments.long_nats (one jitted segment step, the
model's carry between segments) and report the process's peak resident memory (ru_maxrss). On CPU the
device memory is host memory, so this is the number that must stay flat in N. For contrast, --one_call
models are also scored in a single call on the whole input (activations grow with N).

Models: a registered block name (in every layer), or "hmt" (HMT around the attention decoder).
Output: a table and the ratio of the peak at the longest vs the shortest length per model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import study  # experiments/, this script's directory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(name: str, segment: int):
    from memjax.config import base_config

    cfg = base_config()
    m = cfg.model
    m.d_model, m.num_layers, m.num_heads = 64, 2, 2
    cfg.train.seq_len = segment
    if name == "hmt":
        m.block_pattern = "attention"
        m.hmt.enabled = True
        m.hmt.segment_len = segment
    else:
        m.block_pattern = name
        if "chunk" in m[name]:
            m[name].chunk = 16
    return cfg


def measure(name: str, length: int, segment: int, one_call: bool) -> dict:
    """In this process: peak RSS (MiB) of scoring `length` tokens."""
    import resource

    import jax
    import numpy as np
    from flax import nnx

    from memjax import config, segments
    from memjax.models import factory

    cfg = model_config(name, segment)
    config.validate(cfg)
    graphdef, params = factory.build(cfg.model, 256, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 256, (1, length + 1), dtype=np.int32)
    if one_call:
        logits, _ = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, ids[:, :-1])
        nats = np.asarray(jax.nn.logsumexp(logits, -1))
    else:
        nats = segments.long_nats(graphdef, params, ids, segment)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": name, "length": length, "mode": "one call" if one_call else "segments",
            "peak_rss_mib": round(peak_mib, 1), "finite": bool(np.isfinite(nats).all())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--models", default="titans_lmm,lm2,hmt")
    parser.add_argument("--one_call", default="titans_lmm", help="models also scored in one call (may be '')")
    parser.add_argument("--csv", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement, printed as JSON for the parent
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return

    lengths = [int(x) for x in args.lengths.split(",")]
    jobs = [(m, n, False) for m in args.models.split(",") if m for n in lengths]
    jobs += [(m, n, True) for m in args.one_call.split(",") if m for n in lengths]
    rows = []
    print(f"{'model':<12}{'mode':<10}{'tokens':>9}{'peak RSS MiB':>14}")
    for name, length, one_call in jobs:
        spec = json.dumps({"name": name, "length": length, "segment": args.segment, "one_call": one_call})
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if proc.returncode:
            print(f"{name:<12}{'one call' if one_call else 'segments':<10}{length:>9}   failed: "
                  f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:<12}{row['mode']:<10}{length:>9,}{row['peak_rss_mib']:>14,.1f}", flush=True)

    print(f"\npeak at {lengths[-1]:,} vs {lengths[0]:,} tokens:")
    for name in dict.fromkeys(r["model"] for r in rows):
        for mode in ("segments", "one call"):
            peaks = {r["length"]: r["peak_rss_mib"] for r in rows if r["model"] == name and r["mode"] == mode}
            if lengths[0] in peaks and lengths[-1] in peaks:
                print(f"  {name:<12}{mode:<10}{peaks[lengths[-1]] / peaks[lengths[0]]:>7.2f}x")
    if args.csv:
        print(f"wrote {study.write_csv(args.csv, rows)}")


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
