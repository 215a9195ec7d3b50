"""ATLAS and Miras configs: the quickstarts and the paper-shaped configs validate, the paper-shaped ones
build abstractly at their stated sizes, and every family trains with its loss falling and its memory
diagnostics logged at evaluation."""

import jax
import numpy as np
import pytest

from memjax import config, trainer
from memjax.config import load_config
from memjax.metrics import read_jsonl
from memjax.models import factory, registry
from tests.helpers import config_file, tiny_config

FAMILIES = ("atlas", "moneta", "yaad", "memora")
QUICKSTARTS = tuple(f"{name}_quickstart" for name in FAMILIES)
# name -> parameter range of the paper-shaped configs (d_model 1024, 22 layers of the block alone).
PAPER = {
    "atlas_340m": (330e6, 370e6),
    "moneta_340m": (330e6, 370e6),
    "yaad_340m": (330e6, 370e6),
    "memora_340m": (330e6, 370e6),
}
PAPER_VOCAB = 32768
BYTE_VOCAB = 264  # 256 bytes + end of document, rounded up to a multiple of 8


def memory_blocks(cfg) -> set[str]:
    return set(registry.block_names(cfg.model)) & set(FAMILIES)


@pytest.mark.parametrize("name", QUICKSTARTS)
def test_quickstart_validates_and_uses_its_block(name):
    cfg = load_config(config_file(name))
    config.validate(cfg)
    assert memory_blocks(cfg) == {name[: -len("_quickstart")]}
    # CPU-sized like configs/quickstart.py: byte-level, float32, seq_len 256, a small model.
    m, t = cfg.model, cfg.train
    assert m.dtype == "float32" and cfg.data.tokenizer == "byte" and t.seq_len == 256
    assert m.d_model <= 192 and m.num_layers <= 6
    flops = factory.flops_per_token(m, BYTE_VOCAB, t.seq_len)
    assert np.isfinite(flops) and flops > 0


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_builds_abstractly_at_its_size(name):
    low, high = PAPER[name]
    block = name[: -len("_340m")]
    cfg = load_config(config_file(name))
    config.validate(cfg)
    m = cfg.model
    assert (m.d_model, m.num_heads) == (1024, 16)
    assert registry.block_names(m) == [block] * m.num_layers
    assert m[block].hybrid == "none"
    assert m.dtype == "bfloat16" and cfg.train.seq_len == 4096
    assert cfg.data.tokenizer == "bpe" and cfg.data.bpe_vocab_size == PAPER_VOCAB
    o = cfg.optim
    assert (o.lr, o.schedule, o.weight_decay) == (4e-4, "cosine", 0.1)

    _, params = factory.abstract(m, PAPER_VOCAB)
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    n = factory.count_params(params)
    assert low < n < high, f"{name}: {n:,} parameters"

    flops = factory.flops_per_token(m, PAPER_VOCAB, cfg.train.seq_len)
    assert np.isfinite(flops) and flops > 0
    assert flops > 0.9 * 6 * n  # at least the matmuls' work (all but the memories' initial states)


def test_atlas_paper_config_keeps_its_feature_width_small():
    """64 memory heads of width 16: phi(k) has 1 + 16 + 16^2 = 273 features (16 heads would give 4,161)."""
    m = load_config(config_file("atlas_340m")).model
    p = m.atlas
    assert (p.optimizer, p.feature_degree, p.omega_window) == ("muon", 2, 4)
    head_dim = m.d_model // p.heads
    assert 1 + head_dim + head_dim**2 <= 300


# Per block, beyond chunk 4: the degree-2 feature map's width grows as head_dim^2, so atlas and omeganet
# take 4 heads of width 8 (73 features; 2 heads of width 16 give 273 and take twice as long to train);
# omeganet's momentum inner loop diverges (NaN) at its registered step size (theta_max 1.0, and still at
# 0.1), so it gets the small step of configs/titans_lmm_quickstart.py's MEMORY. ATLAS takes 2 Newton-Schulz
# steps instead of 5 (the slowest test of the suite: 59 -> 40 s; the 5-step path is checked in test_miras.py).
TINY = {
    "atlas": {"heads": 4, "ns_steps": 2},
    "omeganet": {"heads": 4, "theta_max": 0.01, "theta_init": 0.005},
}


@pytest.mark.parametrize("block", FAMILIES + ("omeganet",))
def test_a_tiny_memory_config_trains_and_its_loss_falls(block, tmp_path):
    settings = {"chunk": 4, "heads": 2, **TINY.get(block, {})}
    cfg = tiny_config(**{
        "model.block_pattern": block, **{f"model.{block}.{key}": value for key, value in settings.items()},
        "train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 0,
    })
    config.validate(cfg)
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    train_losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert len(train_losses) == 8 and np.all(np.isfinite(train_losses))
    assert train_losses[-1] < train_losses[0] - 1.0, train_losses
    assert len(evals) == 2 and evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    for record in evals:
        for key in ("memory/layer0/inner_loss_before", "memory/layer0/inner_loss_after"):
            assert key in record and np.isfinite(record[key]), (key, sorted(record))
