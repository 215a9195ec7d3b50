"""The core benchmark shape: d_model=512, 6 layers, T=256 (python -m memjax.benchmark --config ...)."""

from memjax.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.d_model = 512
    cfg.model.num_layers = 6
    cfg.model.num_heads = 8
    cfg.train.seq_len = 256
    cfg.train.batch_size = 8
    return cfg
