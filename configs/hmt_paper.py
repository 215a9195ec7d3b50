"""Paper-shaped HMT (He et al. 2024, arXiv 2405.06067) around an OPT-350M-sized backbone (the smallest
of the paper's backbones): 24 layers, d_model 1024, 16 heads, OPT's 50,272-entry vocabulary, tied
embeddings; here a Llama-style block (RoPE, SwiGLU of the same parameter count as OPT's 4x MLP), about
355M parameters. HMT settings from the reference code (github.com/OswaldHe/HMT-pytorch): segments of
256 tokens (main.py's default segment_length), k = 32 sensory tokens and 6 segments per training
sequence backpropagated together (README: --num_sensory=32 --bptt_depth=6), N = 100 cached memories
(main.py's default mem_recall_context). The recall width h = d_model = 1024 (the reference's default
4096 is sized for 7B backbones) keeps HMT's own parameters (2 d h + 2 d) at 0.6% of the backbone, inside
the paper's 0.5-2% claim. Meant for accelerators; tests build it abstractly only.

The paper fine-tunes pretrained backbones (lr 1e-4 for 600 steps in the README); the optimisation
settings below are memjax's for training from scratch. Stage 1 / stage 2 as in configs/hmt_quickstart.py.
"""

from memjax.config import base_config


def get_config():
    cfg = base_config()
    cfg.model.vocab_size = 50272
    cfg.model.d_model = 1024
    cfg.model.num_layers = 24
    cfg.model.num_heads = 16
    cfg.model.dtype = "bfloat16"
    cfg.model.hmt.enabled = True
    cfg.model.hmt.segment_len = 256
    cfg.model.hmt.sensory_tokens = 32
    cfg.model.hmt.cache_size = 100
    cfg.model.hmt.recall_dim = 1024
    cfg.model.hmt.bptt_segments = 0  # all 6 segments of a sequence
    cfg.train.seq_len = 6 * 256
    cfg.train.batch_size = 64
    cfg.train.steps = 20_000
    cfg.train.eval_every = 1000
    cfg.train.checkpoint_every = 1000
    cfg.optim.lr = 3e-4
    cfg.optim.warmup_steps = 1000
    cfg.data.tokenizer = "bpe"
    cfg.data.bpe_vocab_size = 50265  # OPT's GPT-2 BPE size; the embedding rounds up to 50,272
    return cfg
