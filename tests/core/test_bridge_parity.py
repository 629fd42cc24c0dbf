"""A HookedTransformer (transformer-lens 3.9) and a TransformerBridge (4.x) of the same weights give the same codes.

The fixture (tools/bridge_parity.py, written under 3.9) holds tiny GPT-NeoX, GPT-2 and Llama folders and what
`from_hf` with codebooks gave on them; each side checks itself against it in its own environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from bridge_models import ARCHITECTURES
from safetensors.torch import load_file

import cbinterp
from cbinterp.core import tl_compat as tc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import bridge_parity  # noqa: E402

needs_bridge = pytest.mark.skipif(
    not tc.BRIDGE_SUPPORTED, reason=f"cbinterp takes a TransformerBridge from transformer-lens 4 on ({tc.TL_VERSION})"
)


@pytest.mark.needs_hooked
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_fixture_is_what_from_hf_gives(arch):
    folder = bridge_parity.FIXTURE / arch
    want = load_file(folder / "expected.safetensors")
    model = bridge_parity.with_codebooks(cbinterp.from_hf(folder, device="cpu"))
    got = bridge_parity.logits_and_codes(model, want["tokens"])
    assert torch.equal(got["logits"], want["logits"])
    assert {k for k in want if k.startswith("codes.")} == {k for k in got if k.startswith("codes.")}
    for key in got:
        assert torch.equal(got[key], want[key]), key


@needs_bridge
@pytest.mark.parametrize("mode", ["plain", "compat_no_processing"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_bridge_gives_the_hooked_transformers_codes_and_logits(arch, mode):
    """As booted, or in compatibility mode without weight processing: every code id equal, logits to float rounding."""
    result = bridge_parity.compare(bridge_parity.FIXTURE / arch, mode)
    assert result["same_codebooks"]
    assert result["code_agreement_min"] == 1.0, result["code_agreement"]
    assert result["max_abs_logit_diff"] <= 1e-5


@needs_bridge
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_weight_processing_moves_the_codebooks_inputs(arch):
    """HookedTransformer's default processing (centred writing weights, folded value biases) changes what reaches a
    codebook after an MLP or a head wherever the model has biases; a bias-free Llama keeps every code. Codebooks
    trained on one must run on a model processed alike."""
    result = bridge_parity.compare(bridge_parity.FIXTURE / arch, "compat")
    if arch == "llama":
        assert result["code_agreement_min"] == 1.0 and result["max_abs_log_prob_diff"] <= 1e-5
    else:
        assert result["code_agreement_min"] < 0.95
