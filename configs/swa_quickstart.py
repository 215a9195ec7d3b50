"""The quickstart model with sliding-window attention (window 64) in 3 of 4 layers: the local baseline
that memory blocks are compared against. ~8 minutes on 2 CPU cores."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402


def get_config():
    cfg = quickstart_config()
    cfg.model.block_pattern = "swa,swa,swa,attention"
    cfg.model.swa.window = 64
    return cfg
