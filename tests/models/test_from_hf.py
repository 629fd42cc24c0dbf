"""`from_hf`: local Hugging Face folders (and models in memory) of each supported architecture become
HookedTransformers with the same logits, their tokenizer attached, without any network access."""

from __future__ import annotations

import pytest
import torch
import transformers as hf
from _hf_tiny import CONFIGS, VOCAB, make_hf_model, make_tokenizer

import cbinterp
from cbinterp.models import SUPPORTED_ARCHITECTURES, from_hf
from cbinterp.models.from_hf import check_logits

pytestmark = pytest.mark.needs_hooked  # from_hf / to_hf convert to and from a HookedTransformer

TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def max_diff(hf_model, model, tokens=TOKENS) -> float:
    with torch.no_grad():
        return (hf_model(tokens).logits - model(tokens)).abs().max().item()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_logits_match_the_hugging_face_model(arch, hf_folder, no_network):
    folder, hf_model = hf_folder(arch)
    model = from_hf(folder, device="cpu")
    assert model.cfg.original_architecture == type(hf_model).__name__
    diff = max_diff(hf_model, model)
    print(f"{arch}: max |logit diff| {diff:.2e}")
    assert diff < 1e-5


def test_every_supported_architecture_is_tested():
    built = {hf.AutoModelForCausalLM.from_config(make()).__class__.__name__ for make in CONFIGS.values()}
    assert built == set(SUPPORTED_ARCHITECTURES)


def test_recorded_names_never_lead_to_the_hub(hf_folder, no_network):
    folder, _ = hf_folder("neox")
    model = from_hf(folder, device="cpu")
    assert model.cfg.tokenizer_name is None
    assert model.cfg.trust_remote_code is False
    assert model.cfg.model_name == folder.name


def test_a_model_in_memory_is_converted_and_left_alone(no_network):
    hf_model = make_hf_model("llama").train()
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}
    model = from_hf(hf_model, device="cpu")
    assert hf_model.training  # the logit check ran it in eval mode, then restored the mode
    assert model.tokenizer is None
    assert max_diff(hf_model.eval(), model) < 1e-5
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    assert all(torch.equal(before[k], v) for k, v in hf_model.state_dict().items())


@pytest.mark.parametrize("arch, prepends", [("gpt2", True), ("neox", False)])
def test_the_folders_tokenizer_is_attached(arch, prepends, hf_folder, no_network):
    folder, _ = hf_folder(arch)
    model = from_hf(folder, device="cpu")
    words = make_tokenizer()("the cat sat", add_special_tokens=False)["input_ids"]
    bos = [model.tokenizer.bos_token_id] if prepends else []  # TransformerLens: Pythia (GPT-NeoX) adds no BOS
    assert model.cfg.default_prepend_bos is prepends
    assert model.to_tokens("the cat sat")[0].tolist() == bos + words
    assert model.to_tokens("the cat sat", prepend_bos=True)[0].tolist() == [model.tokenizer.bos_token_id] + words
    assert model.to_string(torch.tensor(words)) == "the cat sat"


def test_a_tokenizer_given_replaces_the_folders(hf_folder, tmp_path, no_network):
    folder, hf_model = hf_folder("gpt2")
    other = make_tokenizer()
    other.add_tokens(["zebra"])
    model = from_hf(folder, tokenizer=other, device="cpu")
    assert model.to_tokens("zebra", prepend_bos=False)[0].tolist() == [len(other) - 1]
    other.save_pretrained(tmp_path / "tok")
    model = from_hf(hf_model, tokenizer=tmp_path / "tok", device="cpu")
    assert model.to_tokens("zebra", prepend_bos=False)[0].tolist() == [len(other) - 1]


def test_dtype_and_n_ctx(hf_folder, no_network):
    folder, hf_model = hf_folder("gpt2")
    model = from_hf(folder, device="cpu", dtype=torch.float64, n_ctx=16)
    assert model.cfg.n_ctx == 16 and model.W_pos.shape[0] == 16
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with torch.no_grad():
        diff = (hf_model.double()(TOKENS).logits - model(TOKENS)).abs().max().item()
    assert diff < 1e-10
    with pytest.raises(TypeError, match="torch.dtype"):
        from_hf(folder, dtype="float16")


def test_a_hub_name_is_refused_with_the_way_to_download_it(no_network):
    with pytest.raises(FileNotFoundError, match=r"snapshot_download\('EleutherAI/pythia-14m'\)"):
        from_hf("EleutherAI/pythia-14m")


def test_a_folder_without_a_config_is_refused(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path)


def test_other_architectures_are_refused_with_the_supported_list(tmp_path, no_network):
    config = hf.GPTBigCodeConfig(n_embd=32, n_layer=1, n_head=4, n_positions=16, vocab_size=VOCAB)
    other = hf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM.*Supported architectures: GPT2LMHeadModel"):
        from_hf(other)
    other.save_pretrained(tmp_path / "bigcode")
    with pytest.raises(ValueError, match="GPTBigCodeForCausalLM.*GPTNeoXForCausalLM"):
        from_hf(tmp_path / "bigcode")
    with pytest.raises(TypeError, match="folder or a transformers PreTrainedModel"):
        from_hf(42)


def test_phi_with_query_key_norms_is_refused(no_network):
    config = CONFIGS["phi"]()
    config.qk_layernorm = True
    with pytest.raises(ValueError, match="qk_layernorm"):
        from_hf(hf.AutoModelForCausalLM.from_config(config))


def test_a_conversion_that_disagrees_is_caught(hf_folder, no_network):
    folder, hf_model = hf_folder("neo")
    model = from_hf(folder, device="cpu")
    assert check_logits(hf_model, model) < 1e-5
    with torch.no_grad():
        model.blocks[0].attn.W_V.mul_(2)
    with pytest.raises(ValueError, match="disagrees with the Hugging Face one"):
        check_logits(hf_model, model)


@pytest.mark.parametrize("arch", ["gpt2", "neox", "neo", "llama"])
def test_save_and_load_with_codebooks_offline(arch, hf_folder, tmp_path, no_network):
    folder, _ = hf_folder(arch)
    model = from_hf(folder, device="cpu")
    cbinterp.attach_codebooks(model, "attn", n_codes=8, k=2, layers=[1])
    tokens = model.to_tokens(["the cat sat on the mat", "a dog ran"])
    with torch.no_grad():
        expected = model(tokens)
    cbinterp.save(model, tmp_path / "saved")
    loaded = cbinterp.load(tmp_path / "saved", device="cpu")
    assert list(cbinterp.get_codebooks(loaded)) == ["blocks.1.attn.hook_z"]
    assert loaded.cfg.original_architecture == model.cfg.original_architecture
    assert loaded.cfg.default_prepend_bos == model.cfg.default_prepend_bos
    assert torch.equal(loaded.to_tokens(["the cat sat on the mat", "a dog ran"]), tokens)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)
