"""Training: the loop and its config, checkpoints, data parallel, fused kernels, determinism, loggers."""

__all__: list[str] = []  # the modules of this package are the API; nothing is re-exported here
