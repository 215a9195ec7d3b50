"""Quickstart Memora (Miras, arXiv 2504.13173) alone: the quickstart's 4 layers, each x + Memory(norm x)
then the SwiGLU FFN, no attention (hybrid "none", the paper's attention-free model), with the registered
memora memory (x + LN(W1 s(W2 x)), the l2 attentional bias, gradient descent, KL retention: a softmax over each row
of the weights)
over 8 memory heads of width 16 (expansion 1: hidden width 16), on the embedded corpus on CPU.
Step time about 2.6 s (100 steps with `--config.train.steps=100 --config.optim.warmup_steps=20`, on 2
CPU cores shared with a test run; the quickstart Transformer takes 0.3 s on quiet cores): train loss 4.78
over steps 1-20, 3.61 over steps 81-100, eval loss 3.55 at step 100. Softmax retention is not linear in
the weights, so every token's weights are formed inside a chunk: hence expansion 1 and 700 steps (~30 min).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from moneta_quickstart import miras_quickstart  # noqa: E402


def get_config():
    return miras_quickstart("memora", memory_expansion=1, steps=700)
