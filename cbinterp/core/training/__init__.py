"""Training: the loop and its config, checkpoints, data parallel, fused kernels, determinism, loggers."""
