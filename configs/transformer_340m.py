"""The Transformer++ baseline of the paper-shaped memory configs, ~340M parameters: 24 layers of full
causal attention (RoPE) + SwiGLU FFN, d_model = 1024, 16 heads; 4K context, BPE with a 32,768-token
vocabulary, AdamW lr 4e-4 cosine, weight decay 0.1, bfloat16 compute (the recipe of configs/titans_340m.py,
titans_170m.paper_recipe). 337M parameters (counted with factory.abstract). Meant for accelerators: 30,000
steps of 128 x 4096 tokens (15.7B tokens)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from titans_170m import paper_recipe  # noqa: E402

from memjax.config import base_config  # noqa: E402


def get_config():
    cfg = base_config()
    m = cfg.model
    m.d_model, m.num_layers, m.num_heads = 1024, 24, 16
    m.block_pattern = "attention"
    m.dtype = "bfloat16"
    paper_recipe(cfg)
    return cfg
