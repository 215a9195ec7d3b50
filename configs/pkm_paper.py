"""Paper-shaped memory model (Berges et al. 2024, "Memory Layers at Scale"): 1,048,576 shared value slots
(n_keys = 1024), k = 32, 4 memory heads, k_dim = 512, v_dim = d_model, Memory+ at 3 equally spaced layers
(3, 7, 11) of a 12-layer d_model = 1024 decoder. Meant for accelerators; the value table alone holds
1.07B parameters (tests only build it abstractly)."""

import ml_collections

from memjax.config import base_config
from memjax.memory.pkm import VALUES_PATTERN


def get_config():
    cfg = base_config()
    cfg.model.d_model = 1024
    cfg.model.num_layers = 12
    cfg.model.num_heads = 16
    cfg.model.block_pattern = "attention,attention,attention,pkm"
    cfg.model.dtype = "bfloat16"
    cfg.model.pkm.heads = 4
    cfg.model.pkm.k = 32
    cfg.model.pkm.n_keys = 1024
    cfg.model.pkm.k_dim = 512
    cfg.model.pkm.v_dim = 0
    cfg.model.pkm.memory_plus = True
    cfg.model.pkm.value_shard_axis = "tensor"
    cfg.model.pkm.value_shard_mode = "columns"
    cfg.train.seq_len = 2048
    cfg.train.batch_size = 256
    cfg.train.steps = 50_000
    cfg.train.eval_every = 1000
    cfg.train.checkpoint_every = 1000
    cfg.optim.lr = 3e-4
    cfg.optim.warmup_steps = 2000
    # The paper trains the values at 10x the base learning rate (1e-3 vs 1e-4), without weight decay.
    cfg.optim.groups.pkm_values = ml_collections.ConfigDict(
        {"pattern": VALUES_PATTERN, "lr_mult": 10.0, "weight_decay": 0.0})
    cfg.data.tokenizer = "bpe"
    cfg.data.bpe_vocab_size = 32768
    return cfg
