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

from memjax.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.d_model = 128
    cfg.model.num_layers = 4
    cfg.model.num_heads = 4
    cfg.model.hmt.enabled = True
    cfg.model.hmt.segment_len = 64
    cfg.model.hmt.sensory_tokens = 8
    cfg.model.hmt.cache_size = 8
    cfg.model.hmt.recall_dim = 64
    cfg.train.seq_len = 256
    cfg.train.batch_size = 16
    cfg.train.steps = 1200
    cfg.train.log_every = 20
    cfg.train.eval_every = 200
    cfg.train.eval_batches = 8
    cfg.train.checkpoint_every = 400
    cfg.optim.lr = 3e-3
    cfg.optim.warmup_steps = 100
    return cfg
