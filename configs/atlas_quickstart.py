"""Quickstart ATLAS (arXiv 2505.23735) on CPU: the quickstart's 4 layers alternate between sliding-window
attention (the swa block, window 64) and the atlas block (hybrid "none": x + Memory(norm x), then the
SwiGLU FFN), with the registered atlas memory (x + W1 s(W2 x), Omega rule over c = 4 tokens, Muon with
5 Newton-Schulz steps, degree-2 polynomial features) over 16 memory heads of width 8 (phi(k) has
1 + 8 + 8^2 = 73 features) and expansion 1, on the embedded corpus. Muon orthogonalises every token's
momentum inside a chunk (on its Gram: ns_form "gram", the default), which is the cost of this block on
CPU: batch 4.
100 steps (`--config.train.steps=100 --config.optim.warmup_steps=20`, 2 CPU cores shared with an AOT
compile): about 1.9 s per step for 4 x 256 tokens, train loss 4.30 at step 20 and 3.30 at step 100, eval
loss 3.27. With `--config.model.atlas.ns_form=matrix` on the same machine at the same time: about 4.0 s per
step, 4.33 / 3.40, eval 3.39. The 500 steps here take ~15 minutes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402


def get_config():
    cfg = quickstart_config()
    cfg.model.block_pattern = "swa,atlas"
    cfg.model.swa.window = 64
    p = cfg.model.atlas
    p.hybrid = "none"
    p.heads = 16  # head width 8: phi(k) has 1 + 8 + 8^2 = 73 features
    p.memory_expansion = 1
    p.chunk = 16
    cfg.train.batch_size = 4
    cfg.train.steps = 500
    cfg.train.log_every = 10
    cfg.train.eval_every = 100
    cfg.train.checkpoint_every = 100
    cfg.optim.warmup_steps = 50
    return cfg
