"""Paper-shaped HOPE (Behrouz et al., "Nested Learning", NeurIPS 2025), ~760M parameters.

Sources of the numbers:
- Size and budget: the paper's language-modelling comparison at 760M parameters trained on 30B tokens
  (and 1.3B on 100B: configs/hope_1p3b.py), with the Titans / ATLAS training recipe (4K context, AdamW
  4e-4 cosine, weight decay 0.1, BPE with a 32,768-token vocabulary: configs/titans_170m.py's
  `paper_recipe`, 0.5M tokens per step). 30B tokens = 57,000 steps of 128 x 4096.
- Shape: the Transformer++ 760M of that lineage (Gated DeltaNet, Titans, ATLAS baselines; Mamba's
  table of GPT-3 shapes): d_model 1536, 24 layers. A HOPE layer holds about 13 d_model^2 parameters
  (W_in, the output gate and projection 3, the CMS levels' SwiGLU widths 8, the two in-context levels'
  value maps 2) against a Transformer layer's 12, so 24 layers would be 815M: 22 keep the count at the
  name (752M, counted with factory.abstract). Memory heads of width 128 (12 heads), as the Titans
  configs here.
- Not in the paper (our choices, see memjax/memory/hope.py): the CMS levels (one updated every 64
  tokens, one every 512, one static, together the SwiGLU FFN's width, so that the chain has a
  Transformer++ FFN's parameters), the chunk of 64 with 8 chunks per remat group (per-sequence fast
  weights of every memory are carried through the chunk scan; the backward stores one copy per group),
  and the inner step sizes of configs/hope_quickstart.py.

Per-chip memory (`python -m memjax.aot --config configs/hope_760m.py --topology v4:4x4x4`, from a CPU
host): FSDP over 64 chips, 2 sequences of 4096 per chip per step. In one micro-batch the compiler's peak
is 46.3 GiB against 30.75 GiB of HBM (the per-sequence fast weights of every memory and level dominate),
so this config takes the step in 2 micro-batches (train.grad_accum_steps = 2, the same 128-sequence
step): 25.16 GiB, 82% of HBM (compile 1130 s).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from hope_quickstart import HOPE  # noqa: E402
from titans_170m import paper_recipe  # noqa: E402

from memjax.config import base_config  # noqa: E402


def paper_config(d_model: int, num_layers: int, num_heads: int, tokens: float):
    cfg = base_config()
    m = cfg.model
    m.d_model, m.num_layers, m.num_heads = d_model, num_layers, num_heads
    m.block_pattern = "hope"
    m.dtype = "bfloat16"
    m.hope.update({**HOPE, "heads": d_model // 128, "chunk": 64, "remat_chunks": 8, "cms_chunks": "64,512,0"})
    paper_recipe(cfg)
    cfg.train.steps = int(round(tokens / (cfg.train.batch_size * cfg.train.seq_len), -3))
    return cfg


def get_config():
    cfg = paper_config(d_model=1536, num_layers=22, num_heads=16, tokens=30e9)
    cfg.train.grad_accum_steps = 2  # one sequence per v4 chip per micro-batch: see the docstring
    return cfg
