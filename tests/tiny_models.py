"""The tests' tiny model and the checks on it, defined once: imported by conftest's fixtures, test modules and the
fault worker."""

from __future__ import annotations

import torch
from bridge_models import skip_without_hooked

import cbinterp
from cbinterp.core import tl_compat as tc
from cbinterp.core.tl_compat import Model as HookedTransformer
from cbinterp.recipes.gpt import gpt_config

#: The shape of the tiny model, as `gpt_config` takes it (pre-LN, GELU, rotary positions, d_head = 8).
TINY = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, n_ctx=16, d_vocab=11)


def make_model(seed: int = 0, **overrides) -> HookedTransformer:
    """A fresh tiny HookedTransformer on the CPU with deterministic weights (no Hub access).

    `overrides`: other shape arguments or HookedTransformerConfig fields (e.g. ``d_vocab=5``, ``dtype=...``). Under
    pytest on transformer-lens 4 (no HookedTransformer) the calling test skips with the reason."""
    skip_without_hooked()
    torch.manual_seed(seed)
    return tc.build_hooked(gpt_config(**{**TINY, **overrides}, seed=seed, device="cpu")).eval()


def add_codebooks(model: HookedTransformer, seed: int = 0, sites=("attn", "mlp"), n_codes: int = 16, **codebooks):
    """`model` itself with codebooks at `sites` (`codebooks`: more `attach_codebooks` settings)."""
    return cbinterp.attach_codebooks(model, list(sites), n_codes=n_codes, seed=seed, **codebooks)


def make_cb_model(seed: int = 0, sites=("attn", "mlp"), n_codes: int = 16, **codebooks) -> HookedTransformer:
    """The tiny model of `seed` with codebooks at `sites`, seeded by `seed` too."""
    return add_codebooks(make_model(seed), seed, sites, n_codes, **codebooks)


def assert_same_state(a, b, atol: float | None = None) -> None:
    """Assert that two models (or state dicts) hold the same entries, each exactly equal.

    With `atol`, floating-point entries need only be close (that atol, rtol 1e-4); the others (integer buffers such
    as usage counts) must still be equal."""
    sa = a.state_dict() if isinstance(a, torch.nn.Module) else a
    sb = b.state_dict() if isinstance(b, torch.nn.Module) else b
    assert sa.keys() == sb.keys()
    for name in sa:
        if atol is not None and sa[name].dtype.is_floating_point:
            torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=1e-4, msg=name)
        else:
            assert torch.equal(sa[name], sb[name]), name
