"""Paper-shaped Titans (Behrouz et al. 2025, arXiv 2501.00663), ~170M parameters: the MAG hybrid
(sliding-window attention, window 512, gated by the neural memory) in all 13 layers of a d_model = 768
decoder with 12 attention heads and 6 memory heads of width 128; 4K context, BPE with a 32,768-token
vocabulary, AdamW lr 4e-4 cosine, weight decay 0.1, bfloat16 compute. 165M parameters (counted with
factory.abstract; 12 layers would be 154M). Meant for accelerators: 30,000 steps of 128 x 4096 tokens
(15.7B tokens, the paper's budget at this size).

The memory is configs/titans_lmm_quickstart.py's MEMORY: a linear memory with theta <= 0.01, because
the registered deep memory (a 2-layer MLP) diverged in training (see that file).
The paper's deep memory: --config.model.titans_mag.memory_depth=2 (not shown to train stably here).
`--config.model.block_pattern=titans_mac` (or titans_mal, titans_lmm) switches the variant: all four
are set alike below."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from titans_lmm_quickstart import MEMORY  # noqa: E402

from memjax.config import base_config  # noqa: E402

VARIANTS = ("titans_lmm", "titans_mag", "titans_mal", "titans_mac")


def paper_recipe(cfg) -> None:
    """The training recipe of the paper-shaped memory configs (Titans, ATLAS/Miras, LM2 here): 4K context,
    128 x 4096 tokens per step for 30,000 steps (15.7B tokens), AdamW lr 4e-4 cosine with 2,000 warm-up
    steps, weight decay 0.1, BPE with 32,768 tokens."""
    cfg.train.seq_len = 4096
    cfg.train.batch_size = 128  # 0.5M tokens per step
    cfg.train.steps = 30_000
    cfg.train.log_every = 50
    cfg.train.eval_every = 1000
    cfg.train.eval_batches = 16
    cfg.train.checkpoint_every = 1000
    cfg.optim.lr = 4e-4
    cfg.optim.schedule = "cosine"
    cfg.optim.warmup_steps = 2000
    cfg.optim.weight_decay = 0.1
    cfg.data.tokenizer = "bpe"
    cfg.data.bpe_vocab_size = 32768


def paper_config(d_model: int, num_layers: int, num_heads: int, memory_heads: int):
    cfg = base_config()
    m = cfg.model
    m.d_model, m.num_layers, m.num_heads = d_model, num_layers, num_heads
    m.block_pattern = "titans_mag"
    m.dtype = "bfloat16"
    for name in VARIANTS:
        p = m[name]
        p.update(MEMORY)
        p.heads = memory_heads
        p.window = 512  # sliding-window attention of MAG / MAL
        p.segment = 512  # MAC
    paper_recipe(cfg)
    return cfg


def get_config():
    return paper_config(d_model=768, num_layers=13, num_heads=12, memory_heads=6)
