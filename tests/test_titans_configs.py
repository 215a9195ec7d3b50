"""Titans configs: the quickstarts and the paper-shaped configs validate, the paper-shaped ones build
abstractly at their stated sizes, and every variant trains with its loss falling and its memory
diagnostics logged at evaluation."""

import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from memjax import config, optim, trainer
from memjax.config import load_config
from memjax.metrics import read_jsonl
from memjax.models import factory, registry
from tests.helpers import config_file, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("titans_lmm", "titans_mag", "titans_mal", "titans_mac")
GATED = ("titans_mag", "titans_mac")  # the hybrids whose memory gates the attention branch
QUICKSTARTS = tuple(f"{block}_quickstart" for block in VARIANTS)
# name -> (parameter range, d_model, layers, heads) of the paper-shaped configs.
PAPER = {
    "titans_170m": ((155e6, 185e6), 768, 13, 12),
    "titans_340m": ((320e6, 360e6), 1024, 16, 16),
}
PAPER_VOCAB = 32768




def titans_blocks(cfg) -> set[str]:
    return set(registry.block_names(cfg.model)) & set(VARIANTS)


def assert_biases_and_scales_not_decayed(cfg, model):
    """The memory's gate biases and norm scales are 2-D, so the optimizer's ndim >= 2 rule alone would
    decay them; they are created with decay=False. Matrices stay decayed."""
    seen = set()
    for path, rate in jax.tree_util.tree_flatten_with_path(optim.weight_decays(cfg.optim, model))[0]:
        name = optim.path_str(path)
        leaf = name.rsplit("/", 1)[-1]
        if leaf in ("gate_bias", "out_norm", "branch_norms", "persistent"):
            seen.add(leaf)
            assert rate == 0.0, name
        elif name.endswith("kernel") and "/memory/" in name:
            assert rate > 0.0, name
    assert {"gate_bias", "out_norm"} <= seen


def test_every_titans_config_is_covered():
    found = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "titans_*.py"))}
    assert found == set(QUICKSTARTS) | set(PAPER)


@pytest.mark.parametrize("name", QUICKSTARTS)
def test_quickstart_validates_and_uses_its_block(name):
    cfg = load_config(config_file(name))
    config.validate(cfg)
    block = name[: -len("_quickstart")]
    assert titans_blocks(cfg) == {block}
    # CPU-sized like configs/quickstart.py: byte-level, float32, seq_len 256, a small model.
    m, t = cfg.model, cfg.train
    assert m.dtype == "float32" and cfg.data.tokenizer == "byte" and t.seq_len == 256
    assert m.d_model <= 192 and m.num_layers <= 6
    flops = factory.flops_per_token(m, 264, t.seq_len)
    assert np.isfinite(flops) and flops > 0
    assert_biases_and_scales_not_decayed(cfg, factory.abstract_model(m, 264))


@pytest.mark.parametrize("block", VARIANTS)
def test_any_config_with_a_titans_block_leaves_its_gates_undecayed(block):
    """The decay exemption belongs to the parameters, not to a config: configs/quickstart.py, which
    knows nothing of Titans, with a Titans block keeps weight decay off the memory's gate biases (decay
    pulled them towards 0, and the forgetting gate alpha towards 0.5), norm scales and persistent tokens."""
    cfg = load_config(config_file("quickstart"))
    cfg.model.block_pattern = block
    config.validate(cfg)
    assert cfg.optim.weight_decay > 0
    assert_biases_and_scales_not_decayed(cfg, factory.abstract_model(cfg.model, 264))


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_builds_abstractly_at_its_size(name):
    (low, high), d_model, layers, heads = PAPER[name]
    cfg = load_config(config_file(name))
    config.validate(cfg)
    m = cfg.model
    assert (m.d_model, m.num_layers, m.num_heads) == (d_model, layers, heads)
    assert registry.block_names(m) == ["titans_mag"] * layers
    assert m.dtype == "bfloat16" and cfg.train.seq_len == 4096
    assert cfg.data.tokenizer == "bpe" and cfg.data.bpe_vocab_size == PAPER_VOCAB
    o = cfg.optim
    assert (o.lr, o.schedule, o.weight_decay) == (4e-4, "cosine", 0.1)

    _, params = factory.abstract(m, PAPER_VOCAB)
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    n = factory.count_params(params)
    assert low < n < high, f"{name}: {n:,} parameters"
    assert_biases_and_scales_not_decayed(cfg, factory.abstract_model(m, PAPER_VOCAB))

    flops = factory.flops_per_token(m, PAPER_VOCAB, cfg.train.seq_len)
    assert np.isfinite(flops) and flops > 0
    assert flops > 6 * (n - PAPER_VOCAB * d_model)  # at least 6N over the non-embedding parameters


@pytest.mark.parametrize("block", VARIANTS)
def test_paper_config_takes_every_variant(block):
    cfg = load_config(config_file("titans_170m"))
    cfg.model.block_pattern = block
    config.validate(cfg)
    flops = factory.flops_per_token(cfg.model, PAPER_VOCAB, cfg.train.seq_len)
    assert np.isfinite(flops) and flops > 0


def quickstart_module():
    """configs/titans_lmm_quickstart.py, for MEMORY: the inner-loop settings the Titans configs share."""
    spec = importlib.util.spec_from_file_location("titans_lmm_quickstart",
                                                  os.path.join(ROOT, "configs", "titans_lmm_quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_titans_config(block, **overrides):
    shared = quickstart_module()
    p = f"model.{block}"
    memory = {f"{p}.{key}": value for key, value in shared.MEMORY.items()}
    cfg = tiny_config(**{
        "model.block_pattern": block, **memory, f"{p}.heads": 2, f"{p}.chunk": 4, f"{p}.window": 8,
        f"{p}.segment": 8, "train.steps": 40, "train.eval_every": 20, "train.checkpoint_every": 0, **overrides,
    })
    return cfg


@pytest.mark.parametrize("block", VARIANTS)
def test_each_variant_trains_and_logs_its_memory_diagnostics(tmp_path, block):
    cfg = tiny_titans_config(block)
    trainer.train(cfg, str(tmp_path))
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    train_losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert len(evals) == 2
    assert all(np.isfinite(train_losses))
    assert train_losses[-1] < train_losses[0] - 1.0
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]

    expected = ["inner_loss_before", "inner_loss_after", "theta"] + (["gate"] if block in GATED else [])
    for record in evals:
        for layer in range(cfg.model.num_layers):
            for key in expected:
                value = record.get(f"memory/layer{layer}/{key}")
                assert value is not None and np.isfinite(value), (block, record["step"], layer, key, value)
            assert 0 < record[f"memory/layer{layer}/theta"] < cfg.model[block].theta_max
            if block in GATED:
                assert 0 < record[f"memory/layer{layer}/gate"] < 1
    for layer in range(cfg.model.num_layers):  # each chunk's writes lower the memory's loss on that chunk
        last = evals[-1]
        assert last[f"memory/layer{layer}/inner_loss_after"] < last[f"memory/layer{layer}/inner_loss_before"]
