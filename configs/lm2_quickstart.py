"""Quickstart with LM2 (Kang et al. 2025, arXiv 2502.06049) in every layer: configs/quickstart.py's byte-level
d_model = 128, 4-layer decoder on the embedded corpus on CPU, each layer causal self-attention, then the
read of a 32-slot memory bank (slots of width 64, 4 heads) through its output gate, then the SwiGLU FFN;
the memory is written after every 32-token segment (8 per 256-token row). 1.39M parameters.

Measured (`--config.train.steps=150`, 2 CPU cores shared with other jobs, load average ~5.6): 1.4-1.8 s
per step (1.7 s typical; the plain quickstart took 0.86-0.91 s under the same load, and a forward+backward
alone is ~1.4x the quickstart's); train loss 4.79 over steps 1-20, 2.67 at 60 (quickstart: 2.69), 2.44
over steps 141-150; eval loss 2.458 at step 150 (3.55 bits per byte), gates still near 0.5. The run took
4m44s including compilation and the evaluation.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402


def get_config():
    cfg = quickstart_config()
    cfg.model.block_pattern = "lm2"
    p = cfg.model.lm2
    p.slots = 32
    p.slot_width = 64
    p.heads = 4
    p.segment = 32
    return cfg
