"""Eight fake CPU devices for sharding tests: must be set before jax is imported anywhere.

A persistent compilation cache, shared by the test workers of one checkout: many tests compile the
same programs again (a run and its resume, each subprocess of the reliability and multi-host tests,
one config trained by several tests), and compiling is most of their time. Keys hold the program,
the devices and the jax version, so an entry is reused only for an identical compile; an unreadable
entry is recompiled with a warning.
"""

import os

# LLVM optimisation level 0: the suite's programs are tiny and run a few times each, so its time is
# compiling, and LLVM's passes over the generated kernels are most of that (one ATLAS layer's fwd+bwd is
# ~875 fused kernels: 15.6 s -> 6.6 s to compile). XLA's own graph optimisations still run; the suite
# took 20.3 -> 16.1 min on 2 cores. Results may differ from an optimised build in the last bits (e.g.
# fused multiply-adds), which no test depends on: every reference is computed under the same flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The scaling fits' thousands of tiny solves (tests/test_scaling.py) run 20x slower with BLAS threads
# competing for the cores the other test worker uses; set before numpy loads, as experiments/scaling.py does.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Modules whose tests compile many programs or train end to end: most of the suite's time (its
# --durations list). `pytest -m "not slow"` leaves them out for a quick inner loop; CI runs them all.
SLOW_MODULES = frozenset({"test_conformance", "test_sharding", "test_segments", "test_multihost", "test_reliability",
                          "test_miras_configs", "test_titans_configs", "test_train",
                          "test_serve_chunk"})


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
