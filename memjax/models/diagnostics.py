"""The batch loop behind every `eval_metrics` hook (memjax.models.registry).

A family's diagnostics switch recording on in its layers, run the model on one evaluation batch, read the
values the layers sowed (`nnx.Intermediate`) and reduce them; the hook then combines batches. The per-batch
function is jitted once per function with the graph definition static, so an evaluation compiles it once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx


def capture(graphdef, params, inputs_BxT, switch_on: Callable[[nnx.Module], None]) -> tuple[nnx.Module, dict]:
    """The model (for its layer layout) and what its layers sowed on `inputs_BxT` as a pure dict, after
    `switch_on(model)` set their recording flags. For use inside a per-batch function (traced)."""
    model = nnx.merge(graphdef, params)
    switch_on(model)
    _, captured = nnx.capture(model, nnx.Intermediate)(inputs_BxT)
    return model, nnx.to_pure_dict(captured)


@functools.cache
def _jitted(per_batch: Callable):
    return jax.jit(per_batch, static_argnums=0)


def per_batch(fn: Callable, graphdef, params, batches) -> Iterator[Any]:
    """`fn(graphdef, params, inputs_BxT)` on each batch's "inputs", jitted, its results on the host."""
    jitted = _jitted(fn)
    for batch in batches:
        yield jax.device_get(jitted(graphdef, params, batch["inputs"]))


def batch_mean(fn: Callable, graphdef, params, batches) -> dict[str, float]:
    """The mean over batches of `fn`'s {metric name: scalar} (each batch weighs the same)."""
    totals, count = {}, 0
    for values in per_batch(fn, graphdef, params, batches):
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += 1
    return {name: total / count for name, total in totals.items()} if count else {}


def batch_sum(fn: Callable, graphdef, params, batches) -> Any:
    """The elementwise sum over batches of `fn`'s array tree (in the arrays' own dtype), or None."""
    total = None
    for values in per_batch(fn, graphdef, params, batches):
        total = values if total is None else jax.tree_util.tree_map(np.add, total, values)
    return total
