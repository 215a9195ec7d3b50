"""The neural-memory chunk scan (Titans / ATLAS / Miras linear path): reference, Pallas TPU and GPU kernels
sharing one per-group body, and the api (`kernel = auto | reference | pallas`, custom VJP, shard_map)."""
