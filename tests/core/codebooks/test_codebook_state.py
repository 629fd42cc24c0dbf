"""Unit tests of the `Codebook` module's state on its own (no transformer): rewritten codes, usage statistics,
dead-code replacement, k-means initialisation and its settings (the search itself: test_codebook_search.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from codebook_reference import as_groups, direct_scores, random_input, sum_of_codes

from cbinterp.core.codebooks.codebook import Codebook, CodebookConfig


# -- hooks that rewrite codes ---------------------------------------------------------------------------
def test_rewritten_codes_change_output():
    cb = Codebook(dim=4, n_codes=6, k=2, seed=0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    new = torch.tensor([[3, 5]] * 5)
    cb.hook_codes.add_hook(lambda codes, hook: new.clone())
    out = cb(x).detach()
    torch.testing.assert_close(out, (cb.weight[0, 3] + cb.weight[0, 5]).detach().expand(5, 4))
    # -1 contributes zero
    cb.hook_codes.remove_hooks()
    cb.hook_codes.add_hook(lambda codes, hook: torch.tensor([[2, -1], [-1, -1], [-1, 4], [0, 1], [-1, 0]]))
    out = cb(x).detach()
    w = cb.weight.detach()[0]
    torch.testing.assert_close(out, torch.stack([w[2], torch.zeros(4), w[4], w[0] + w[1], w[0]]))
    cb.hook_codes.remove_hooks()
    torch.testing.assert_close(cb(x).detach(), cb.decode(cb.encode(x)).detach())


def test_rewritten_codes_grouped_and_gradient():
    cb = Codebook(dim=3, n_codes=4, k=1, groups=2, seed=1).train()
    cb.track_usage = True
    x = torch.randn(2, 2, 3, requires_grad=True)
    cb.hook_codes.add_hook(lambda codes, hook: torch.tensor([[[1], [-1]], [[-1], [3]]]))
    out = cb(x)
    w = cb.weight.detach()
    expected = torch.stack([torch.stack([w[0, 1], torch.zeros(3)]), torch.stack([torch.zeros(3), w[1, 3]])])
    torch.testing.assert_close(out.detach(), expected)
    out.sum().backward()
    assert torch.isfinite(cb.weight.grad).all() and torch.isfinite(x.grad).all()
    # a code that was ablated (-1) gets only the reconstruction pull, no downstream gradient from the ablated slot
    assert cb.weight.grad[0, 0].abs().sum() == 0 and cb.weight.grad[1, 0].abs().sum() == 0
    # usage counts the rewritten ids and ignores -1
    assert cb.counts[0, 1] == 1 and cb.counts[1, 3] == 1 and cb.counts.sum() == 2


@pytest.mark.parametrize("bad", [6, 100, -2])
def test_out_of_range_rewritten_code_raises(bad):
    cb = Codebook(dim=4, n_codes=6)
    cb.hook_codes.add_hook(lambda codes, hook: torch.full_like(codes, bad))
    with pytest.raises(ValueError, match=rf"Code id {bad} is out of range.*6 codes"):
        cb(torch.randn(2, 4))


def test_decode_checks_ids_and_dtype():
    cb = Codebook(dim=4, n_codes=6, k=2)
    with pytest.raises(ValueError, match="out of range"):
        cb.decode(torch.tensor([[0, 6]]))
    with pytest.raises(TypeError, match="integer"):
        cb.decode(torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(cb.decode(torch.tensor([[-1, -1]])), torch.zeros(1, 4))


def test_bypass_returns_input_unchanged():
    cb = Codebook(dim=4, n_codes=6).train()
    x = torch.randn(3, 4)
    cb.bypass = True
    assert torch.equal(cb(x), x)
    assert cb.counts.sum() == 0 and int(cb.train_steps) == 0


# -- usage statistics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("groups,k", [(1, 1), (1, 2), (3, 2)])
def test_usage_statistics(groups, k):
    cb = Codebook(dim=4, n_codes=40, k=k, groups=groups, seed=2)
    x = random_input(10, groups, 4, seed=0)
    with torch.no_grad():
        cb(x)
    assert cb.counts.sum() == 0  # no counting unless asked for
    cb.track_usage = True
    assert cb.n_dead == 40 and cb.counts.sum() == 0
    with torch.no_grad():
        out = cb(x)
    codes_g = as_groups(cb.encode(x), groups > 1)
    expected = torch.stack([torch.bincount(codes_g[:, g].flatten(), minlength=40) for g in range(groups)])
    assert torch.equal(cb.counts, expected)
    assert cb.counts.sum() == 10 * groups * k
    assert cb.n_dead == int((expected.sum(0) == 0).sum())  # code ids that fire in no head
    torch.testing.assert_close(cb.last_mse, ((x - out) ** 2).mean())
    usage = cb.usage()
    assert usage["n_dead"] == cb.n_dead
    assert usage["counts"].shape == ((groups, 40) if groups > 1 else (40,))
    assert math.isclose(usage["mse"], float(((x - out) ** 2).mean()), rel_tol=1e-6)
    cb(x)  # counts accumulate
    assert torch.equal(cb.counts, 2 * expected)
    cb.reset_usage()
    assert cb.counts.sum() == 0 and cb.n_dead == 40
    cb.track_usage = False
    cb(x)
    assert cb.counts.sum() == 0


def test_usage_buffers_are_state():
    cb = Codebook(dim=4, n_codes=5)
    keys = set(cb.state_dict())
    assert {"weight", "counts", "steps_since_used", "train_steps"} <= keys
    assert "last_mse" not in keys


def test_train_steps_count_only_in_training():
    """Training statistics change only in forwards `train` marks as its steps; train mode alone does not count."""
    cb = Codebook(dim=4, n_codes=5)
    x = torch.randn(3, 4)
    cb.eval()
    cb(x)
    cb.train()
    cb(x)
    assert int(cb.train_steps) == 0 and int(cb.counts.sum()) == 0 and int(cb.steps_since_used.sum()) == 0
    cb.in_train_loop = True
    cb(x)
    cb(x)
    assert int(cb.train_steps) == 2


# -- dead codes -----------------------------------------------------------------------------------------
def _one_live_code(groups: int = 1, **kwargs) -> Codebook:
    """Code 0 matches the data; codes 1.. are far away and never selected (euclidean)."""
    cb = Codebook(dim=4, n_codes=6, groups=groups, similarity="euclidean", **kwargs)
    with torch.no_grad():
        cb.weight.fill_(50.0)
        cb.weight[:, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    return cb


def _near_some_row(codes: torch.Tensor, rows: torch.Tensor, tol: float) -> bool:
    return bool((torch.cdist(codes, rows).min(dim=1).values < tol).all())


def test_dead_codes_replaced_after_dead_after_steps():
    cb = _one_live_code(dead_after=3, dead_check_every=1, replace_noise=0.01).train()
    cb.in_train_loop = True
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.3 * torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    for step in range(3):
        cb(x)
        # not yet: the codes have been unused for fewer than dead_after steps when checked
        assert bool((cb.weight.detach()[0, 1:] == 50.0).all()), step
    assert torch.equal(cb.steps_since_used[0], torch.tensor([0, 3, 3, 3, 3, 3]))
    cb(x)  # 4th step: checked before quantizing, codes unused for 3 steps are replaced
    w = cb.weight.detach()[0]
    assert torch.equal(w[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert _near_some_row(w[1:], x, tol=0.05)
    assert bool((cb.steps_since_used[0, 1:] <= 1).all())


def test_dead_codes_not_replaced_in_eval_or_without_dead_after():
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.3 * torch.randn(16, 4)
    cb = _one_live_code(dead_after=1, dead_check_every=1).eval()
    off = _one_live_code().train()
    for _ in range(5):
        cb(x)
        off(x)
    assert bool((cb.weight.detach()[0, 1:] == 50.0).all())
    assert bool((off.weight.detach()[0, 1:] == 50.0).all())


def test_dead_check_every():
    cb = _one_live_code(dead_after=1, dead_check_every=4).train()
    cb.in_train_loop = True
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.3 * torch.randn(16, 4)
    for _ in range(4):
        cb(x)
    assert bool((cb.weight.detach()[0, 1:] == 50.0).all())  # checked at train_steps 4, i.e. on the 5th call
    cb(x)
    assert not bool((cb.weight.detach()[0, 1:] == 50.0).any())


@pytest.mark.parametrize("groups", [1, 2])
def test_replace_dead_codes_direct(groups):
    cb = _one_live_code(groups=groups, replace_noise=0.0)
    cb.track_usage = True
    x = random_input(20, groups, 4, seed=4) * 0.1 + torch.tensor([1.0, 0.0, 0.0, 0.0])
    with torch.no_grad():
        cb(x)
    assert cb.n_dead == 5 and int((cb.counts == 0).sum()) == groups * 5
    assert cb.replace_dead_codes(x) == groups * 5
    xg = as_groups(x, groups > 1)
    for g in range(groups):
        w = cb.weight.detach()[g]
        assert torch.equal(w[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
        # with no noise the new codes are exactly input rows of this group
        assert bool((torch.cdist(w[1:], xg[:, g]).min(dim=1).values < 1e-6).all())
    assert cb.replace_dead_codes(x, min_steps=1) == 0  # nothing has been unused for a training step


# -- k-means initialisation -----------------------------------------------------------------------------
@pytest.mark.parametrize("similarity", ["euclidean", "inner_product"])
def test_kmeans_init_finds_clusters(similarity):
    gen = torch.Generator().manual_seed(0)
    centers = torch.eye(6)[:3] * 5  # three well separated clusters of equal norm
    x = centers.repeat(100, 1) + 0.05 * torch.randn(300, 6, generator=gen)
    cb = Codebook(dim=6, n_codes=3, similarity=similarity, init_std=1.0)
    cb.kmeans_init(x, iters=10, seed=0)
    w = cb.weight.detach()[0]
    dist = torch.cdist(centers, w)
    assert bool((dist.min(dim=1).values < 0.1).all()), dist  # every cluster has a centroid on it
    assert bool((dist.min(dim=0).values < 0.1).all()), dist  # no centroid is stranded between clusters
    # and the codebook now reconstructs the data up to the cluster spread
    with torch.no_grad():
        assert float(((cb(x) - x) ** 2).mean()) < 0.01


def test_kmeans_init_grouped():
    gen = torch.Generator().manual_seed(1)
    c0 = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    c1 = torch.tensor([[0.0, 4.0], [0.0, -4.0]])
    labels = torch.randint(0, 2, (200,), generator=gen)
    x = torch.stack([c0[labels], c1[1 - labels]], dim=1) + 0.05 * torch.randn(200, 2, 2, generator=gen)
    cb = Codebook(dim=2, n_codes=2, groups=2, similarity="euclidean")
    cb.kmeans_init(x, iters=10)
    for g, centers in enumerate([c0, c1]):
        assert bool((torch.cdist(centers, cb.weight.detach()[g]).min(dim=1).values < 0.1).all())


# -- bad input gives clear errors -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=4, n_codes=3, k=4), "k=4 is larger than n_codes=3"),
        (dict(dim=4, n_codes=0), "n_codes must be a positive int"),
        (dict(dim=0, n_codes=3), "dim must be a positive int"),
        (dict(dim=4, n_codes=3, groups=0), "groups must be a positive int"),
        (dict(dim=4, n_codes=3, similarity="dot"), "Unknown similarity"),
        (dict(dim=4, n_codes=3, loss="l1"), "Unknown codebook loss"),
        (dict(dim=4, n_codes=3, dead_after=0), "dead_after"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Codebook(**kwargs)


def test_wrong_input_shape_raises():
    cb = Codebook(dim=8, n_codes=5)
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., dim=8\).*\(2, 7\)"):
        cb(torch.randn(2, 7))
    grouped = Codebook(dim=8, n_codes=5, groups=4)
    with pytest.raises(ValueError, match="groups=4"):
        grouped(torch.randn(2, 3, 8))  # 3 heads, not 4
    with pytest.raises(ValueError, match="groups=4"):
        grouped(torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="groups=4"):
        grouped(torch.randn(8))


def test_nan_in_training_raises_floating_point_error():
    cb = Codebook(dim=4, n_codes=5).train()
    cb.name = "blocks.3.hook_mlp_out"
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"blocks\.3\.hook_mlp_out"):
        cb(x)
    x[1, 2] = float("inf")
    with pytest.raises(FloatingPointError):
        cb(x)


def test_config_round_trip():
    cb = Codebook(
        dim=4, n_codes=5, k=2, groups=3, similarity="cosine", normalize_input=True, loss="vqvae", dead_after=7, seed=9
    )
    again = Codebook.from_config(CodebookConfig(**vars(cb.cfg)))
    assert again.cfg == cb.cfg
    assert torch.equal(again.weight, cb.weight)  # same seed, same initial codes


# -- codebook-features' options: a scaled and shifted input layer norm, and the mean of the k codes -------
def affine_codebook(groups: int = 1, k: int = 1, seed: int = 0, **options) -> Codebook:
    """A codebook with `norm_affine` and a random (as if trained) scale and bias."""
    cb = Codebook(dim=6, n_codes=9, k=k, groups=groups, normalize_input=True, norm_affine=True, seed=seed, **options)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        cb.norm_weight.copy_(1 + 0.5 * torch.randn(cb.norm_weight.shape, generator=g))
        cb.norm_bias.copy_(0.3 * torch.randn(cb.norm_bias.shape, generator=g))
    return cb


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("similarity", ["inner_product", "cosine", "euclidean"])
def test_norm_affine_scores_the_scaled_and_shifted_layer_norm(groups, similarity):
    cb = affine_codebook(groups, similarity=similarity)
    x = random_input(40, groups, 6, seed=3)
    normed = F.layer_norm(as_groups(x, groups > 1).double(), (6,)) * cb.norm_weight.double() + cb.norm_bias.double()
    expected = direct_scores(normed, cb.weight, similarity, normalize_input=False)
    torch.testing.assert_close(as_groups(cb.scores(x), groups > 1).double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(as_groups(cb.encode(x), groups > 1)[..., 0], expected.argmax(-1))
    # the scale and bias decide: the same codes scored on the plain layer norm choose otherwise
    plain = Codebook.from_config(dataclasses.replace(cb.cfg, norm_affine=False))
    plain.weight.data.copy_(cb.weight.data)
    assert not torch.equal(plain.encode(x), cb.encode(x))


@pytest.mark.parametrize("groups", [1, 4])
def test_norm_affine_fused_search_matches_matmul_search(groups):
    cb = affine_codebook(groups, k=1)
    x = random_input(500, groups, 6, seed=4) * 3
    fused = cb.encode(x)
    cb.use_fused_search = False
    assert torch.equal(cb.encode(x), fused)


@pytest.mark.parametrize("groups", [1, 3])
def test_mean_combine_outputs_the_mean_of_the_k_codes(groups):
    cb = Codebook(dim=5, n_codes=8, k=3, groups=groups, combine="mean", seed=2)
    x = random_input(7, groups, 5, seed=5)
    codes = as_groups(cb.encode(x), groups > 1)
    w = cb.weight.detach()
    torch.testing.assert_close(as_groups(cb(x), groups > 1).detach(), sum_of_codes(w, codes) / 3)
    # a rewritten id of -1 is a zero code that still counts among the k, as in codebook-features
    dropped = codes.clone()
    dropped[..., 0] = -1
    cb.hook_codes.add_hook(lambda c, hook: dropped if groups > 1 else dropped.squeeze(-2))
    kept = sum_of_codes(w, codes[..., 1:])
    torch.testing.assert_close(as_groups(cb(x), groups > 1).detach(), kept / 3)
    torch.testing.assert_close(cb.decode(dropped if groups > 1 else dropped.squeeze(-2)), cb(x).detach())


def test_new_options_round_trip_through_save_and_load(tmp_path):
    from cbinterp.core.storage.codebook_io import load_codebook, save_codebook

    cb = affine_codebook(3, k=2, combine="mean", similarity="euclidean")
    save_codebook(cb, tmp_path / "cb")
    again = load_codebook(tmp_path / "cb")
    assert again.cfg == cb.cfg and again.cfg.norm_affine and again.cfg.combine == "mean"
    assert torch.equal(again.norm_weight, cb.norm_weight) and torch.equal(again.norm_bias, cb.norm_bias)
    x = random_input(6, 3, 6, seed=7)
    assert torch.equal(again(x), cb(x))


def test_config_saved_before_the_new_options_keeps_todays_behaviour():
    old = {k: v for k, v in dataclasses.asdict(CodebookConfig(dim=4, n_codes=5, k=2)).items()}
    del old["norm_affine"], old["combine"]
    cb = Codebook.from_config(CodebookConfig(**old))
    assert cb.cfg.combine == "sum" and not cb.cfg.norm_affine
    assert "norm_weight" not in cb.state_dict()  # an old state dict loads strictly
    cb.load_state_dict(Codebook(dim=4, n_codes=5, k=2).state_dict())
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cb(x).detach(), sum_of_codes(cb.weight.detach(), cb.encode(x).unsqueeze(-2))[:, 0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(norm_affine=True), "normalize_input is False"),
        (dict(normalize_input=True, norm_affine=1), "norm_affine must be True or False"),
        (dict(combine="max"), "Unknown combine 'max'"),
    ],
)
def test_bad_new_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Codebook(dim=4, n_codes=3, **kwargs)


def test_norm_affine_weights_are_frozen_parameters():
    """Fingerprints of the weights (code caches, checkpoints) see them; optimizers leave them alone."""
    cb = affine_codebook(2)
    params = dict(cb.named_parameters())
    assert {"norm_weight", "norm_bias"} <= set(params)
    assert not params["norm_weight"].requires_grad and not params["norm_bias"].requires_grad
    assert cb.to(torch.float64).norm_weight.dtype == torch.float64
