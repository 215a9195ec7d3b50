"""Paper-shaped Titans (Behrouz et al. 2025, arXiv 2501.00663), ~340M parameters: the MAG hybrid in all
16 layers of a d_model = 1024 decoder with 16 attention heads and 8 memory heads of width 128; 4K
context, BPE with a 32,768-token vocabulary, AdamW lr 4e-4 cosine, weight decay 0.1, bfloat16 compute.
339M parameters (counted with factory.abstract). A MAG layer holds about 18 d_model^2 parameters (attention
4, the memory's projections 5, the gate's mix 1, the SwiGLU FFN 8) against a Transformer layer's 12, so
the Transformer++ 340M shape (24 layers) would be 492M: 16 layers keep the count at the name.
Memory settings, the variants and
the schedule as in configs/titans_170m.py."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from titans_170m import paper_config  # noqa: E402


def get_config():
    return paper_config(d_model=1024, num_layers=16, num_heads=16, memory_heads=8)
