"""Paper-shaped ATLAS (Behrouz et al. 2025, arXiv 2505.23735), ~350M parameters: the atlas block (Omega
rule over c = 4 tokens, Muon inner optimizer with 5 Newton-Schulz steps, degree-2 polynomial features,
memory x + W1 s(W2 x)) alone (hybrid "none", no attention) in 22 layers of a d_model = 1024 decoder,
4K context, BPE with a 32,768-token vocabulary, AdamW lr 4e-4 cosine, weight decay 0.1, bfloat16 compute.

Memory heads: 64 of width 16, so that phi's width is 1 + 16 + 16^2 = 273 (16 heads of width 64 would give
4,161 features per head, 415M parameters of initial memory state alone and ~6.6e12 FLOPs per token), and
memory_expansion 2 (hidden width 32), which keeps Muon's per-token Newton-Schulz work (on each update's
32 x 32 Gram, ns_form "gram") at 1.8e9 forward FLOPs per token in all layers (the expansion-4 default:
1.3e10; Newton-Schulz on the formed updates, ns_form "matrix": 8.6e9 and 3.6e10; engine.engine_flops).
354M parameters (counted with factory.abstract); 22 layers rather than the Transformer++ 340M shape's 24
(383M) keep the count at the name.

This file also holds `paper_config`, the shared shape of the paper-sized Miras configs
(moneta_340m.py, yaad_340m.py, memora_340m.py). Meant for accelerators: 30,000 steps of 128 x 4096 tokens
(15.7B tokens, the papers' budget for this size). `--config.model.atlas.hybrid=mag` (or mal, mac) gives the
hybrids with sliding-window attention (window 512), `--config.model.atlas.memory=gated` Atlas++.

Per chip (`python -m memjax.aot --config configs/atlas_340m.py --topology v5p:4x4x4`, from a CPU host;
FSDP over 64 chips, 2 sequences of 4096 per chip): 89.9 of 95.74 GiB on v5p (fits, 94%). On v4:4x4x4 the
compiler needs 72.5 GiB against 30.75 (78.1 with ns_form "matrix"): it does not fit in one micro-batch;
more micro-batches (train.grad_accum_steps) were not compiled."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from titans_170m import paper_recipe  # noqa: E402

from memjax.config import base_config  # noqa: E402


def paper_config(block: str, num_layers: int = 22, **memory):
    """d_model 1024, `num_layers` layers of `block` (its settings updated with `memory`), 16 attention
    heads (used by the hybrids), 4K context, BPE 32,768, AdamW 4e-4 cosine, wd 0.1, bfloat16."""
    cfg = base_config()
    m = cfg.model
    m.d_model, m.num_layers, m.num_heads = 1024, num_layers, 16
    m.block_pattern = block
    m.dtype = "bfloat16"
    m[block].hybrid = "none"
    m[block].window = 512  # sliding-window attention of the mag / mal hybrids
    m[block].segment = 512  # mac segments
    m[block].update(memory)
    paper_recipe(cfg)
    return cfg


def get_config():
    return paper_config("atlas", heads=64, memory_expansion=2)
