"""Quickstart Moneta (Miras, arXiv 2504.13173) alone: the quickstart's 4 layers, each x + Memory(norm x)
then the SwiGLU FFN, no attention (hybrid "none", the paper's attention-free model), with the registered
moneta memory (x + LN(W1 s(W2 x)), the l_3 attentional bias, gradient descent, q-norm retention q = 4)
over 8 memory heads of width 16 (expansion 2: hidden width 32; the defaults' 4 heads x expansion 4 take
2.4x as long per step), on the embedded corpus on CPU.
Step time about 1.3 s (100 steps with `--config.train.steps=100 --config.optim.warmup_steps=20`, on 2
CPU cores shared with a test run; the quickstart Transformer takes 0.3 s on quiet cores): train loss 4.93
over steps 1-20, 3.69 over steps 81-100, eval loss 3.62 at step 100. The 1000 steps here take ~25 minutes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402


def miras_quickstart(block: str, memory_expansion: int, steps: int):
    """The quickstart model with `block` alone in every layer: 8 memory heads of width 16, chunk 16.
    Shared by the Moneta, Yaad and Memora quickstarts."""
    cfg = quickstart_config()
    cfg.model.block_pattern = block
    p = cfg.model[block]
    p.hybrid = "none"
    p.heads = 8
    p.memory_expansion = memory_expansion
    p.chunk = 16
    cfg.train.steps = steps
    return cfg


def get_config():
    return miras_quickstart("moneta", memory_expansion=2, steps=1000)
