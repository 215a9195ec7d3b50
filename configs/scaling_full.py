"""One run of experiments/scaling.py's full preset (the Titans paper's sizes), as a config file: the
same config the study trains, for `memjax.train` on an accelerator or for `memjax.aot`'s fit check.

    python -m memjax.aot --config configs/scaling_full.py:titans_mag,760m --topology v5p:4x4x4
    python -m memjax.train --config configs/scaling_full.py:attention,170m --workdir runs/scaling_attention_170m

The argument is "<mixer>,<size>" with a mixer of scaling.FULL_MIXERS and a size of 170m / 340m / 760m (seed 0,
the preset's lr)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import scaling  # noqa: E402

SIZES = ("170m", "340m", "760m")


def get_config(spec: str = "titans_mag,170m"):
    mixer, _, size = spec.partition(",")
    if mixer not in scaling.FULL_MIXERS or size not in SIZES:
        raise ValueError(f"configs/scaling_full.py: expected '<mixer>,<size>' with a mixer of {scaling.FULL_MIXERS} "
                         f"and a size of {SIZES}, got {spec!r}")
    p = scaling.PRESETS["full"]
    return scaling.run_config(mixer, p["shapes"](mixer)[SIZES.index(size)], p["sweep_lrs"][0], 0, p)
