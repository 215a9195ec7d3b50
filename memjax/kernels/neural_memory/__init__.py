"""The neural-memory chunk scan (Titans / ATLAS / Miras linear path): the engine (the memory's math in pure
JAX, which memjax.memory's layers build on), reference, Pallas TPU and GPU kernels sharing one per-group
body, and the api (`kernel = auto | reference | pallas`, custom VJP, shard_map)."""
