"""Where a model goes when the caller names no device: the one rule every entry point and script follows."""

from __future__ import annotations

import torch

__all__ = ["default_device"]


def default_device() -> str:
    """The default device: `"cuda"` when a CUDA device is present, else `"cpu"`."""
    return "cuda" if torch.cuda.is_available() else "cpu"
