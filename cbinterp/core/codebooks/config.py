"""`CodebookConfig`: everything needed to rebuild a `Codebook`, checked on construction."""

from __future__ import annotations

import dataclasses
from typing import Literal

from cbinterp.core.checks import is_int, is_real

__all__ = ["COMBINES", "LOSSES", "OPTIONS", "SIMILARITIES", "CodebookConfig"]

Similarity = Literal["inner_product", "cosine", "euclidean"]
LossKind = Literal["aeloss", "vqvae"]
Combine = Literal["sum", "mean"]
SIMILARITIES = ("inner_product", "cosine", "euclidean")
LOSSES = ("aeloss", "vqvae")
COMBINES = ("sum", "mean")


@dataclasses.dataclass
class CodebookConfig:
    """Everything needed to rebuild a `Codebook` (saved as JSON beside the weights), checked on construction.

    Fields:
        dim: size of the activation's last dimension.
        n_codes: number of code vectors (per group).
        k: number of codes selected at each position (combined as `combine` says).
        groups: number of independent codebooks; `groups > 1` takes input `(..., groups, dim)`.
        similarity: "inner_product" (x.c / |c|), "cosine", or "euclidean" (negative distance).
        normalize_input: layer-normalise the activation before scoring it (scoring only: the output is made of codes).
        norm_affine: with `normalize_input`, that layer norm has its own scale and bias per group, the parameters
            `norm_weight` and `norm_bias` of shape (groups, dim) (1 and 0 when built), as codebook-features'
            codebooks have. They are frozen (`requires_grad=False`): cbinterp loads and saves them, never trains them.
        combine: "sum" (the output is the sum of the k selected codes) or "mean" (their sum / k, as codebook-features
            does; an id of -1, no code, counts as a zero code among the k).
        loss: "aeloss" trains codes on |x - q|^2; "vqvae" adds a commitment term (weight `beta`) on the input.
        recon_weight: weight (>= 0) of the reconstruction (mean squared error) loss for the codes.
        beta: weight (>= 0) of the vqvae commitment loss.
        dead_after: inside `train`, re-initialise codes unused for this many steps from recent inputs.
        dead_check_every: how often (training steps, >= 1) dead codes are looked for.
        replace_noise: relative noise (>= 0) added to a replaced code.
        init_std: standard deviation (> 0) of the random initial codes.
        seed: seed of the initial codes.
    """

    dim: int
    n_codes: int
    k: int = 1
    groups: int = 1
    similarity: Similarity = "inner_product"
    normalize_input: bool = False
    norm_affine: bool = False
    combine: Combine = "sum"
    loss: LossKind = "aeloss"
    recon_weight: float = 1.0
    beta: float = 0.25
    dead_after: int | None = None
    dead_check_every: int = 50
    replace_noise: float = 0.01
    init_std: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every setting (types and ranges); the one place codebook settings are validated."""
        for field in ("dim", "n_codes", "k", "groups", "dead_check_every"):
            value = getattr(self, field)
            if not is_int(value) or value < 1:
                raise ValueError(f"Codebook {field} must be a positive int, got {value!r}.")
            setattr(self, field, int(value))
        if self.k > self.n_codes:
            raise ValueError(
                f"k={self.k} is larger than n_codes={self.n_codes}: a codebook cannot select more codes "
                f"than it has. Use k <= n_codes."
            )
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"Unknown similarity {self.similarity!r}; choose one of {SIMILARITIES}.")
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown codebook loss {self.loss!r}; choose one of {LOSSES}.")
        for field in ("normalize_input", "norm_affine"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be True or False, got {getattr(self, field)!r}.")
        if self.norm_affine and not self.normalize_input:
            raise ValueError(
                "norm_affine=True gives the input layer norm a scale and bias, but normalize_input is False (no "
                "layer norm). Set normalize_input=True as well, or leave norm_affine False."
            )
        if self.combine not in COMBINES:
            raise ValueError(f"Unknown combine {self.combine!r}; choose one of {COMBINES}.")
        if self.dead_after is not None:
            if not is_int(self.dead_after) or self.dead_after < 1:
                raise ValueError(f"dead_after must be None or an int >= 1 (steps), got {self.dead_after!r}.")
            self.dead_after = int(self.dead_after)
        for field in ("recon_weight", "beta", "replace_noise", "init_std"):
            value = getattr(self, field)
            if not is_real(value) or value < 0 or (field == "init_std" and value == 0):
                need = "> 0" if field == "init_std" else ">= 0"
                raise ValueError(f"Codebook {field} must be a finite number {need}, got {value!r}.")
            setattr(self, field, float(value))
        if not is_int(self.seed):
            raise ValueError(f"Codebook seed must be an int, got {self.seed!r}.")
        self.seed = int(self.seed)


OPTIONS = tuple(f.name for f in dataclasses.fields(CodebookConfig) if f.name not in ("dim", "n_codes"))
