"""Registry of layer blocks, keyed by the names used in `model.block_pattern`, and of model wrappers.

A block is a `Block`: a whole residual layer, built as `cls(model_cfg, layer_index, shared=..., rngs=...)`,
called as `x_BxTxD, state = block(x_BxTxD, state)`. `state` is whatever the block carries between calls
(a KV cache, a memory's weights); `None` in training on independent sequences. Everything the rest of
memjax needs to know about a block lives on its class (`Block` documents each fact and its default), so
adding a block is its module, one line in `BLOCK_MODULES`, a config and tests.

A wrapper is a `Wrapper`: a model built around the decoder (HMT), switched on by
`config.model.<name>.enabled`. It is built as `cls(model_cfg, vocab_size, rngs=...)` in place of the
decoder and answers for the whole model's FLOPs and diagnostics.

This module imports no block: `load()` imports the modules of `BLOCK_MODULES`, whose decorators fill the
tables. Nothing here reads them before `load()`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from flax import nnx

# Modules whose import registers blocks and wrappers. A new block family adds its module here.
BLOCK_MODULES = ("memjax.models.attention", "memjax.memory.pkm", "memjax.memory.titans", "memjax.memory.miras",
                 "memjax.memory.lm2", "memjax.models.hmt", "memjax.memory.hope", "memjax.memory.deltanet")

BLOCKS: dict[str, type[Block]] = {}
WRAPPERS: dict[str, type[Wrapper]] = {}


class Block(nnx.Module):
    """Base of every registered block. Subclasses override what they need; the defaults describe a block
    with no settings, no private axes, no shared module and nothing carried across segments.

    Required of a subclass: `__init__(model_cfg, layer_index, *, shared, rngs)`, `__call__(x, state)` and
    `init_state(batch_size, max_len, dtype)`, the state before the first call of a decoded sequence.
    """

    block_name: str = ""  # set by `register`
    # The block's own settings, placed at `config.model.<name>` (empty: no section).
    defaults: dict = {}
    # Logical axes only this block's parameters use -> mesh axes (see memjax.parallel); merged into the
    # generic rules for the models that use the block.
    axis_rules: dict = {}
    # Logical axes of parameters that are state, not weights multiplied by every token (a lookup table, a
    # recurrence's initial value, persistent tokens): the analytic FLOPs leave them out of the 6 x N term,
    # and the block's `flops_per_token` counts their work.
    state_axes: frozenset = frozenset()

    @classmethod
    def sharding_rules(cls, model_cfg) -> dict:
        """`axis_rules` for this config (a block whose layout is a setting overrides this)."""
        return dict(cls.axis_rules)

    @classmethod
    def make_shared(cls, model_cfg, *, rngs: nnx.Rngs) -> nnx.Module | None:
        """A module built once per model and handed to every block of this kind as `shared` (parameters
        shared across layers), or None."""
        return None

    @classmethod
    def validate(cls, cfg, require) -> None:
        """`require(ok, field, message)` for each impossible combination of the whole config."""

    @classmethod
    def flops_per_token(cls, model_cfg, seq_len: int) -> float:
        """Forward + backward FLOPs per token that are not parameter matmuls (the caller counts those as
        6 x matmul parameters), e.g. the attention score term."""
        return 0.0

    def init_carry(self, batch_size: int, dtype) -> dict | None:
        """The state carried from one segment of a document to the next in segment-recurrent training and
        long evaluation (memjax.segments): constant in size (a memory, not a KV cache). None: the block
        carries nothing, each segment is processed alone."""
        return None

    @staticmethod
    def eval_metrics(graphdef, params, batches) -> dict[str, float]:
        """The block family's diagnostics on evaluation batches (dicts with "inputs"), e.g. `memory/...` key
        usage or inner losses, logged with `eval/*`. Called once per distinct function however many
        layers and names share it (see memjax.models.diagnostics for the batch loop)."""
        return {}


class Wrapper(nnx.Module):
    """Base of a model built around the decoder. Its settings (`defaults`, which hold "enabled": False) sit
    at `config.model.<name>`; a config turns it on with `enabled=True`."""

    wrapper_name: str = ""  # set by `register_wrapper`
    defaults: dict = {"enabled": False}
    axis_rules: dict = {}  # logical axes of the wrapper's own parameters
    state_axes: frozenset = frozenset()

    @classmethod
    def enabled(cls, model_cfg) -> bool:
        # A config saved before the wrapper existed lacks its section: off.
        return cls.wrapper_name in model_cfg and bool(model_cfg[cls.wrapper_name].enabled)

    @classmethod
    def validate(cls, cfg, require) -> None:
        """As `Block.validate`, for the wrapper's settings."""

    @classmethod
    def flops_per_token(cls, model_cfg, vocab_size: int, seq_len: int) -> float:
        """Training FLOPs per token of the whole model, the decoder's passes included."""
        return 0.0

    @staticmethod
    def eval_metrics(graphdef, params, batches) -> dict[str, float]:
        """The whole model's diagnostics (the wrapper runs the decoder's blocks, not their own hooks)."""
        return {}


def _registrar(kind: str, base: type, table: dict, name: str) -> Callable[[type], type]:
    """A class decorator that enters a `base` subclass into `table` under `name` (`kind` names it in errors)."""

    def decorate(cls):
        if not issubclass(cls, base):
            raise TypeError(f"{kind} {name!r}: {cls.__name__} does not subclass registry.{base.__name__}")
        if name in table and table[name] is not cls:
            raise ValueError(f"{kind} {name!r} is registered twice")
        if base is Wrapper and "enabled" not in cls.defaults:
            raise ValueError(f"wrapper {name!r}: its defaults need an 'enabled' switch")
        setattr(cls, f"{kind}_name", name)
        table[name] = cls
        return cls

    return decorate


def register(name: str) -> Callable[[type], type]:
    return _registrar("block", Block, BLOCKS, name)


def register_wrapper(name: str) -> Callable[[type], type]:
    return _registrar("wrapper", Wrapper, WRAPPERS, name)


def load() -> dict[str, type[Block]]:
    for module in BLOCK_MODULES:
        importlib.import_module(module)
    return BLOCKS


def config_sections() -> dict[str, dict]:
    """{`config.model` section name: default settings} of every block with settings and of every wrapper."""
    load()
    sections = {name: dict(cls.defaults) for name, cls in sorted(BLOCKS.items()) if cls.defaults}
    sections.update({name: dict(cls.defaults) for name, cls in sorted(WRAPPERS.items())})
    return sections


def pattern_names(model_cfg) -> list[str]:
    """The names written in `model.block_pattern`, in order (also those num_layers never reaches)."""
    return [name.strip() for name in model_cfg.block_pattern.split(",") if name.strip()]


def block_names(model_cfg) -> list[str]:
    """The block name of every layer: the pattern cycled over num_layers."""
    pattern = pattern_names(model_cfg)
    return [pattern[i % len(pattern)] for i in range(model_cfg.num_layers)] if pattern else []


def blocks_in_use(model_cfg) -> list[type[Block]]:
    """The classes of the model's layers, each once, by name."""
    blocks = load()
    return [blocks[name] for name in sorted(set(block_names(model_cfg)))]


def active_wrapper(model_cfg) -> type[Wrapper] | None:
    """The wrapper the config switches on, or None (the plain decoder). `config.validate` refuses two."""
    load()
    return next((cls for _, cls in sorted(WRAPPERS.items()) if cls.enabled(model_cfg)), None)


def enabled_wrappers(model_cfg) -> list[str]:
    load()
    return [name for name, cls in sorted(WRAPPERS.items()) if cls.enabled(model_cfg)]


def sharding_rules(model_cfg) -> dict:
    """The logical-axis rules of the blocks and wrapper a model uses (the generic ones: memjax.parallel)."""
    table = {}
    wrapper = active_wrapper(model_cfg)
    for cls in blocks_in_use(model_cfg):
        table.update(cls.sharding_rules(model_cfg))
    if wrapper is not None:
        table.update(wrapper.axis_rules)
    return table


def state_axes(model_cfg) -> frozenset:
    """The union of the state axes (`Block.state_axes`) of the blocks and wrapper a model uses."""
    wrapper = active_wrapper(model_cfg)
    axes = frozenset().union(*(cls.state_axes for cls in blocks_in_use(model_cfg)))
    return axes | wrapper.state_axes if wrapper is not None else axes
