"""Input checks shared by the code and neuron classifiers (positions already flattened)."""

from __future__ import annotations

import operator

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

Features = Bool[Tensor, "n_tokens n_features"] | Int[Tensor, " n_tokens"]


def _as_int(value, what: str) -> int:
    """`value` as an int (Python, numpy or a 0-d integer tensor); a bool is refused, not read as 0 or 1."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{what} must be an int, got the bool {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}.") from None


def _check_codes(codes, n_codes, what: str = "codes") -> Int[Tensor, "n_tokens k"]:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of code ids, got {type(codes).__name__}.")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise TypeError(
            f"{what} must be an integer tensor of code ids (-1 = no code), got dtype {codes.dtype}; "
            f"pass the `hook_codes` activation as cached (int64)."
        )
    if codes.dim() != 2:
        raise ValueError(
            f"{what} must have shape (n_positions, k), got {tuple(codes.shape)}. Flatten batch and position first "
            f"(codes.flatten(0, 1)); for a per-head codebook pass one head (codes[:, h]) or use code_feature_table, "
            f"which iterates heads."
        )
    n_codes = _as_int(n_codes, "n_codes")
    if n_codes < 1:
        raise ValueError(f"n_codes must be >= 1, got {n_codes}.")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -1 or hi >= n_codes:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"{what} holds code id {bad}, outside [0, n_codes={n_codes}) and not -1 (no code); "
                f"pass the codebook's n_codes."
            )
    return codes.long()


def _check_features(features, n_positions: int, n_features: int | None) -> tuple[Tensor, bool, int]:
    """Validate `features`; returns (features, is_labels, n_features)."""
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}.")
    if n_features is not None:
        n_features = _as_int(n_features, "n_features")
        if n_features < 0:
            raise ValueError(f"n_features must be >= 0, got {n_features}.")
    form = "bool (n_positions, n_features) or integer labels (n_positions,) with -1 for none"
    is_mask = features.dtype == torch.bool
    if is_mask and features.dim() != 2:
        raise ValueError(
            f"bool features must have shape (n_positions, n_features), got {tuple(features.shape)}; "
            f"give a single feature mask as mask[:, None], and flatten batch and position first."
        )
    if features.is_floating_point() or features.is_complex():
        raise TypeError(
            f"features must be {form}; got dtype {features.dtype}. Convert a 0/1 matrix with features.bool()."
        )
    if not is_mask and features.dim() != 1:
        raise ValueError(
            f"integer features are labels and must have shape (n_positions,), got {tuple(features.shape)}; "
            f"flatten batch and position first, or pass a (n_positions, n_features) 0/1 matrix as features.bool()."
        )
    if features.shape[0] != n_positions:
        raise ValueError(
            f"features has {features.shape[0]} positions but the codes/activations have {n_positions}; "
            f"both must be flattened over the same positions, in the same order."
        )
    if is_mask:
        if n_features is not None and n_features != features.shape[1]:
            raise ValueError(f"n_features={n_features} does not match features' {features.shape[1]} columns.")
        return features, False, features.shape[1]
    features = features.long()
    top = int(features.max()) if features.numel() else -1
    if features.numel() and int(features.min()) < -1:
        raise ValueError(f"feature labels must be >= -1 (-1 = no feature), got {int(features.min())}.")
    if n_features is None:
        n_features = top + 1
    elif top >= n_features:
        raise ValueError(f"feature label {top} is out of range for n_features={n_features}.")
    return features, True, n_features


def _check_acts(acts, what: str = "acts") -> Float[Tensor, "n_tokens n_neurons"]:
    if not isinstance(acts, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(acts).__name__}.")
    if not acts.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor of activations, got dtype {acts.dtype}.")
    if acts.dim() != 2:
        raise ValueError(
            f"{what} must have shape (n_positions, n_neurons), got {tuple(acts.shape)}; flatten batch and position "
            f"(acts.flatten(0, 1)) and any per-head axes (acts.flatten(1))."
        )
    return acts


def _chunk(chunk_elements) -> int:
    chunk_elements = _as_int(chunk_elements, "chunk_elements")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}.")
    return chunk_elements


def _feature_positions(features: Tensor, is_labels: bool, f: int) -> Int[Tensor, " n"]:
    column = features == f if is_labels else features[:, f]
    return column.nonzero().flatten()
