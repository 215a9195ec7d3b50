"""Quickstart with the Titans neural memory alone (LMM, no attention: the paper's memory-only model):
the quickstart's 4 layers, each x + Memory(norm x) then the SwiGLU FFN, on the embedded corpus on CPU.
Step time 0.44 s vs the quickstart's 0.30 s (9,400 vs 13,500 tokens/s, measured on 2 CPU cores shared
with another job); the 1200 steps with their evaluations took 14 minutes there (eval loss 1.51).

The memory settings (MEMORY below, shared by every Titans config here) keep the inner loop stable.
Inside a chunk of C tokens every inner gradient is taken at the chunk-start weights, and momentum (eta
~0.9) adds them up, so one chunk moves the memory by about theta x C^2/2 gradients; for a linear memory
with L2-normalised keys the curvature is at most 1 per token, so theta <= 0.01 (the blocks' registered
maximum) keeps that step under 2 at C = 16. The registered memory is the paper's deep one (a 2-layer MLP):
its curvature grows with its weights, which must grow to fit values of any scale, so it diverged in
training even at theta_max = 0.01 (measured: NaN at step 72 of MAG). The deep memory is one override
away: --config.model.titans_lmm.memory_depth=2 (with a smaller chunk or theta_max).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402

# The inner loop's settings shared by the Titans configs (see the docstring).
MEMORY = {
    "memory_depth": 1,  # linear memory: curvature <= ||k||^2 = 1 whatever the values' scale
    "chunk": 16,
    "theta_max": 0.01,  # theta = theta_max * sigmoid(.): at most 0.01 per token
    "theta_init": 0.005,
}


def titans_quickstart(block: str, steps: int, pattern: str = ""):
    """The quickstart model with `block` (in every layer, or as `pattern` says) and MEMORY."""
    cfg = quickstart_config()
    cfg.model.block_pattern = pattern or block
    p = cfg.model[block]
    p.update(MEMORY)
    p.heads = 4  # memory heads of width 32
    p.window = 64  # MAG / MAL: local attention, as in configs/swa_quickstart.py
    p.segment = 64  # MAC
    cfg.train.steps = steps
    cfg.train.checkpoint_every = 200
    return cfg


def get_config():
    return titans_quickstart("titans_lmm", steps=1200)
