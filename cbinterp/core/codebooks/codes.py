"""Conventions for code ids: -1 means "no code", and a code counts once per position."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

__all__ = ["NO_CODE", "dedupe_codes"]

#: The id that stands for "no code" (written by interventions that ablate or replace codes).
NO_CODE = -1


def dedupe_codes(codes: Int[Tensor, "n k"]) -> Int[Tensor, "n k"]:
    """Each row sorted, with repeats of a code id replaced by NO_CODE, so that a code counts once per position."""
    if codes.shape[1] < 2:
        return codes
    s = codes.sort(dim=1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return s.masked_fill(dup, NO_CODE)
