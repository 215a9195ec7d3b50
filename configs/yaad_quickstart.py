"""Quickstart Yaad (Miras, arXiv 2504.13173) alone: the quickstart's 4 layers, each x + Memory(norm x)
then the SwiGLU FFN, no attention (hybrid "none", the paper's attention-free model), with the registered
yaad memory (x + LN(W1 s(W2 x)), the Huber attentional bias with a learned threshold, gradient descent,
retention by decay)
over 8 memory heads of width 16 (expansion 2: hidden width 32; the defaults' 4 heads x expansion 4 take
2.4x as long per step), on the embedded corpus on CPU.
Step time about 1.7 s (100 steps with `--config.train.steps=100 --config.optim.warmup_steps=20`, on 2
CPU cores shared with a test run; the quickstart Transformer takes 0.3 s on quiet cores): train loss 4.29
over steps 1-20, 3.24 over steps 81-100, eval loss 2.94 at step 100. The 1000 steps here take ~30 minutes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from moneta_quickstart import miras_quickstart  # noqa: E402


def get_config():
    return miras_quickstart("yaad", memory_expansion=2, steps=1000)
