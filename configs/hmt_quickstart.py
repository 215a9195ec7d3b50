"""HMT quickstart: the quickstart Transformer (configs/quickstart.py) wrapped in the Hierarchical Memory
Transformer (memjax.models.hmt), byte-level, on the embedded corpus, CPU-sized. Each 256-byte row is 4
segments of 64 bytes; a segment sees 8 sensory bytes of the previous one and two memory tokens recalled
from the earlier segments' memories (the whole row is backpropagated: bptt_segments = 0).

Two-stage training as in the paper: stage 1 without recall (P_n is the learned P_0), stage 2 with recall,
starting from stage 1's parameters (every parameter exists in both stages):

    python -m memjax.train --config configs/hmt_quickstart.py --workdir runs/hmt1 --config.model.hmt.recall=False
    python -m memjax.train --config configs/hmt_quickstart.py --workdir runs/hmt2 --config.train.init_from=runs/hmt1

Or one stage with recall from the start (the default). Measured with `--config.train.steps=150` on 2 CPU
cores shared with other jobs (load average ~6): 1.6 s per step (4.5 minutes in all with compilation and
evaluation), training loss 4.79 over steps 1-20 falling to 2.36 at step 150, evaluation loss 2.39
(3.45 bits per byte); 904K parameters, of which HMT's own 16.6K (1.8%).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # config files load by path, not as a package

from quickstart import get_config as quickstart_config  # noqa: E402


def get_config():
    cfg = quickstart_config()  # the backbone and the schedule
    cfg.model.hmt.enabled = True
    cfg.model.hmt.segment_len = 64
    cfg.model.hmt.sensory_tokens = 8
    cfg.model.hmt.cache_size = 8
    cfg.model.hmt.recall_dim = 64
    return cfg
