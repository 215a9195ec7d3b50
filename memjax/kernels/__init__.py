"""Kernels: one package per op, `reference.py` (pure JAX, the source of truth), `pallas_tpu.py`,
`pallas_gpu.py` and `api.py` (dispatch on `kernel = auto | reference | pallas`, see `dispatch`)."""
