"""The public features on each kind of model (`any_model`: a HookedTransformer and GPT-NeoX, GPT-2 and Llama
TransformerBridges), and what the TransformerLens adapter refuses."""

from __future__ import annotations

import copy

import pytest
import torch

import cbinterp
from cbinterp.core import tl_compat as tc

SITES = ["attn", "mlp"]


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))


def _codes(model, tokens) -> dict[str, torch.Tensor]:
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_codes"))
    return {n: cache[n] for n in cache.keys()}


def test_save_and_load_give_the_same_logits_codes_and_tokenizer(any_model, tokens, tmp_path):
    model = cbinterp.attach_codebooks(any_model, SITES, n_codes=16, k=2)
    cbinterp.save(model, tmp_path / "saved")
    loaded = cbinterp.load(tmp_path / "saved", device="cpu")
    assert type(loaded) is type(model)
    assert list(cbinterp.get_codebooks(loaded)) == list(cbinterp.get_codebooks(model))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    mine, theirs = _codes(model, tokens), _codes(loaded, tokens)
    assert mine.keys() == theirs.keys() and mine
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    if getattr(model, "tokenizer", None) is not None:
        assert loaded.to_str_tokens(tokens[0]) == model.to_str_tokens(tokens[0])


def test_interventions_and_steered_generation(any_model, tokens):
    model = cbinterp.attach_codebooks(any_model, SITES, n_codes=16)
    site = "blocks.0.hook_mlp_out"
    with torch.no_grad():
        plain = model(tokens)
        with cbinterp.intervene(model, cbinterp.force_codes(model, site, 3)):
            forced = model(tokens)
            codes = _codes(model, tokens)[f"{site}.hook_codes"]
    assert (codes == 3).all() and not torch.allclose(forced, plain)
    prompt = tokens[:1, :3]
    out = cbinterp.generate_with_codes(
        model, prompt, {site: 3}, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False
    )
    assert out.shape == (1, 7) and torch.equal(out[:, :3], prompt)
    again = cbinterp.generate_with_codes(
        model, prompt, {site: 3}, max_new_tokens=4, do_sample=False, verbose=False, stop_at_eos=False
    )
    assert torch.equal(out, again)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())  # the steering hooks are gone afterwards


def test_train_kmeans_and_cache_codes(any_model, tokens):
    model = cbinterp.attach_codebooks(any_model, SITES, n_codes=8)
    data = torch.randint(0, 11, (16, 8), generator=torch.Generator().manual_seed(2))
    cbinterp.kmeans_init_codebooks(model, data, iters=2, progress=False)
    before = {n: cb.weight.detach().clone() for n, cb in cbinterp.get_codebooks(model).items()}
    result = cbinterp.train(model, data, cbinterp.TrainConfig(steps=2, batch_size=4, lr=1e-3, progress=False))
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    moved = [not torch.equal(cb.weight, before[n]) for n, cb in cbinterp.get_codebooks(model).items()]
    assert any(moved)
    cache = cbinterp.cache_codes(model, data[:4], batch_size=2, progress=False)
    live = _codes(model.eval(), data[:4])
    for name in cbinterp.get_codebooks(model):
        stored = cache.codes(name) if hasattr(cache, "codes") else None
        if stored is not None:
            want = live[f"{name}.hook_codes"].reshape(stored.shape)
            assert torch.equal(stored.to(want.dtype), want), name


def test_a_model_of_another_class_is_refused():
    with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
        cbinterp.attach_codebooks(torch.nn.Linear(2, 2), SITES)


@pytest.mark.skipif(tc.HAS_HOOKED, reason="the HookedTransformer-only paths run on transformer-lens 3")
def test_hooked_only_paths_say_so_on_transformer_lens_4():
    with pytest.raises(ImportError, match="no longer has"):
        cbinterp.recipes.gpt.gpt_config(n_layers=1, d_model=8, n_heads=2, d_mlp=8, n_ctx=4, d_vocab=5, seed=0)


def test_bridge_loads_without_its_source_folder(any_model, tokens, tmp_path):
    if not tc.is_bridge(any_model):
        pytest.skip("a HookedTransformer saves its own config")
    model = cbinterp.attach_codebooks(copy.deepcopy(any_model), SITES, n_codes=16)
    cbinterp.save(model, tmp_path / "saved")
    config = cbinterp.core.storage.io.read_config(tmp_path / "saved")
    assert config["bridge"]["architecture"] == type(model.original_model).__name__
    assert "model_config" not in config


@pytest.mark.skipif(tc.BRIDGE_SUPPORTED or tc.TransformerBridge is None, reason="transformer-lens 3's bridge only")
def test_a_transformer_lens_3_bridge_is_refused_with_the_version_to_install(tmp_path):
    from bridge_models import make_bridge

    bridge = make_bridge("neox", tmp_path / "neox")
    with pytest.raises(TypeError, match="from transformer-lens 4 on"):
        cbinterp.attach_codebooks(bridge, SITES)


@pytest.mark.parametrize("processing", [False, True], ids=["no-processing", "processed"])
def test_codebooks_sit_in_the_forward_of_a_bridge_in_compatibility_mode(any_model, tokens, processing):
    """Compatibility mode installs hook aliases as attributes (`attn.hook_z` is `attn.o.hook_in`): the codebook must
    replace the hook point at every place it is held, or it sits beside the forward and quantizes nothing."""
    if not tc.is_bridge(any_model):
        pytest.skip("compatibility mode is a bridge's")
    any_model.enable_compatibility_mode(disable_warnings=True, no_processing=not processing)
    with torch.no_grad():
        plain = any_model(tokens)
    model = cbinterp.attach_codebooks(any_model, SITES, n_codes=16, k=2)
    names = list(cbinterp.get_codebooks(model))
    assert names == [f"blocks.{layer}.{site}" for layer in range(2) for site in ("attn.hook_z", "hook_mlp_out")]
    codes = _codes(model, tokens)
    assert sorted(codes) == sorted(f"{n}.hook_codes" for n in names)
    assert codes["blocks.0.attn.hook_z.hook_codes"].shape == (*tokens.shape, 4, 2)
    with torch.no_grad():
        quantized = model(tokens)
        with cbinterp.codebooks_bypassed(model):
            assert torch.equal(model(tokens), plain)
        with cbinterp.intervene(model, cbinterp.force_codes(model, "blocks.0.attn.hook_z", 3)):
            forced = model(tokens)
    assert not torch.allclose(quantized, plain) and not torch.allclose(forced, quantized)
    cbinterp.detach_codebooks(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), plain)
    assert not cbinterp.get_codebooks(model)


@pytest.mark.skipif(not tc.BRIDGE_SUPPORTED, reason=f"no TransformerBridge support on transformer-lens {tc.TL_VERSION}")
def test_the_quick_start_runs_on_a_bridge():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "quickstart_bridge.py"
    spec = importlib.util.spec_from_file_location("quickstart_bridge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main() == {
        "blocks.0.hook_mlp_out.hook_codes": (2, 16, 1),
        "blocks.0.attn.hook_z.hook_codes": (2, 16, 4, 1),
        "blocks.0.hook_mlp_out.hook_input": (2, 16, 64),
    }


def test_compatibility_mode_after_codebooks_is_refused_with_the_order_that_works(any_model, tokens):
    if not tc.is_bridge(any_model):
        pytest.skip("compatibility mode is a bridge's")
    model = cbinterp.attach_codebooks(any_model, SITES, n_codes=16)
    for each in (model, copy.deepcopy(model)):  # the refusal travels with a copy
        with pytest.raises(RuntimeError, match="before attaching codebooks.*detach_codebooks"):
            each.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    codebooks = cbinterp.get_codebooks(model)
    cbinterp.detach_codebooks(model)
    model.enable_compatibility_mode(disable_warnings=True, no_processing=True)
    cbinterp.attach_codebooks(model, codebooks)
    assert sorted(_codes(model, tokens)) == sorted(f"{n}.hook_codes" for n in codebooks)
