"""The registry's mechanics: what a block that declares nothing gets, what registration refuses, and how a
wrapper's section switches it on."""

import jax.numpy as jnp
import pytest
from flax import nnx

from memjax import config, parallel
from memjax.models import factory, registry
from memjax.models.hmt import HMT
from memjax.models.lm import DecoderLM
from tests.helpers import tiny_config


class Bare(registry.Block):
    def __init__(self, cfg, layer_index, *, shared=None, rngs):
        self.scale = nnx.Param(jnp.ones((cfg.d_model,)), logical_axes=("embed",))

    def init_state(self, batch_size, max_len, dtype):
        return None

    def __call__(self, x_BxTxD, state=None):
        return x_BxTxD * self.scale[...], state


def test_a_block_that_declares_nothing_gets_the_neutral_defaults():
    cfg = tiny_config()
    assert Bare.defaults == {} and Bare.axis_rules == {} and Bare.state_axes == frozenset()
    assert Bare.make_shared(cfg.model, rngs=nnx.Rngs(0)) is None
    assert Bare.sharding_rules(cfg.model) == {}
    assert Bare.flops_per_token(cfg.model, 32) == 0.0
    assert Bare.eval_metrics(None, None, []) == {}
    assert Bare.validate(cfg, lambda ok, field, message: None) is None
    assert Bare(cfg.model, 0, rngs=nnx.Rngs(0)).init_carry(2, jnp.float32) is None


def test_registration_refuses_a_class_that_is_not_a_block_and_a_second_class_under_a_name():
    with pytest.raises(TypeError, match="does not subclass registry.Block"):
        registry.register("not_a_block")(type("NotABlock", (nnx.Module,), {}))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("attention")(Bare)
    with pytest.raises(TypeError, match="does not subclass registry.Wrapper"):
        registry.register_wrapper("not_a_wrapper")(Bare)


def test_a_registered_block_is_built_validated_and_counted_like_the_others(monkeypatch):
    monkeypatch.setitem(registry.BLOCKS, "bare", Bare)
    monkeypatch.setattr(Bare, "block_name", "bare")
    cfg = tiny_config(**{"model.block_pattern": "bare,attention"})
    config.validate(cfg)
    model = factory.abstract_model(cfg.model, 64)
    assert isinstance(model, DecoderLM) and isinstance(model.blocks[0], Bare)
    assert parallel.rules(cfg.model) == parallel.RULES
    assert factory.flops_per_token(cfg.model, 64, 32) > 0


def test_the_enabled_wrapper_is_the_model_and_only_one_may_be_enabled(monkeypatch):
    cfg = tiny_config(**{"model.hmt.enabled": True, "model.hmt.segment_len": 16})
    assert registry.active_wrapper(cfg.model) is HMT
    assert isinstance(factory.abstract_model(cfg.model, 64), HMT)
    del cfg.model["hmt"]  # a config saved before the wrapper existed: the plain decoder
    assert registry.active_wrapper(cfg.model) is None

    other = type("Other", (registry.Wrapper,), {"defaults": {"enabled": False}})
    monkeypatch.setitem(registry.WRAPPERS, "other", other)
    monkeypatch.setattr(other, "wrapper_name", "other")
    cfg = tiny_config(**{"model.hmt.enabled": True, "model.hmt.segment_len": 16, "model.other.enabled": True})
    with pytest.raises(config.ConfigError, match="only one wrapper can be enabled"):
        config.validate(cfg)
