"""Code ids of every codebook from a TransformerLens `ActivationCache` of one forward pass (nothing on disk)."""

from __future__ import annotations

import torch
from jaxtyping import Bool
from torch import Tensor

from cbinterp.core.codebooks.naming import CODES_SUFFIX

__all__ = ["cached_codes"]


def cached_codes(cache, mask: Bool[Tensor, "batch pos"] | None = None) -> dict[str, Tensor]:
    """The code ids of every codebook in an `ActivationCache` (or any name -> tensor mapping), positions flattened.

    Returns `{codebook name: codes}` keyed by the codebook's hook name (".hook_codes" removed, as in
    `get_codebooks`), each `(n_positions, k)` or `(n_positions, n_heads, k)`. `mask (batch, pos)` keeps only the
    positions where it is True (e.g. to drop BOS or padding); without it all `batch * pos` positions are kept.
    """
    out = {}
    for name in list(cache.keys()):
        if not name.endswith(CODES_SUFFIX):
            continue
        codes = cache[name]
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(codes.shape[:2]):
                raise ValueError(
                    f"mask must be a bool tensor of shape (batch, pos) = {tuple(codes.shape[:2])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}."
                )
            out[name.removesuffix(CODES_SUFFIX)] = codes[mask.to(codes.device)]
        else:
            out[name.removesuffix(CODES_SUFFIX)] = codes.flatten(0, 1)
    if not out:
        raise ValueError(
            "The cache holds no '*.hook_codes' activations; run_with_cache a model with codebooks attached."
        )
    return out
