import pathlib

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from memjax.config import ConfigError, base_config, validate
from tests.helpers import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").glob("*.py")):
        flag_values = flags.FlagValues()
        holder = config_flags.DEFINE_config_file("config", str(path), flag_values=flag_values)
        flag_values(["prog"])
        validate(holder.value)


def parse(*overrides):
    argv = ["prog", f"--config={ROOT / 'configs' / 'quickstart.py'}", *overrides]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return holder.value


def test_command_line_overrides_reach_the_config():
    cfg = parse("--config.model.d_model=96", "--config.optim.schedule=linear", "--config.train.progress_bar=False")
    assert cfg.model.d_model == 96 and cfg.optim.schedule == "linear" and cfg.train.progress_bar is False


def test_command_line_unknown_key_is_refused():
    with pytest.raises(Exception, match="d_modle"):
        parse("--config.model.d_modle=96")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model.num_heads", 3, r"config\.model\.num_heads: 3 heads do not divide model\.d_model=32"),
        ("model.swa.window", 64, r"config\.model\.swa\.window: window 64 exceeds train\.seq_len=32"),
        ("train.grad_accum_steps", 3, r"config\.train\.grad_accum_steps: 3 does not divide train\.batch_size=4"),
        ("model.dtype", "float16", r"config\.model\.dtype: 'float16' is not one of"),
        ("model.block_pattern", "attention,mamba", r"config\.model\.block_pattern: unknown block 'mamba'"),
        ("optim.warmup_steps", -1, r"config\.optim\.warmup_steps: must be >= 0"),
        ("model.block_pattern", "attention,attention,atention",
         r"config\.model\.block_pattern: unknown block 'atention' \(did you mean 'attention'\?\)"),
        ("optim.schedule", "step", r"config\.optim\.schedule"),
        ("data.source", "text", r"config\.data\.paths: data\.source='text' needs data\.paths"),
        ("train.seq_len", 0, r"config\.train\.seq_len: must be positive"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    cfg = tiny_config()
    if field == "model.swa.window":
        cfg.model.block_pattern = "swa"
    section, key = field.rsplit(".", 1)
    target = cfg
    for part in section.split("."):
        target = target[part]
    target[key] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_unknown_key_in_a_config_file_suggests_the_right_one():
    cfg = tiny_config()
    cfg.model.widht = 64
    with pytest.raises(ConfigError, match=r"config\.model\.widht: unknown key \(did you mean 'width'"
                                          r"|config\.model\.widht: unknown key"):
        validate(cfg)
    cfg = tiny_config()
    cfg.optim.groups.embeddings.lr_mul = 2.0
    with pytest.raises(ConfigError, match=r"config\.optim\.groups\.embeddings\.lr_mul: unknown key "
                                          r"\(did you mean 'lr_mult'\?\)"):
        validate(cfg)


def test_window_only_checked_when_a_swa_block_is_used():
    cfg = tiny_config(**{"model.swa.window": 64})
    validate(cfg)  # full attention only: the window setting is unused


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", "wide", r"config\.model\.d_model: expected int, got str 'wide'"),
        ("tie_embeddings", 1, r"config\.model\.tie_embeddings: expected bool, got int"),
    ],
)
def test_wrong_types_in_a_hand_built_config_name_the_field(field, value, message):
    # A config file may build its dicts without ConfigDict's own type checks.
    raw = tiny_config().to_dict()
    raw["model"][field] = value
    with pytest.raises(ConfigError, match=message):
        validate(ml_collections.ConfigDict(raw, type_safe=False))


def test_base_config_is_valid():
    validate(base_config())
