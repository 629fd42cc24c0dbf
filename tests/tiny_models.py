"""The tests' tiny model, defined once: imported by conftest's fixtures, test modules and the fault worker."""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

TINY = dict(
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_mlp=64,
    d_vocab=11,
    n_ctx=16,
    normalization_type="LN",
    positional_embedding_type="rotary",
    act_fn="gelu",
)


def make_model(seed: int = 0, **overrides) -> HookedTransformer:
    """A fresh tiny HookedTransformer on the CPU with deterministic weights (no Hub access)."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(**{**TINY, **overrides}, seed=seed, device="cpu")
    return HookedTransformer(cfg).eval()
