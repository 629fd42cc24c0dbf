"""Bring your own model: Hugging Face models in and out, and the paper's released checkpoints.

`from_hf` (causal LMs in), `from_codebook_features` (the authors' checkpoints), `to_hf` (cbinterp models out)."""

from cbinterp.models.codebook_features import from_codebook_features
from cbinterp.models.from_hf import SUPPORTED_ARCHITECTURES, from_hf
from cbinterp.models.to_hf import to_hf

__all__ = ["SUPPORTED_ARCHITECTURES", "from_codebook_features", "from_hf", "to_hf"]
