"""`to_hf`: a HookedTransformer (the shipped english-baseline, tiny ones of other settings) becomes a Hugging Face
folder that plain `transformers` runs with the same logits, and `from_hf` reads back."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as hf
from _hf_tiny import make_hf_model

import cbinterp
from cbinterp.models import from_hf, to_hf
from cbinterp.models.to_hf import EXPORT_FILE
from cbinterp.pretrained import load_pretrained

pytestmark = pytest.mark.needs_hooked  # from_hf / to_hf convert to and from a HookedTransformer

TEXT = [
    "The little dog ran to the park, and then it sat under a big tree.",
    "Once upon a time there was a girl who liked to read books about the sea.",
]


def plain_transformers(folder):
    """The export as anyone without cbinterp loads it."""
    model = hf.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    return model, hf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def baseline():
    return load_pretrained("english-baseline", device="cpu")


def test_english_baseline_exports_exactly(baseline, tmp_path, no_network):
    folder = to_hf(baseline, tmp_path / "export")
    model, tokenizer = plain_transformers(folder)
    assert type(model).__name__ == "PhiForCausalLM"
    for text in TEXT:
        ids = tokenizer(text, return_tensors="pt").input_ids
        assert torch.equal(ids, baseline.to_tokens(text))  # same ids, BOS first, from the plain tokenizer
        with torch.no_grad():
            diff = (model(ids).logits - baseline(ids)).abs().max().item()
        print(f"english-baseline -> PhiForCausalLM: max |logit diff| {diff:.2e}")
        assert diff < 1e-4
    record = json.loads((folder / EXPORT_FILE).read_text())
    assert [layer["block"] for layer in record["layers"]] == [0, 0, 1, 1]
    assert record["default_prepend_bos"] is True


def test_english_baseline_round_trips_through_from_hf(baseline, tmp_path, no_network):
    back = from_hf(to_hf(baseline, tmp_path / "export"), device="cpu")
    assert back.cfg.n_layers == 2 * baseline.cfg.n_layers
    ids = baseline.to_tokens(TEXT)
    assert torch.equal(back.to_tokens(TEXT), ids)  # the BOS default comes back with the export
    with torch.no_grad():
        assert (back(ids) - baseline(ids)).abs().max().item() < 1e-5


def test_a_parallel_model_maps_one_block_to_one_layer(tmp_path, no_network):
    phi = make_hf_model("phi")
    model = from_hf(phi, device="cpu")
    folder = to_hf(model, tmp_path / "export")
    again, _ = plain_transformers(folder)
    assert again.config.num_hidden_layers == phi.config.num_hidden_layers
    tokens = torch.randint(0, phi.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (again(tokens).logits - phi(tokens).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "overrides",
    [
        {"act_fn": "gelu_new"},
        {"act_fn": "gelu_fast"},
        {"act_fn": "relu"},
        {"act_fn": "silu"},
        {"normalization_type": "LNPre"},
        {"rotary_dim": 4, "rotary_base": 500},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_other_settings_export_exactly(overrides, make_tiny_model, tmp_path, no_network):
    model = make_tiny_model(seed=3, **overrides)
    with torch.no_grad():  # trained-looking norms and biases, not the initial ones and zeros
        generator = torch.Generator().manual_seed(3)
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    exported, _ = plain_transformers(to_hf(model, tmp_path / "export"))
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (exported(tokens).logits - model(tokens)).abs().max().item() < 1e-5


def test_a_model_with_codebooks_is_refused(make_tiny_model, tmp_path):
    model = cbinterp.attach_codebooks(make_tiny_model(), "attn", n_codes=4, k=1)
    with pytest.raises(ValueError, match="codebooks attached.*detach_codebooks"):
        to_hf(model, tmp_path / "export")
    to_hf(cbinterp.detach_codebooks(model), tmp_path / "export")


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"positional_embedding_type": "standard"}, "positional_embedding_type"),
        ({"normalization_type": "RMS"}, "normalization_type"),
        ({"gated_mlp": True}, "gated_mlp"),
        ({"act_fn": "solu_ln"}, "act_fn"),
        ({"n_key_value_heads": 2}, "n_key_value_heads"),
    ],
)
def test_settings_phi_cannot_reproduce_are_refused_by_name(overrides, named, make_tiny_model, tmp_path):
    with pytest.raises(ValueError, match=f"cannot be written exactly.*{named}"):
        to_hf(make_tiny_model(**overrides), tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_only_an_earlier_export_is_replaced(make_tiny_model, tmp_path):
    folder = tmp_path / "export"
    to_hf(make_tiny_model(seed=1), folder)
    to_hf(make_tiny_model(seed=2), folder)  # an earlier export: replaced
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="earlier to_hf did not write"):
        to_hf(make_tiny_model(seed=3), folder)
    assert (folder / "notes.txt").read_text() == "mine"
