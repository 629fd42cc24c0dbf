"""Batches and train settings shared by the guarantee tests (test_guarantees_files.py, test_guarantees_values.py)."""

from __future__ import annotations

import torch

from cbinterp import TrainConfig


def batch_fn(seed: int = 0, batch: int = 4, seq: int = 8):
    def at(step):
        return torch.randint(0, 11, (batch, seq), generator=torch.Generator().manual_seed(seed * 1000 + step))

    return at


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(steps=3, lr=1e-3, progress=False, log_every=1), **kw})
