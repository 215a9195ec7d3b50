"""AdamW with a schedule, global-norm clipping, a weight-decay mask and parameter groups.

Every parameter belongs to one group: the first `optim.groups` entry whose regex matches its path
("blocks/0/mlp/up/kernel"), else "default". A group has its own learning-rate multiplier and weight
decay. Weight decay only ever applies to matrices (ndim >= 2), and never to a parameter created with
`decay=False` metadata (memjax.models.layers.param): a 2-D parameter that is no weight matrix (stacked
gate biases or norm scales, an initial memory, persistent tokens) says so where it is created, whatever
the config. Norms' scales and biases are never decayed.
"""

from __future__ import annotations

import logging
import re

import jax
import optax
from flax import nnx
from flax.nnx import traversals

DEFAULT_GROUP = "default"
log = logging.getLogger("memjax")
# (warmup_steps, total_steps) pairs already warned about: a run builds its schedule more than once
# (the optimizer, the logged lr, AOT), and one line per run is enough.
_warned_clamps: set[tuple[int, int]] = set()


def warmup_steps(optim_cfg, total_steps: int) -> int:
    """optim.warmup_steps, clamped to the run's length: a short trial of a config made for a long run
    (e.g. `--config.train.steps=50` on a quickstart) warms up over the whole run instead of failing."""
    warmup = optim_cfg.warmup_steps
    if warmup <= total_steps:
        return warmup
    if (warmup, total_steps) not in _warned_clamps:
        _warned_clamps.add((warmup, total_steps))
        log.warning("optim.warmup_steps=%d exceeds train.steps=%d: warming up over all %d steps",
                    warmup, total_steps, total_steps)
    return total_steps


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    peak, warmup = optim_cfg.lr, warmup_steps(optim_cfg, total_steps)
    floor = peak * optim_cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_cfg.min_lr_ratio)
    elif optim_cfg.schedule == "linear":
        after = optax.linear_schedule(peak, floor, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def group_labels(optim_cfg, params) -> dict:
    """The group name of every parameter leaf (same tree structure as params)."""
    patterns = [(name, re.compile(group.pattern)) for name, group in optim_cfg.groups.items()]

    def label(path, _):
        name = path_str(path)
        return next((group for group, regex in patterns if regex.search(name)), DEFAULT_GROUP)

    return jax.tree_util.tree_map_with_path(label, params)


def decay_mask(model) -> dict:
    """Whether weight decay applies to each parameter of `model` (an nnx module, abstract or not), as a
    tree like its parameters' pure dict: matrices, unless marked `decay=False`."""
    flat = {tuple(path): len(x.shape) >= 2 and x.get_metadata().get("decay", True)
            for path, x in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return traversals.unflatten_mapping(flat)


def weight_decays(optim_cfg, model) -> dict:
    """The weight-decay rate each parameter of `model` gets (a tree like its parameters' pure dict): its
    group's, or 0 where `decay_mask` exempts it."""
    rates = {DEFAULT_GROUP: optim_cfg.weight_decay}
    rates.update({name: g.weight_decay for name, g in optim_cfg.groups.items()})
    labels = group_labels(optim_cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return jax.tree_util.tree_map(lambda label, decays: rates[label] if decays else 0.0, labels, decay_mask(model))


def make(optim_cfg, model, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of `model`'s parameters (an nnx module, abstract or not: its structure, paths and
    parameter metadata are read, not its values)."""
    lr = schedule(optim_cfg, total_steps)
    settings = {DEFAULT_GROUP: (1.0, optim_cfg.weight_decay)}
    settings.update({name: (g.lr_mult, g.weight_decay) for name, g in optim_cfg.groups.items()})
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    decays = decay_mask(model)

    def group_tx(lr_mult: float, weight_decay: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
            optax.add_decayed_weights(weight_decay, mask=decays),
            optax.scale_by_learning_rate(lambda step: lr(step) * lr_mult),
        )

    transforms = {name: group_tx(*s) for name, s in settings.items()}
    chain = [optax.clip_by_global_norm(optim_cfg.clip_norm)] if optim_cfg.clip_norm > 0 else []
    chain.append(optax.multi_transform(transforms, group_labels(optim_cfg, params)))
    return optax.chain(*chain)
