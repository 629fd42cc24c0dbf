"""Argument checks shared across the package: plain numbers and token ids."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["is_int", "is_real", "check_token_ids"]


def is_int(value) -> bool:
    """True for an integer (Python or numpy), never for a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """True for a finite real number (Python or numpy), never for a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_token_ids(tokens: Tensor, d_vocab: int, what: str = "tokens") -> Tensor:
    """Raise a ValueError unless every id of `tokens` lies in [0, d_vocab); return `tokens`.

    Python-style indexing would run a negative id as `d_vocab + id` and an id past the end fails deep inside the
    embedding, so every entry point that takes token ids checks them here first.
    """
    if tokens.numel() == 0 or tokens.dtype == torch.bool or tokens.is_floating_point() or tokens.is_complex():
        return tokens
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{what} hold the token id {bad}, outside the model's vocabulary [0, {d_vocab}). Token ids must be "
            f"0 <= id < d_vocab={d_vocab}; mark padding with a mask, not with -1 or another out-of-range id."
        )
    return tokens
