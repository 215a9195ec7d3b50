"""Quickstart with DeltaNet in every layer: configs/gated_deltanet_quickstart.py's model with the
`deltanet` registration of the delta-rule block (memjax.memory.deltanet): no decay, alpha = 1."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from gated_deltanet_quickstart import delta_quickstart  # noqa: E402


def get_config():
    return delta_quickstart("deltanet")
