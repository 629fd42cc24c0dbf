"""Attaching codebooks to a HookedTransformer: hook names, caching, hooks, bypass, detach, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.utilities import Slice

from cbinterp import (
    Codebook,
    attach_codebooks,
    codebooks_bypassed,
    detach_codebooks,
    get_codebooks,
)
from cbinterp.core.codebooks.attach import resolve_sites

N_HEADS, D_HEAD, D_MODEL = 4, 8, 32
BATCH, POS = 3, 7


@pytest.fixture
def model(any_model):
    """Every test here runs on each kind of tiny model: a HookedTransformer and GPT-NeoX, GPT-2 and Llama bridges."""
    return any_model


def attached(model, **kwargs):
    kwargs.setdefault("n_codes", 20)
    return attach_codebooks(model, **kwargs)


# -- names and shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_cache_keys_and_shapes(model, tokens, k):
    attached(model, sites=["attn", "mlp"], k=k)
    assert list(get_codebooks(model)) == [
        "blocks.0.attn.hook_z",
        "blocks.0.hook_mlp_out",
        "blocks.1.attn.hook_z",
        "blocks.1.hook_mlp_out",
    ]
    _, cache = model.run_with_cache(tokens)
    for layer in range(2):
        attn_codes = cache[f"blocks.{layer}.attn.hook_z.hook_codes"]
        mlp_codes = cache[f"blocks.{layer}.hook_mlp_out.hook_codes"]
        assert attn_codes.shape == (BATCH, POS, N_HEADS, k) and attn_codes.dtype == torch.int64
        assert mlp_codes.shape == (BATCH, POS, k) and mlp_codes.dtype == torch.int64
        assert cache[f"blocks.{layer}.attn.hook_z.hook_input"].shape == (BATCH, POS, N_HEADS, D_HEAD)
        assert cache[f"blocks.{layer}.hook_mlp_out.hook_input"].shape == (BATCH, POS, D_MODEL)
        assert bool(((attn_codes >= 0) & (attn_codes < 20)).all())
    cbs = get_codebooks(model)
    assert cbs["blocks.0.attn.hook_z"].cfg.groups == N_HEADS and cbs["blocks.0.attn.hook_z"].cfg.dim == D_HEAD
    assert cbs["blocks.0.hook_mlp_out"].cfg.groups == 1 and cbs["blocks.0.hook_mlp_out"].cfg.dim == D_MODEL
    # distinct seeds: the codebooks do not share their initial codes
    assert not torch.equal(cbs["blocks.0.hook_mlp_out"].weight, cbs["blocks.1.hook_mlp_out"].weight)


def test_original_hook_names_see_quantized_activation(model, tokens):
    attached(model, sites=["attn", "mlp"], k=2)
    cbs = get_codebooks(model)
    _, cache = model.run_with_cache(tokens)
    for name, cb in cbs.items():
        quantized = cache[name]
        assert not torch.allclose(quantized, cache[f"{name}.hook_input"])
        torch.testing.assert_close(quantized, cb.decode(cache[f"{name}.hook_codes"]).detach())
        torch.testing.assert_close(cache[f"{name}.hook_codes"], cb.encode(cache[f"{name}.hook_input"]))
    # what flows on is the quantized value: attention output is computed from the quantized hook_z
    attn = model.blocks[0].attn
    z = cache["blocks.0.attn.hook_z"]
    b_O = attn.b_O if attn.b_O is not None else 0.0  # a Llama bridge's output projection has no bias
    attn_out = torch.einsum("bphd,hdm->bpm", z, attn.W_O) + b_O
    torch.testing.assert_close(cache["blocks.0.hook_attn_out"], attn_out, rtol=1e-5, atol=1e-5)


def test_names_filter(model, tokens):
    attached(model)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_codes"))
    assert sorted(cache.keys()) == sorted(f"{n}.hook_codes" for n in get_codebooks(model))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_mlp_out.hook_codes")
    assert list(cache.keys()) == ["blocks.1.hook_mlp_out.hook_codes"]
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_mlp_out", "blocks.0.attn.hook_z.hook_input"])
    assert set(cache.keys()) == {"blocks.0.hook_mlp_out", "blocks.0.attn.hook_z.hook_input"}


@pytest.mark.parametrize("pos_slice", [-1, 2, slice(1, 4), [0, 5, 6]])
def test_run_with_cache_pos_slice(model, tokens, pos_slice):
    attached(model, k=2)
    # (TransformerLens itself slices the head axis of the rotary hook_rot_q/k; those are not ours, leave them out.)
    no_rot = lambda name: "hook_rot_" not in name
    _, full = model.run_with_cache(tokens, names_filter=no_rot)
    _, part = model.run_with_cache(tokens, pos_slice=pos_slice, names_filter=no_rot)
    assert set(full.keys()) == set(part.keys())
    s = Slice.unwrap(pos_slice)  # as run_with_cache does: an int keeps the position axis
    for name, value in full.items():
        if name.endswith(("attn.hook_z", "attn.hook_z.hook_codes", "attn.hook_z.hook_input")):
            expected = s.apply(value, dim=1)  # the position axis of (batch, pos, head, ...)
        elif name.endswith("hook_mlp_out.hook_codes"):
            expected = s.apply(value, dim=1)
        else:
            continue
        assert torch.equal(part[name], expected), name
    codes = part["blocks.0.attn.hook_z.hook_codes"]
    assert codes.shape == (BATCH, len(s.indices(POS)), N_HEADS, 2)  # the head axis is never sliced
    assert part["blocks.0.hook_mlp_out.hook_input"].shape == (BATCH, len(s.indices(POS)), D_MODEL)


def test_pos_slice_with_backward_cache(model, tokens):
    attached(model, k=1)
    model.train()
    _, full = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    model.zero_grad()
    _, part = model.run_with_cache(tokens, return_type="loss", incl_bwd=True, pos_slice=slice(2, 5))
    key = "blocks.1.attn.hook_z.hook_input_grad"
    assert part[key].shape == (BATCH, 3, N_HEADS, D_HEAD)
    torch.testing.assert_close(part[key], full[key][:, 2:5])
    torch.testing.assert_close(
        part["blocks.1.hook_mlp_out.hook_input_grad"], full["blocks.1.hook_mlp_out.hook_input_grad"][:, 2:5]
    )


def test_pos_slice_with_remove_batch_dim(model):
    attached(model, k=2)
    tok = torch.randint(0, 11, (1, 6))
    _, full = model.run_with_cache(tok)
    _, part = model.run_with_cache(tok, pos_slice=slice(1, 3), remove_batch_dim=True)
    assert torch.equal(part["blocks.0.attn.hook_z.hook_codes"], full["blocks.0.attn.hook_z.hook_codes"][0, 1:3])


# -- hooks on codes and activations ---------------------------------------------------------------------
def test_run_with_hooks_on_codes(model, tokens):
    attached(model, k=2)
    baseline = model(tokens)
    ablate_codes = lambda codes, hook: torch.full_like(codes, -1)
    zero_out = lambda act, hook: torch.zeros_like(act)
    via_codes = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out.hook_codes", ablate_codes)])
    via_output = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", zero_out)])
    assert not torch.allclose(via_codes, baseline)
    torch.testing.assert_close(via_codes, via_output)
    assert torch.equal(model(tokens), baseline)  # run_with_hooks removed its hooks


def test_rewritten_codes_in_model_give_sum_of_rewritten_codes(model, tokens):
    attached(model, k=2)
    cb = get_codebooks(model)["blocks.1.attn.hook_z"]

    def rewrite(codes, hook):
        codes = codes.clone()
        codes[..., 0] = 5
        codes[:, :, 1, 1] = -1  # head 1 uses only code 5
        return codes

    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.attn.hook_z"))
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z.hook_codes", rewrite)]):
        _, hooked = model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.attn.hook_z"))
    w = cb.weight.detach()
    z = hooked["blocks.1.attn.hook_z"]
    codes = hooked["blocks.1.attn.hook_z.hook_codes"]
    assert bool((codes[..., 0] == 5).all()) and bool((codes[:, :, 1, 1] == -1).all())
    torch.testing.assert_close(z[:, :, 1], w[1, 5].expand(BATCH, POS, D_HEAD))
    for head in (0, 2, 3):
        expected = w[head, 5] + w[head][codes[:, :, head, 1]]
        torch.testing.assert_close(z[:, :, head], expected)
    assert not torch.equal(z, cache["blocks.1.attn.hook_z"])


def test_out_of_range_code_in_model_raises(model, tokens):
    attached(model, n_codes=20)
    with pytest.raises(ValueError, match=r"Code id 20 is out of range for blocks\.0\.hook_mlp_out with 20 codes"):
        model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.0.hook_mlp_out.hook_codes", lambda c, hook: torch.full_like(c, 20))]
        )


def test_hooks_context_and_reset_hooks(model, tokens):
    attached(model)
    baseline = model(tokens)
    ablate = lambda codes, hook: torch.full_like(codes, -1)
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z.hook_codes", ablate)]):
        inside = model(tokens)
    assert not torch.allclose(inside, baseline)
    assert torch.equal(model(tokens), baseline)
    model.add_hook("blocks.0.attn.hook_z.hook_codes", ablate)
    torch.testing.assert_close(model(tokens), inside)
    model.reset_hooks()
    assert torch.equal(model(tokens), baseline)


# -- which sites ----------------------------------------------------------------------------------------
def test_per_site_mappings(model):
    attached(
        model,
        sites=["attn", "mlp"],
        n_codes={"attn": 7, "mlp": 9, "blocks.1.hook_mlp_out": 13},
        k={"attn": 2, "mlp": 1, "blocks.0.attn.hook_z": 3},
    )
    cbs = get_codebooks(model)
    assert {n: (cb.n_codes, cb.k) for n, cb in cbs.items()} == {
        "blocks.0.attn.hook_z": (7, 3),
        "blocks.0.hook_mlp_out": (9, 1),
        "blocks.1.attn.hook_z": (7, 2),
        "blocks.1.hook_mlp_out": (13, 1),
    }


def test_per_site_mapping_missing_site(model):
    with pytest.raises(ValueError, match=r"No n_codes given for site 'mlp'"):
        attach_codebooks(model, sites=["attn", "mlp"], n_codes={"attn": 7})
    assert get_codebooks(model) == {}  # nothing half-attached


def test_layers_argument(model, tokens):
    attached(model, sites=["mlp"], layers=[1])
    assert list(get_codebooks(model)) == ["blocks.1.hook_mlp_out"]
    _, cache = model.run_with_cache(tokens)
    assert "blocks.1.hook_mlp_out.hook_codes" in cache and "blocks.0.hook_mlp_out.hook_codes" not in cache


def test_explicit_hook_names_and_templates(model, tokens):
    attached(model, sites=["blocks.0.hook_resid_pre", "blocks.{layer}.hook_attn_out", "resid"], layers=[1])
    assert set(get_codebooks(model)) == {
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_post",
    }
    _, cache = model.run_with_cache(tokens)
    assert cache["blocks.1.hook_attn_out.hook_codes"].shape == (BATCH, POS, 1)
    assert resolve_sites(model, "blocks.{layer}.hook_mlp_out") == [
        ("blocks.{layer}.hook_mlp_out", "blocks.0.hook_mlp_out"),
        ("blocks.{layer}.hook_mlp_out", "blocks.1.hook_mlp_out"),
    ]


def test_attach_keeps_codebook_kwargs(model):
    attached(model, sites="mlp", similarity="cosine", normalize_input=True, loss="vqvae", dead_after=5, seed=10)
    for i, cb in enumerate(get_codebooks(model).values()):
        assert cb.cfg.similarity == "cosine" and cb.cfg.normalize_input and cb.cfg.loss == "vqvae"
        assert cb.cfg.dead_after == 5 and cb.cfg.seed == 10 + i


# -- bypass and detach ----------------------------------------------------------------------------------
def test_codebooks_bypassed_equals_plain_model(model, tokens):
    plain = copy.deepcopy(model)
    only_attn = attached(copy.deepcopy(plain), sites="attn")  # copied before any forward (a bridge keeps graphs)
    expected = plain(tokens)
    attached(model)
    assert not torch.allclose(model(tokens), expected)
    with codebooks_bypassed(model):
        assert torch.equal(model(tokens), expected)
    assert not torch.allclose(model(tokens), expected)
    # bypassing some: equal to a model with only the others attached
    with codebooks_bypassed(model, ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]):
        assert torch.equal(model(tokens), only_attn(tokens))
    # restored after an exception too
    with pytest.raises(RuntimeError):
        with codebooks_bypassed(model):
            raise RuntimeError("boom")
    assert not any(cb.bypass for cb in get_codebooks(model).values())


def test_bypassed_cache_equals_plain_cache(model, tokens):
    _, plain = copy.deepcopy(model).run_with_cache(tokens)
    attached(model)
    with codebooks_bypassed(model):
        _, cache = model.run_with_cache(tokens)
    for name in plain.keys():
        assert torch.equal(cache[name], plain[name]), name


def test_detach_restores_bit_identical_outputs(model, tokens):
    before = model(tokens)
    _, cache_before = model.run_with_cache(tokens)
    attached(model, k=2)
    assert not torch.allclose(model(tokens), before)
    detach_codebooks(model, ["blocks.0.attn.hook_z"])
    assert list(get_codebooks(model)) == ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    detach_codebooks(model)
    assert get_codebooks(model) == {}
    assert torch.equal(model(tokens), before)
    _, cache_after = model.run_with_cache(tokens, pos_slice=slice(0, 3))
    assert set(cache_after.keys()) == set(cache_before.keys())
    assert torch.equal(cache_after["blocks.0.attn.hook_z"], cache_before["blocks.0.attn.hook_z"][:, 0:3])
    assert isinstance(model.hook_dict["blocks.0.hook_mlp_out"], HookPoint)
    assert not isinstance(model.hook_dict["blocks.0.hook_mlp_out"], Codebook)
    with pytest.raises(ValueError, match="No codebook at"):
        detach_codebooks(model, ["blocks.0.hook_mlp_out"])
    attached(model)  # and the sites can take a codebook again


def test_training_step_updates_codebooks(model, tokens):
    from cbinterp.core.codebooks.attach import training_codebooks

    attached(model, k=1)
    model.train()
    with training_codebooks(model):
        loss = model(tokens, return_type="loss")
    loss.backward()
    for name, cb in get_codebooks(model).items():
        assert cb.weight.grad is not None and cb.weight.grad.abs().sum() > 0, name
        assert int(cb.train_steps) == 1


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(sites=["foo"]), ValueError, r"Unknown hook site 'foo'"),
        (dict(sites=["blocks.0.hook_mlp_ot"]), ValueError, r"Unknown hook site.*blocks\.0\.hook_mlp_out"),
        (dict(sites=["blocks.7.hook_mlp_out"]), ValueError, "Unknown hook site"),
        (dict(sites=["blocks.0.attn"]), ValueError, "Unknown hook site"),  # a module, not a hook point
        (dict(sites="mlp", layers=[2]), ValueError, r"Layer 2 is out of range.*0\.\.1"),
        (dict(sites="mlp", layers=[-1]), ValueError, "out of range"),
        (dict(sites="mlp", n_codes=4, k=5), ValueError, "k=5 is larger than n_codes=4"),
        (
            dict(sites="attn", groups=3),
            ValueError,
            r"groups=3 does not match blocks\.0\.attn\.hook_z, which has 4 heads",
        ),
        (dict(sites="mlp", groups=4), ValueError, "groups=4 does not match"),
        (dict(sites=["mlp", "blocks.{layer}.hook_mlp_out"]), ValueError, "listed twice"),
        (dict(sites="mlp", similarity="dot"), ValueError, "Unknown similarity"),
    ],
)
def test_bad_attach_arguments(model, tokens, kwargs, error, match):
    expected = model(tokens)
    with pytest.raises(error, match=match):
        attach_codebooks(model, **kwargs)
    assert get_codebooks(model) == {}
    assert torch.equal(model(tokens), expected)


def test_attaching_twice_raises(model):
    attached(model, sites="mlp")
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_mlp_out already has a codebook"):
        attached(model, sites="mlp")
    with pytest.raises(ValueError, match="already has a codebook"):
        attached(model, sites=["attn", "blocks.1.hook_mlp_out"])
    assert len(get_codebooks(model)) == 2
    with pytest.raises(ValueError, match="Unknown hook site"):
        attached(model, sites=["blocks.0.hook_mlp_out.hook_codes"])


def test_attaching_over_a_hooked_site_raises(model):
    model.add_hook("blocks.0.hook_mlp_out", lambda act, hook: act)
    with pytest.raises(ValueError, match="has hooks attached"):
        attached(model, sites="mlp")


def test_not_a_hooked_transformer():
    plain = nn.Sequential(nn.Linear(4, 4))
    for call in (
        lambda: attach_codebooks(plain),
        lambda: get_codebooks(plain),
        lambda: detach_codebooks(plain),
        lambda: codebooks_bypassed(plain).__enter__(),
    ):
        with pytest.raises(TypeError, match="HookedTransformer"):
            call()


def test_nan_activation_in_training_names_site(model, tokens):
    attached(model)
    model.train()
    with torch.no_grad():
        model.blocks[0].mlp.W_out[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"blocks\.0\.hook_mlp_out"):
        model(tokens)


def test_attach_existing_codebooks_by_hook_name(model, tokens):
    other, fresh = copy.deepcopy(model), copy.deepcopy(model)  # the same architecture, the same weights
    attach_codebooks(model, ["attn", "mlp"], n_codes=6, k=2, layers=[0])
    given = {name: copy.deepcopy(cb) for name, cb in get_codebooks(model).items()}
    assert attach_codebooks(other, given) is other
    assert list(get_codebooks(other)) == list(given)
    for name, cb in get_codebooks(other).items():
        assert cb is given[name]
    _, mine = model.run_with_cache(tokens)
    _, theirs = other.run_with_cache(tokens)
    for name in given:  # same weights in the same architecture: the same codes
        assert torch.equal(mine[f"{name}.hook_codes"], theirs[f"{name}.hook_codes"])
    mlp = given["blocks.0.hook_mlp_out"]
    with pytest.raises(ValueError, match=r"per-position shape .*hook_z"):
        attach_codebooks(fresh, {"blocks.0.attn.hook_z": copy.deepcopy(mlp)})
    with pytest.raises(TypeError, match="not a Codebook"):
        attach_codebooks(fresh, {"blocks.0.hook_mlp_out": torch.nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="already has a codebook"):
        attach_codebooks(other, {"blocks.0.hook_mlp_out": copy.deepcopy(mlp)})
    with pytest.raises(ValueError, match="Unknown hook site"):
        attach_codebooks(fresh, {"blocks.0.hook_mlp_ot": copy.deepcopy(mlp)})
    with pytest.raises(ValueError, match="same Codebook object"):
        attach_codebooks(fresh, {"blocks.0.hook_mlp_out": mlp, "blocks.1.hook_mlp_out": mlp})
    assert get_codebooks(fresh) == {}  # a refused call leaves the model untouched


def test_observe_only_leaves_outputs_unchanged_and_shows_codes(model, tokens):
    from cbinterp import codebooks_observed, replace_codes

    plain_logits, plain = model.run_with_cache(tokens)
    attach_codebooks(model, ["attn", "mlp"], n_codes=6, k=2)
    names = list(get_codebooks(model))
    quantized_logits, quantized = model.run_with_cache(tokens)
    assert not torch.allclose(quantized_logits, plain_logits)
    with codebooks_observed(model):
        logits, cache = model.run_with_cache(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[replace_codes(model, names[0], [1])])
    torch.testing.assert_close(logits, plain_logits)  # exactly the model without codebooks
    torch.testing.assert_close(hooked, plain_logits)  # interventions have no effect downstream
    # the first codebook sees the same input either way, so its codes are the quantized run's
    assert torch.equal(cache[f"{names[0]}.hook_codes"], quantized[f"{names[0]}.hook_codes"])
    for name in names:  # every codebook reads the plain model's activations, and shows its codes
        torch.testing.assert_close(cache[f"{name}.hook_input"], plain[name])
        assert cache[f"{name}.hook_codes"].shape[-1] == 2
    assert not any(cb.observe_only for cb in get_codebooks(model).values())  # restored on exit
    with pytest.raises(ValueError, match="No codebook at"):
        with codebooks_observed(model, ["blocks.0.hook_mlp_ot"]):
            pass
