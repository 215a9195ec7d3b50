"""`python -m memjax.train --config configs/quickstart.py --workdir runs/quick [--config.a.b=v ...]`"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from memjax import checkpoint, config, parallel, reliability, trainer
from memjax.data import DataError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, tensorboard, metrics.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    del argv
    # orbax and grain log every checkpoint step at INFO through absl; keep the console for our messages.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("memjax").setLevel(logging.INFO)
    try:
        cfg = _CONFIG.value
        config.validate(cfg)  # a bad value is named before a multi-host start waits for its peers
        parallel.initialize_distributed(cfg.mesh.distributed)  # before anything touches a device
        trainer.train(cfg, _WORKDIR.value)
    except (config.ConfigError, DataError, reliability.NonFiniteError, checkpoint.CheckpointError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # the workdir's disk or permissions (e.g. metrics.jsonl on a full disk)
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main, flags_parser=config.parse_command_line)
