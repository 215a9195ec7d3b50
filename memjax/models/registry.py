"""Registry of layer blocks, keyed by the names used in `model.block_pattern`.

A block is an `nnx.Module` that is a whole residual layer, built as
`Block(model_cfg, layer_index, shared=..., rngs=...)`,
called as `x_BxTxD, state = block(x_BxTxD, state)`. `state` is whatever the block carries between calls
(a KV cache, a memory's weights); `None` in training on independent sequences. Class attributes and
methods every block provides:

- `defaults`: dict of the block's own settings, placed at `config.model.<name>` (may be empty).
- `make_shared(model_cfg, rngs=...)`: classmethod; a module built once per model and handed to every
  block of this kind as `shared` (parameters shared across layers), or None.
- `init_state(batch_size, max_len, dtype)`: the state before the first call of a sequence.
- `validate(cfg, require)`: classmethod; `require(ok, field, message)` for impossible combinations.
- `flops_per_token(cfg, seq_len)`: classmethod; forward+backward FLOPs per token that are not
  parameter matmuls (those are counted as 6N by the caller), e.g. the attention score term.

Optional:

- `init_carry(batch_size, dtype)`: the state carried from one segment of a document to the next in
  segment-recurrent training and long evaluation (memjax.segments): constant in size (a memory, not a
  KV cache). Blocks without it carry nothing: each segment is processed alone (state None).

- `eval_metrics(graphdef, params, batches)`: staticmethod; the block family's diagnostics on the
  evaluation batches (dicts with "inputs"), e.g. `memory/...` key usage or inner losses, logged with
  `eval/*`. Called once per family however many layers use it.
"""

from __future__ import annotations

import importlib

BLOCKS: dict[str, type] = {}

# Modules whose import registers blocks. A new block family adds its module here.
_BLOCK_MODULES = ("memjax.models.attention", "memjax.memory.pkm", "memjax.memory.titans", "memjax.memory.miras", "memjax.memory.lm2")


def register(name: str):
    def decorate(cls):
        if name in BLOCKS and BLOCKS[name] is not cls:
            raise ValueError(f"block {name!r} is registered twice")
        cls.block_name = name
        BLOCKS[name] = cls
        return cls

    return decorate


def load() -> dict[str, type]:
    for module in _BLOCK_MODULES:
        importlib.import_module(module)
    return BLOCKS


def block_defaults() -> dict[str, dict]:
    return {name: dict(cls.defaults) for name, cls in sorted(load().items()) if cls.defaults}
