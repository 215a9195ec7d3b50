"""Quickstart with DeltaProduct in every layer: configs/gated_deltanet_quickstart.py's model with the
`deltaproduct` registration of the delta-rule block (memjax.memory.deltanet): 2 Householder steps per
token, beta in (0, 2), the decay once per token."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from gated_deltanet_quickstart import delta_quickstart  # noqa: E402


def get_config():
    return delta_quickstart("deltaproduct")
