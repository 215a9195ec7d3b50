"""Quickstart with Gated DeltaNet (memjax.memory.deltanet) in every layer: the quickstart's 4 layers of
d_model = 128, each x + GatedDeltaNet(norm x) then the SwiGLU FFN, 4 heads of key and value width 32,
on the embedded corpus on CPU. `deltanet_quickstart.py` and `deltaproduct_quickstart.py` are the same
model with the other two registrations of the block."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402


def delta_quickstart(block: str, steps: int = 1200):
    """The quickstart model with `block` in every layer, 4 heads, chunks of 64 tokens."""
    cfg = quickstart_config()
    cfg.model.block_pattern = block
    p = cfg.model[block]
    p.heads = 4
    p.chunk = 64
    cfg.train.steps = steps
    cfg.train.checkpoint_every = 200
    return cfg


def get_config():
    return delta_quickstart("gated_deltanet")
