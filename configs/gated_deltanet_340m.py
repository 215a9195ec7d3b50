"""Paper-shaped Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, arXiv 2412.06464), ~340M parameters: 21
layers of d_model = 1024, each x + GatedDeltaNet(norm x) then the SwiGLU FFN.

The layer's shape is the paper's (as its reference code, fla's GatedDeltaNet, sets it): keys of head width
256 over 0.75 d_model (here 3 heads), values twice as wide (512 per head), conv kernel 4, output gate and
per-head RMSNorm; about 6 d_model^2 parameters per mixer against the FFN's 8. 21 layers (fla's default
GatedDeltaNetConfig depth) give 343M parameters with the 32,768-token BPE vocabulary (counted with
factory.abstract; 24 layers would be 387M).
The training recipe is the repository's paper-shaped one (configs/titans_170m.py `paper_recipe`: 4K
context, 0.5M tokens per step, AdamW lr 4e-4 cosine, weight decay 0.1, 15.7B tokens), bfloat16 compute.
GDN-H1 (interleaved sliding-window attention): --config.model.block_pattern=gated_deltanet,swa.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from titans_170m import paper_recipe  # noqa: E402

from memjax.config import base_config  # noqa: E402

BLOCKS = ("gated_deltanet", "deltanet", "deltaproduct")


def paper_config(d_model: int, num_layers: int):
    """d_model and depth; the mixer's shape (keys 0.75 d_model in heads of 256, values 2x) set alike for
    the three registrations, so `--config.model.block_pattern=deltanet` (or deltaproduct) switches."""
    cfg = base_config()
    m = cfg.model
    m.d_model, m.num_layers = d_model, num_layers
    m.num_heads = d_model // 128  # only the "swa" hybrid or an interleaved attention layer uses these
    m.block_pattern = "gated_deltanet"
    m.dtype = "bfloat16"
    for name in BLOCKS:
        p = m[name]
        p.head_dim = 256
        p.heads = 3 * d_model // 4 // p.head_dim
        p.value_expansion = 2
        p.chunk = 64
        p.window = 2048  # GDN-H1's sliding window
    m.swa.window = 2048
    paper_recipe(cfg)
    return cfg


def get_config():
    return paper_config(d_model=1024, num_layers=21)
