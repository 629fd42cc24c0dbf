"""Bring your own model: Hugging Face causal LMs in (`from_hf`) and cbinterp-trained models out (`to_hf`)."""

from cbinterp.models.from_hf import SUPPORTED_ARCHITECTURES, from_hf
from cbinterp.models.to_hf import to_hf

__all__ = ["SUPPORTED_ARCHITECTURES", "from_hf", "to_hf"]
