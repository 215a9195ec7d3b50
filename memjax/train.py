"""`python -m memjax.train --config configs/quickstart.py --workdir runs/quick [--config.a.b=v ...]`"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from memjax import checkpoint, config, parallel, reliability, trainer
from memjax.data import DataError


def _flags() -> tuple:
    """The CLI's flags, defined when it runs (not at import: importing memjax.train next to another CLI
    module, memjax.benchmark say, would define --config twice)."""
    config_file = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                                  lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tensorboard, metrics.jsonl.")
    flags.mark_flags_as_required(["config", "workdir"])
    return config_file, workdir


def main(argv, flag_values) -> None:
    del argv
    config_file, workdir = flag_values
    # orbax and grain log every checkpoint step at INFO through absl; keep the console for our messages.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("memjax").setLevel(logging.INFO)
    try:
        cfg = config_file.value
        config.validate(cfg)  # a bad value is named before a multi-host start waits for its peers
        parallel.initialize_distributed(cfg.mesh.distributed)  # before anything touches a device
        trainer.train(cfg, workdir.value)
    except (config.ConfigError, DataError, reliability.NonFiniteError, checkpoint.CheckpointError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # the workdir's disk or permissions (e.g. metrics.jsonl on a full disk)
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    _FLAG_VALUES = _flags()
    app.run(lambda argv: main(argv, _FLAG_VALUES), flags_parser=config.parse_command_line)
