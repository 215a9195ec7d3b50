"""One orbax CheckpointManager per run, under `<workdir>/checkpoints/<step>/`.

Items of a checkpoint: `params` (the model's parameters, all that sampling and `init_from` need),
`train` (optimizer state, step, rng) and `data` (the grain iterator's position, so a resume continues
the exact data stream). Saves are asynchronous; orbax writes to a temporary directory and renames it
when complete, so an interrupted save never looks like a checkpoint.
"""

from __future__ import annotations

import logging
import os

import json

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import multihost

ITEMS = ("params", "train", "data")
log = logging.getLogger("memjax")


def directory(workdir: str, checkpoint_dir: str = "") -> str:
    """A run's checkpoint directory: `train.checkpoint_dir` if set (a local path or a gs:// URL shared
    by all hosts), else `<workdir>/checkpoints`. Without `checkpoint_dir`, the run's saved config.json
    (if any) says where it checkpointed."""
    if not checkpoint_dir:
        saved = os.path.join(workdir, "config.json")
        if os.path.exists(saved):
            with open(saved, encoding="utf-8") as f:
                checkpoint_dir = json.load(f).get("train", {}).get("checkpoint_dir", "")
    if checkpoint_dir:
        return checkpoint_dir if "://" in checkpoint_dir else os.path.abspath(checkpoint_dir)
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool, read_only: bool = False):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # A save killed midway leaves only a *.orbax-checkpoint-tmp directory, never a step: remove it.
            cleanup_tmp_directories=not read_only,
        )
        self.directory = directory
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iterator) -> None:
        train = _nonempty({k: v for k, v in state.items() if k != "params"})
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                train=ocp.args.StandardSave(train),
                data=grain.checkpoint.CheckpointSave(data_iterator),
            ),
        )

    def restore(self, step: int, abstract_state: dict, data_iterator) -> dict:
        """The train state at `step`; `data_iterator` is moved to its saved position in place."""
        abstract_train = {k: v for k, v in abstract_state.items() if k != "params"}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                train=ocp.args.StandardRestore(_nonempty(abstract_train)),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return {"params": restored["params"], **_with_empty(abstract_train, restored["train"])}

    def restore_latest(self, abstract_state: dict, data_iterator) -> tuple[dict, int] | None:
        """(state, step) of the newest checkpoint that restores, or None if there is none.

        A checkpoint that fails to restore (truncated or deleted files) is renamed `<step>.corrupt`, with
        a warning, and the previous one is tried.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                restored = self.restore(step, abstract_state, data_iterator)
            except Exception as err:  # orbax/tensorstore raise many kinds; any of them means unusable
                aside = epath.Path(self.directory) / f"{step}.corrupt"
                if jax.process_index() == 0:
                    (epath.Path(self.directory) / str(step)).rename(aside)
                multihost.sync_global_processes(f"memjax_set_aside_{step}")
                self.manager.reload()  # forget the step, so training can save it again
                log.warning("checkpoint at step %d cannot be restored (%s: %s); moved it to %s and trying the "
                            "previous one", step, type(err).__name__, str(err).splitlines()[0][:200], aside)
                continue
            return restored, step
        if steps:
            raise RuntimeError(f"none of the checkpoints {steps} under {self.directory} can be restored")
        return None

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        restored = self.manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
        )
        return restored["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_params(workdir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
    """Parameters of another run (latest checkpoint unless `step`), for sampling and `init_from`."""
    ckpt = Checkpointer(directory(workdir), keep=0, async_save=False, read_only=True)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {directory(workdir)}")
    params = ckpt.restore_params(step, abstract_params)
    ckpt.close()
    return params, step


def abstract_like(tree):
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


# orbax refuses zero-size arrays, and a carried memory can hold some (e.g. an Omega-window history of
# c - 1 = 0 tokens). They carry no information: saved as one-element placeholders, rebuilt on restore.
def _nonempty(tree):
    def placeholder(x):
        if x.size:
            return x
        sharding = getattr(x, "sharding", None)
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()) if isinstance(
            sharding, jax.sharding.NamedSharding) else None
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((1,), x.dtype, sharding=replicated)
        return jnp.zeros((1,), x.dtype, device=replicated)

    return jax.tree_util.tree_map(placeholder, tree)


def _with_empty(abstract_tree, restored):
    return jax.tree_util.tree_map(lambda a, x: x if a.size else jnp.zeros(a.shape, a.dtype, device=a.sharding),
                                  abstract_tree, restored)
