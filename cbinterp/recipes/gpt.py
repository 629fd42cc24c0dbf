"""The GPT-style model shape that the recipes, the benchmarks and the tests build: one place that states it."""

from __future__ import annotations

from typing import Any

from cbinterp.core import tl_compat as tc
from cbinterp.core.device import default_device

__all__ = ["gpt_config"]


def gpt_config(
    n_layers: int,
    d_model: int,
    n_heads: int,
    d_mlp: int,
    n_ctx: int,
    d_vocab: int,
    *,
    seed: int,
    device: str | None = None,
    **settings: Any,
) -> tc.HookedTransformerConfig:
    """A pre-LayerNorm, GELU, rotary-position HookedTransformerConfig with d_head = d_model / n_heads.

    Args:
        seed: seeds the weights that `HookedTransformer(config)` draws.
        device: None for `default_device()` (CUDA when present, else the CPU).
        settings: further HookedTransformerConfig fields; they take precedence over the ones above (e.g.
            ``act_fn="relu"``, ``positional_embedding_type="standard"``, ``dtype=torch.bfloat16``).
    """
    if "d_head" not in settings and d_model % n_heads:
        raise ValueError(
            f"d_model {d_model} is not a multiple of n_heads {n_heads}: choose them so that d_head = d_model / n_heads "
            "is whole, or pass d_head yourself."
        )
    shape = dict(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp,
        n_ctx=n_ctx,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        positional_embedding_type="rotary",
        device=device or default_device(),
        seed=seed,
    )
    tc.require_hooked("gpt_config")
    return tc.HookedTransformerConfig(**{**shape, **settings})
