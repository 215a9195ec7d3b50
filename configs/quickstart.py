"""Byte-level Transformer on the embedded corpus (the Python standard library): ~10 minutes on 2 CPU cores."""

from memjax.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.d_model = 128
    cfg.model.num_layers = 4
    cfg.model.num_heads = 4
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
