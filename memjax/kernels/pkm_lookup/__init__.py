"""Product-key value lookup (weighted embedding bag): reference, Pallas TPU and GPU kernels, api."""
