"""Weight decay as parameter metadata: a parameter created with decay=False is never decayed whatever the
config, matrices are, and the flag changes neither the parameter tree nor the optimizer state's structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import optim
from memjax.models import factory, layers
from tests.helpers import tiny_config

VOCAB = 64
# Every 2-D+ parameter that is no weight matrix of the model's matmuls, by leaf name (the neural memory's
# initial weights are a list: their leaves are "0", "1", ... under "initial_state").
NOT_MATRICES = {"gate_bias", "out_norm", "branch_norms", "persistent", "initial_memory", "initial_state"}


def exempt_kind(name: str) -> str | None:
    """The NOT_MATRICES kind of a parameter path, or None for a weight of the model's matmuls."""
    parts = name.split("/")
    return parts[-1] if parts[-1] in NOT_MATRICES else ("initial_state" if "initial_state" in parts else None)


def memory_config():
    return tiny_config(**{"model.block_pattern": "titans_mag,lm2", "model.titans_mag.window": 8,
                          "model.titans_mag.heads": 2, "model.titans_mag.chunk": 4, "model.lm2.segment": 8,
                          "model.lm2.slots": 4, "model.lm2.slot_width": 8, "model.lm2.heads": 2})


def test_parameters_marked_decay_false_are_never_decayed_and_matrices_are():
    cfg = memory_config()
    model = factory.abstract_model(cfg.model, VOCAB)
    seen = set()
    for path, rate in jax.tree_util.tree_flatten_with_path(optim.weight_decays(cfg.optim, model))[0]:
        name = optim.path_str(path)
        leaf = name.rsplit("/", 1)[-1]
        if exempt_kind(name):
            seen.add(exempt_kind(name))
            assert rate == 0.0, name
        elif leaf == "kernel":
            assert rate == cfg.optim.weight_decay, name
    assert seen == NOT_MATRICES
    # A group's own rate applies to its decayed members only.
    cfg.optim.groups.memory = {"pattern": r"/memory/", "lr_mult": 1.0, "weight_decay": 0.5}
    rates = {optim.path_str(p): r
             for p, r in jax.tree_util.tree_flatten_with_path(optim.weight_decays(cfg.optim, model))[0]}
    assert rates["blocks/0/memory/gate_bias"] == 0.0 and rates["blocks/0/memory/out/kernel"] == 0.5


def test_the_flag_is_metadata_only(monkeypatch):
    """The same parameter tree and optimizer-state structure as the plain ndim >= 2 rule; only the update
    of the flagged parameters loses its decay term."""
    cfg = memory_config()
    cfg.optim.weight_decay = 0.5
    model = factory.abstract_model(cfg.model, VOCAB)
    graphdef, params = factory.build(cfg.model, VOCAB, jax.random.key(0))
    abstract_params = factory.abstract(cfg.model, VOCAB)[1]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract_params)
    tx = optim.make(cfg.optim, model, 10)
    with monkeypatch.context() as patch:
        patch.setattr(optim, "decay_mask", lambda m: jax.tree_util.tree_map(lambda x: x.ndim >= 2, params))
        plain = optim.make(cfg.optim, model, 10)
    state, plain_state = tx.init(params), plain.init(params)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(plain_state)

    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for _ in range(3):  # past the first step, whose learning rate is 0 in warmup
        updates, state = tx.update(grads, state, params)
        plain_updates, plain_state = plain.update(grads, plain_state, params)
    flat = {optim.path_str(p): (np.asarray(u), np.asarray(v)) for (p, u), v in
            zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree_util.tree_leaves(plain_updates))}
    for name, (update, plain_update) in flat.items():
        if exempt_kind(name):
            assert not np.array_equal(update, plain_update), name
        else:
            np.testing.assert_array_equal(update, plain_update, err_msg=name)


@pytest.mark.parametrize("decay", [True, False])
def test_layers_param_records_only_the_exemption(decay):
    p = layers.param(nnx.Rngs(params=0), (2, 3), 1.0, ("embed", "mlp"), decay=decay)
    assert ("decay" in p.get_metadata()) is (not decay)
