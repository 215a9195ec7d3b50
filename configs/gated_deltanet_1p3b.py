"""Paper-shaped Gated DeltaNet (arXiv 2412.06464), ~1.3B parameters: 21 layers of d_model = 2048 with 6
heads of key width 256 and value width 512 (fla's default GatedDeltaNetConfig, the paper's 1.3B shape),
1.31B parameters with the 32,768-token BPE vocabulary (factory.abstract). Trained for 100B tokens as in
the paper: 190,000 steps of 128 x 4096 tokens; the rest of the recipe as configs/gated_deltanet_340m.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from gated_deltanet_340m import paper_config  # noqa: E402


def get_config():
    cfg = paper_config(d_model=2048, num_layers=21)
    cfg.train.steps = 190_000  # 99.6B tokens
    return cfg
