"""Quickstart with HOPE (Nested Learning, Behrouz et al. 2025): the quickstart's 4 layers (d_model 128),
each x + SelfModifyingTitans(norm x) then a continuum memory system of three SwiGLU levels (width 128
each, together the quickstart FFN's 384): one updated in context every 16 tokens, one every 64, one
static; on the embedded corpus on CPU. See memjax/memory/hope.py for the block and its choices.

Inner-loop stability: the self-modifying Titans has no momentum (the paper's delta gradient descent), so
a chunk of C tokens moves a memory by at most theta_max x C gradients taken at the chunk start; with
L2-normalised keys a linear memory's curvature is at most 1 per token, so theta_max = 0.05 at C = 16
keeps a chunk's step under 1. The memories here are linear with the residual (x + x W): the registered
deep ones (x + W1 GELU(W2 x), the paper's) have a curvature that grows with their weights, as
configs/titans_lmm_quickstart.py found for Titans. The CMS levels' step is cms_theta_max / d_model per
token (their keys are RMS-normalised, ||k||^2 = d_model), 0.05 x 16 tokens at the fastest level.
A first run with deep memories, cms_theta_max = 0.01 without the 1 / d_model (an inner step of 1.3 per
token at the keys' scale) went non-finite at step 51 (loss 5.04 at step 10, 2.65 at step 40).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402

HOPE = {
    "heads": 4,  # memory heads of width 32
    "memory_depth": 1,  # linear memories with the residual: M(x) = x + x W (see the docstring)
    "projection_depth": 1,
    "chunk": 16,
    "theta_max": 0.05,
    "theta_init": 0.01,
    "cms_chunks": "16,64,0",
    "cms_theta_max": 0.05,
    "cms_theta_init": 0.01,
}


def get_config():
    cfg = quickstart_config()
    cfg.model.block_pattern = "hope"
    cfg.model.hope.update(HOPE)
    cfg.train.checkpoint_every = 200
    return cfg
