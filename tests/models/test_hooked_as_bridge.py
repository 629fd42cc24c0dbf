"""A folder saved from a HookedTransformer loads on transformer-lens 4 as a bridge (of the Phi model `to_hf` writes),
with the same logits and the same codes: the shipped models and a tiny model with codebooks at every kind of site.

The expected values were written under transformer-lens 3.9 by tools/bridge_parity.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cbinterp
from cbinterp.core import tl_compat as tc
from cbinterp.models.hooked_as_bridge import bridge_from_hooked, bridge_name, hooked_names

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import bridge_parity  # noqa: E402

FIXTURE = bridge_parity.FIXTURE / bridge_parity.HOOKED
needs_bridge = pytest.mark.skipif(
    not tc.BRIDGE_SUPPORTED, reason=f"cbinterp takes a TransformerBridge from transformer-lens 4 on ({tc.TL_VERSION})"
)
#: Two sequential blocks as `to_hf` lays them out: block L's attention is Phi layer 2L, its MLP layer 2L + 1.
SEQUENTIAL = [{"block": b, "holds": h} for b in (0, 1) for h in ("attention", "MLP")]


@pytest.mark.parametrize(
    "saved, on_bridge",
    [
        ("blocks.1.attn.hook_z", "blocks.2.attn.hook_z"),
        ("blocks.1.hook_attn_out", "blocks.2.hook_attn_out"),
        ("blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"),
        ("blocks.1.hook_resid_mid", "blocks.2.hook_resid_post"),
        ("blocks.1.hook_mlp_out", "blocks.3.hook_mlp_out"),
        ("blocks.1.mlp.hook_post", "blocks.3.mlp.hook_post"),
        ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
        ("hook_embed", "hook_embed"),
    ],
)
def test_each_hook_moves_to_the_phi_layer_of_its_sublayer(saved, on_bridge):
    assert bridge_name(saved, SEQUENTIAL) == on_bridge


def test_a_parallel_block_keeps_its_index():
    parallel = [{"block": 0, "holds": "attention and MLP"}, {"block": 1, "holds": "attention and MLP"}]
    assert bridge_name("blocks.1.hook_mlp_out", parallel) == "blocks.1.hook_mlp_out"
    assert bridge_name("blocks.1.attn.hook_z", parallel) == "blocks.1.attn.hook_z"


@pytest.mark.parametrize("name, problem", [("blocks.2.hook_mlp_out", "no block 2"), ("blocks.0.hook_x", "no place")])
def test_a_name_without_a_place_on_the_bridge_is_refused(name, problem):
    with pytest.raises(ValueError, match=problem):
        bridge_name(name, SEQUENTIAL)


@pytest.mark.needs_hooked
def test_the_fixture_is_what_the_hooked_transformers_give():
    """Written under 3.9; a change of the shipped models or of the tiny model's codebooks shows here first."""
    want = load_file(FIXTURE / "tiny_expected.safetensors")
    model = cbinterp.load(FIXTURE / "tiny", device="cpu")
    got = bridge_parity.summary(model, want["tokens"])
    assert set(got) == set(want) - {"tokens"}
    for key in got:
        assert torch.equal(got[key], want[key]), key
    want = load_file(FIXTURE / "shipped_expected.safetensors")
    assert torch.equal(bridge_parity.shipped_window(), want["tokens"])
    for name in bridge_parity.SHIPPED:
        got = bridge_parity.shipped_summary(cbinterp.load_pretrained(name, device="cpu"), want["tokens"])
        for key in got:
            assert torch.allclose(got[key].float(), want[f"{name}.{key}"].float(), atol=1e-5), (name, key)


@needs_bridge
def test_saved_hooked_transformers_load_as_bridges_with_the_same_codes_and_logits(no_network):
    results = bridge_parity.compare_hooked(FIXTURE)
    for name, result in results.items():
        assert result["class"] == "TransformerBridge", name
        assert result["same_codebooks"] and result["code_agreement_min"] == 1.0, (name, result)
    assert results["tiny"]["max_abs_logits_diff"] < 1e-5
    for name in bridge_parity.SHIPPED:
        assert results[name]["max_abs_next_log_prob_diff"] < 1e-4 and results[name]["greedy_agreement"] == 1.0


@needs_bridge
def test_a_rebuilt_bridge_names_its_codebooks_as_saved():
    model = cbinterp.load(FIXTURE / "tiny", device="cpu")
    names = hooked_names(model)
    assert names["blocks.2.attn.hook_z"] == "blocks.1.attn.hook_z"
    assert names["blocks.1.hook_mlp_out"] == "blocks.0.hook_mlp_out"
    assert names["blocks.0.hook_resid_post"] == "blocks.0.hook_resid_mid"
    assert model.cfg.n_layers == 4


@needs_bridge
def test_a_rebuilt_bridge_saves_and_loads_as_a_bridge(tmp_path):
    model = cbinterp.load(FIXTURE / "tiny", device="cpu")
    tokens = load_file(FIXTURE / "tiny_expected.safetensors")["tokens"]
    cbinterp.save(model, tmp_path / "again")
    back = cbinterp.load(tmp_path / "again", device="cpu")
    with torch.no_grad():
        assert torch.equal(back(tokens), model(tokens))
    assert set(cbinterp.get_codebooks(back)) == set(cbinterp.get_codebooks(model))


@needs_bridge
def test_a_setting_phi_cannot_reproduce_is_named():
    saved = json.loads((FIXTURE / "tiny" / "config.json").read_text())
    state = load_file(FIXTURE / "tiny" / "model.safetensors")
    model_config = {**saved["model_config"], "positional_embedding_type": "standard"}
    with pytest.raises(ValueError, match="positional_embedding_type is 'standard'"):
        bridge_from_hooked(model_config, state, saved["codebooks"], device="cpu")


@needs_bridge
def test_the_fsm_swap_names_its_conditions_by_the_saved_layers():
    from benchmarks import fsm_intervention

    conditions = fsm_intervention.conditions_of(cbinterp.load(FIXTURE / "tiny", device="cpu"))
    assert conditions["attn_layer_1"] == ["blocks.2.attn.hook_z"]
    assert conditions["mlp_layer_0"] == ["blocks.1.hook_mlp_out"]


def test_weights_of_another_shape_than_the_config_are_refused_before_allocating():
    from cbinterp.models.hooked_as_bridge import _config
    from cbinterp.models.to_hf import phi_model

    saved = json.loads((FIXTURE / "tiny" / "config.json").read_text())
    state = load_file(FIXTURE / "tiny" / "model.safetensors")
    model, layout = phi_model(_config(saved["model_config"]), state)
    assert len(layout) == 4 and not model.training
    state["embed.W_E"] = torch.zeros(21, 16)  # the config says d_vocab 20
    with pytest.raises(ValueError, match="do not match the config.*embed_tokens"):
        phi_model(_config(saved["model_config"]), state)
