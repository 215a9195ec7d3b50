"""Paper-shaped LM2 (Kang et al. 2025, "Large Memory Models", arXiv 2502.06049): a Llama-3.2-1B-shaped decoder
(16 layers, d_model 2048, 32 heads, SwiGLU width 8192, RoPE) with the LM2 memory in every layer: 2048 slots
of width 2048 read by 32 heads of width 64, written after every 1024-token segment (4 per 4K row).
BPE with a 32,768-token vocabulary (Llama 3.2's is 128,256), 4K context, bfloat16 compute.

What is the paper's and what is not: the decoder shape is Llama-3.2-1B's, which the paper builds on,
without grouped-query attention (memjax's attention has as many key/value heads as query heads) and with a
smaller vocabulary. The bank of 2048 slots of width d_model = 2048 with identity-like rows follows the
paper's description of the memory (N slots of width d_model, identity initialisation); its experimental
section (slot count, training data and schedule) could not be consulted here, so the slot count is an
assumption to check against the paper, and the optimisation settings below are the project's usual ones
for paper-shaped configs (as configs/titans_340m.py), not the paper's.

Size: 1.94B parameters (counted with factory.abstract): the Llama-shaped decoder 1.14B (67M of it the
embedding), the memory 50.3M per layer, of which M0 holds 4.2M and the projections 11 d_model^2: the read
(W_Q, W_K, W_V, W_proj, W_out: 5), the write's own cross-attention (W_q^s, W_k^s, W_v^s, W_u: 4) and the
K x K input and forget gates (2). The reference code writes from a mean over the sequence instead of the
causal write attention, which is why it is lighter than this (see memjax/memory/lm2.py).

Training FLOPs per token (factory.flops_per_token at 4K): 6 x 1.88B matmul parameters = 11.3G, attention scores
1.6G, the memory's read and write attention 1.6G, and 2.4G for the slot-side projections, which move all
2048 slot rows through K x d_model maps once per segment: 2 rows per token at segment 1024 (512 would
double that term); 16.9G in all, M0 left out of the 6N term (it is no matmul).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from titans_170m import paper_recipe  # noqa: E402

from memjax.config import base_config  # noqa: E402


def get_config():
    cfg = base_config()
    m = cfg.model
    m.d_model, m.num_layers, m.num_heads, m.d_ff = 2048, 16, 32, 8192
    m.rope_base = 500_000.0  # Llama 3's
    m.block_pattern = "lm2"
    m.dtype = "bfloat16"
    p = m.lm2
    p.slots = 2048
    p.slot_width = 2048
    p.heads = 32
    p.segment = 1024  # 2 slot rows per token through the slot-side projections (see the docstring)
    paper_recipe(cfg)
    return cfg
