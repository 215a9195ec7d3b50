"""Quickstart Memora (Miras, arXiv 2504.13173) alone: the quickstart's 4 layers, each x + Memory(norm x)
then the SwiGLU FFN, no attention (hybrid "none", the paper's attention-free model), with the registered
memora memory (x + LN(W1 s(W2 x)), the l2 attentional bias, gradient descent, KL retention: a softmax over each row of the weights)
over 8 memory heads of width 16 (expansion 2: hidden width 32; the defaults' 4 heads x expansion 4 take
2.4x as long per step), on the embedded corpus on CPU.
Step time STEP_TIME
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402


def get_config():
    cfg = quickstart_config()
    cfg.model.block_pattern = "memora"
    p = cfg.model.memora
    p.hybrid = "none"
    p.heads = 8
    p.memory_expansion = 1
    p.chunk = 16
    cfg.train.steps = 700
    return cfg
