"""Paper-shaped Moneta (Behrouz et al. 2025, "It's All Connected", arXiv 2504.13173), ~350M parameters: the
moneta block (the l_3 attentional bias (objective lp, p = 3), gradient descent, q-norm retention (q = 4) and
the memory x + LN(W1 s(W2 x))) alone (hybrid "none", no attention) in 22 layers of a d_model = 1024 decoder,
with 16 memory heads of width 64 (expansion 4: hidden width 256), 4K context, BPE with a 32,768-token
vocabulary, AdamW lr 4e-4 cosine, weight decay 0.1, bfloat16 compute. 347,844,640 parameters (counted with
factory.abstract); 22 layers rather than the Transformer++ 340M shape's 24 (376M) keep the count at the name. The
shape is atlas_340m.paper_config's. Meant for accelerators: 30,000 steps of 128 x 4096 tokens (15.7B tokens,
the paper's budget for this size)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from atlas_340m import paper_config  # noqa: E402


def get_config():
    return paper_config("moneta", heads=16)
