"""Tiny seeded configs shared by the tests, and the repository's config files."""

import os

from memjax.config import base_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# Blocks whose float32 rounding their algorithm amplifies, by the factor their own float64 tests bound; the
# sharded-vs-one-device comparisons (tests/test_conformance.py, tests/test_sharding.py) scale their
# tolerances by it. ATLAS's Newton-Schulz on the Gram (ns_form="gram") squares each update's condition
# number (tests/test_miras.py::test_newton_schulz_forms_in_float32_against_float64: 1e-4 against 1e-5).
ROUNDING_GROWTH = {"atlas": 10.0}


def config_file(name: str) -> str:
    """The path of configs/<name>.py (load it with memjax.config.load_config)."""
    return os.path.join(CONFIGS, f"{name}.py")


def tiny_config(**overrides):
    cfg = base_config()
    cfg.model.d_model = 32
    cfg.model.num_layers = 2
    cfg.model.num_heads = 2
    cfg.model.swa.window = 8
    cfg.train.seq_len = 32
    cfg.train.batch_size = 4
    cfg.train.steps = 30
    cfg.train.log_every = 5
    cfg.train.eval_every = 15
    cfg.train.eval_batches = 2
    cfg.train.checkpoint_every = 10
    cfg.train.progress_bar = False
    cfg.train.async_checkpoint = False
    cfg.optim.warmup_steps = 5
    cfg.optim.lr = 1e-2
    cfg.data.prefetch = 0
    cfg.mesh.num_devices = 1  # the sharding tests choose their meshes; the rest run on one device
    for key, value in overrides.items():
        section, name = key.split(".", 1) if "." in key else (None, key)
        target = cfg if section is None else cfg[section]
        for part in name.split(".")[:-1]:
            target = target[part]
        target[name.split(".")[-1]] = value
    return cfg


def split_calls(model, ids_BxT, splits):
    """Logits of the ids run as `splits` calls ((start, stop) pairs) carrying the decoding state from
    init_states."""
    import jax.numpy as jnp

    states, pieces = model.init_states(*ids_BxT.shape), []
    for a, b in splits:
        logits, states = model(ids_BxT[:, a:b], states)
        pieces.append(logits)
    return jnp.concatenate(pieces, axis=1)


def token_by_token(model, ids_BxT):
    """Logits of the ids decoded one token at a time (a scan) from init_states."""
    import jax
    import jax.numpy as jnp

    def decode(states, token_B):
        logits, states = model(token_B[:, None], states)
        return states, logits[:, 0]

    _, decoded = jax.lax.scan(decode, model.init_states(*ids_BxT.shape), ids_BxT.T)
    return jnp.moveaxis(decoded, 0, 1)


def split_and_decoded_logits(graphdef, params, ids_BxT, splits):
    """Logits of one call, and of the same ids run as `splits` calls with carried state ("split") and
    token by token ("tokens"), all from init_states: the decode-equivalence check of a block."""
    import jax
    from flax import nnx

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        whole, _ = model(ids_BxT)
        return whole, {"split": split_calls(model, ids_BxT, splits), "tokens": token_by_token(model, ids_BxT)}

    return run(params)


def get_config():
    """The tiny config as a config file, for the command-line tests: `--config tests/helpers.py`."""
    return tiny_config()
