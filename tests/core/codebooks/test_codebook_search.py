"""Unit and property tests of the `Codebook` module's search on its own (no transformer): the output is the sum of
the selected codes, the selected codes are the best under the similarity, the gradients are the direct ones
(its state: test_codebook_state.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from codebook_reference import as_groups, direct_scores, random_input, sum_of_codes
from hypothesis import given, settings
from hypothesis import strategies as st

from cbinterp.core.codebooks.codebook import Codebook

PROPERTY = settings(max_examples=25, deadline=None)

configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 3]),
        "dim": st.integers(2, 6),
        "n_codes": st.integers(3, 12),
        "k": st.integers(1, 3),
        "similarity": st.sampled_from(["inner_product", "cosine", "euclidean"]),
        "normalize_input": st.booleans(),
        "seed": st.integers(0, 10_000),
    }
)


# -- the output is the sum of the selected codes --------------------------------------------------------
@PROPERTY
@given(cfg=configs, n=st.integers(1, 9), x_seed=st.integers(0, 10_000))
def test_output_is_sum_of_selected_codes(cfg, n, x_seed):
    cb = Codebook(**cfg)
    grouped = cfg["groups"] > 1
    x = random_input(n, cfg["groups"], cfg["dim"], x_seed)
    seen = {}
    cb.hook_codes.add_hook(lambda codes, hook: seen.__setitem__("codes", codes.clone()))
    out = cb(x)
    codes = seen["codes"]
    assert out.shape == x.shape
    assert codes.dtype == torch.int64
    assert codes.shape == (*x.shape[:-1], cfg["k"])
    assert torch.equal(codes, cb.encode(x))
    codes_g = as_groups(codes, grouped)
    assert bool(((codes_g >= 0) & (codes_g < cfg["n_codes"])).all())
    # k distinct codes per position and group
    assert all(len(set(row.tolist())) == cfg["k"] for row in codes_g.reshape(-1, cfg["k"]))
    expected = sum_of_codes(cb.weight.detach(), codes_g)
    torch.testing.assert_close(as_groups(out.detach(), grouped), expected, rtol=1e-6, atol=1e-6)
    if cfg["k"] == 1:  # a single code is copied, bit for bit
        assert torch.equal(as_groups(out.detach(), grouped), expected)
    # the same through indexing of codebook.weight, and through decode()
    g_idx = torch.arange(cfg["groups"]).unsqueeze(-1)
    torch.testing.assert_close(as_groups(out.detach(), grouped), cb.weight.detach()[g_idx, codes_g].sum(-2))
    torch.testing.assert_close(out.detach(), cb.decode(codes).detach())


@pytest.mark.parametrize("groups,k", [(1, 1), (1, 3), (4, 1), (4, 2)])
def test_output_sum_with_batch_and_position_axes(groups, k):
    cb = Codebook(dim=5, n_codes=9, k=k, groups=groups, seed=3)
    shape = (2, 6, groups, 5) if groups > 1 else (2, 6, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = cb(x)
        codes = cb.encode(x)
    assert codes.shape == (*shape[:-1], k)
    expected = sum_of_codes(cb.weight.detach(), as_groups(codes, groups > 1).reshape(12, groups, k))
    torch.testing.assert_close(as_groups(out, groups > 1).reshape(12, groups, 5), expected, rtol=1e-6, atol=1e-6)


# -- the selected codes are the best under the chosen similarity ----------------------------------------
@PROPERTY
@given(cfg=configs, n=st.integers(1, 12), x_seed=st.integers(0, 10_000), scale=st.sampled_from([0.1, 1.0, 10.0]))
def test_selected_codes_are_topk_of_direct_similarity(cfg, n, x_seed, scale):
    cb = Codebook(**cfg)
    grouped = cfg["groups"] > 1
    x = random_input(n, cfg["groups"], cfg["dim"], x_seed, scale)
    codes = as_groups(cb.encode(x), grouped)  # (n, groups, k)
    scores = direct_scores(as_groups(x, grouped), cb.weight, cfg["similarity"], cfg["normalize_input"])
    top = scores.topk(cfg["k"], dim=-1)
    chosen = scores.gather(-1, codes)
    tol = 1e-4 * (1 + scores.abs().amax(-1, keepdim=True))
    # the chosen codes' similarities are the k largest, best first (equal up to float error)
    assert bool(((chosen - top.values).abs() <= tol).all()), (chosen, top.values)
    # and where the best code is clearly ahead of the runner-up, it is exactly the argmax
    if cfg["n_codes"] > 1:
        two = scores.topk(2, dim=-1).values
        clear = (two[..., 0] - two[..., 1]) > tol[..., 0]
        assert torch.equal(codes[..., 0][clear], scores.argmax(-1)[clear])


@pytest.mark.parametrize("similarity", ["inner_product", "cosine", "euclidean"])
@pytest.mark.parametrize("normalize_input", [False, True])
def test_top1_is_argmax_of_direct_similarity(similarity, normalize_input):
    cb = Codebook(dim=8, n_codes=50, similarity=similarity, normalize_input=normalize_input, seed=1)
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(2)) * 3 + 0.5
    expected = direct_scores(x.unsqueeze(1), cb.weight, similarity, normalize_input)[:, 0].argmax(-1)
    assert torch.equal(cb.encode(x)[:, 0], expected)
    assert torch.equal(cb.encode(x)[:, 0], cb.scores(x).argmax(-1))


@pytest.mark.parametrize("similarity", ["inner_product", "cosine", "euclidean"])
@pytest.mark.parametrize("groups,k", [(1, 1), (3, 2)])
def test_encode_in_blocks_matches_one_block(similarity, groups, k):
    """The top-k search runs block by block over positions; the block size must not change the codes."""
    cb = Codebook(dim=6, n_codes=10, k=k, groups=groups, similarity=similarity, normalize_input=True, seed=4)
    x = random_input(53, groups, 6, seed=5)
    whole = cb.encode(x)
    cb._chunk_scores = 7 * 10  # blocks of 7 positions: 8 blocks, the last one short
    assert torch.equal(cb.encode(x), whole)
    with torch.no_grad():
        torch.testing.assert_close(cb(x), cb.decode(whole))


def test_similarities_really_differ():
    """The three similarities make different choices on data built to separate them."""
    cb = Codebook(dim=2, n_codes=2, similarity="inner_product")
    with torch.no_grad():
        cb.weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 10.0]]]))
    x = torch.tensor([[1.0, 0.9]])
    # inner product: x.c/|c| = 1 vs 0.9 -> code 0; cosine: same ranking here; euclidean: |x-c0| < |x-c1| -> code 0
    assert cb.encode(x).item() == 0
    x = torch.tensor([[0.5, 3.0]])
    assert cb.encode(x).item() == 1  # 0.5 vs 3.0
    cb.cfg.similarity = "euclidean"
    assert cb.encode(x).item() == 0  # |(-0.5, 3)| ~ 3.04 < |(0.5, -7)| ~ 7.02
    cb.cfg.similarity = "cosine"
    assert cb.encode(torch.tensor([[1.0, 1.1]])).item() == 1


@pytest.mark.parametrize("similarity", ["inner_product", "cosine", "euclidean"])
@pytest.mark.parametrize("normalize_input", [False, True])
def test_scores_match_definition(similarity, normalize_input):
    cb = Codebook(dim=6, n_codes=7, groups=2, similarity=similarity, normalize_input=normalize_input, seed=5)
    x = torch.randn(4, 2, 6, generator=torch.Generator().manual_seed(0)) * 2
    torch.testing.assert_close(
        cb.scores(x).double(), direct_scores(x, cb.weight, similarity, normalize_input), rtol=1e-4, atol=1e-4
    )


# -- gradients --------------------------------------------------------------------------------------------
@PROPERTY
@given(
    cfg=configs,
    n=st.integers(1, 8),
    x_seed=st.integers(0, 10_000),
    loss=st.sampled_from(["aeloss", "vqvae"]),
    recon_weight=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    beta=st.sampled_from([0.25, 1.0]),
)
def test_gradients_match_direct_computation(cfg, n, x_seed, loss, recon_weight, beta):
    cb = Codebook(**cfg, loss=loss, recon_weight=recon_weight, beta=beta).train()
    grouped = cfg["groups"] > 1
    x = random_input(n, cfg["groups"], cfg["dim"], x_seed).requires_grad_()
    g_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(x_seed + 1))
    out = cb(x)
    (out * g_out).sum().backward()

    # Direct: downstream(q) + recon * mse(q, x.detach()) [+ beta * mse(x, q.detach())], x passed straight through.
    codes_g = as_groups(cb.encode(x.detach()), grouped)
    w = cb.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    q = w[torch.arange(cfg["groups"]).unsqueeze(-1), codes_g].sum(-2)  # (n, groups, dim)
    q = q if grouped else q.squeeze(-2)
    straight = q + (x2 - x2.detach())  # value q; the downstream gradient reaches both x and the codes
    total = (straight * g_out).sum() + recon_weight * F.mse_loss(q, x2.detach())
    if loss == "vqvae":
        total = total + beta * F.mse_loss(x2, q.detach())
    total.backward()

    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cb.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    if loss == "aeloss":  # pure straight-through for the input
        torch.testing.assert_close(x.grad, g_out)


def test_gradients_closed_form():
    """dL/dx = g + beta*2(x-q)/n and dL/dc = sum over uses of g + recon*2(q-x)/n, written out by hand."""
    cb = Codebook(dim=3, n_codes=2, k=1, loss="vqvae", recon_weight=2.0, beta=0.5).train()
    with torch.no_grad():
        cb.weight.copy_(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]))
    x = torch.tensor([[2.0, 0.5, 0.0], [0.1, 3.0, 1.0]], requires_grad=True)  # -> codes 0 and 1
    g = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    (cb(x) * g).sum().backward()
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    n = x.numel()
    torch.testing.assert_close(x.grad, g + 0.5 * 2 * (x.detach() - q) / n)
    grad_q = g + 2.0 * 2 * (q - x.detach()) / n
    torch.testing.assert_close(cb.weight.grad[0], grad_q)  # each code used exactly once


def test_no_grad_and_frozen_weight():
    cb = Codebook(dim=4, n_codes=5)
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = cb(x)
    assert out.grad_fn is None
    cb.weight.requires_grad_(False)
    xg = x.clone().requires_grad_()
    cb(xg).sum().backward()
    torch.testing.assert_close(xg.grad, torch.ones_like(x))
    # the weight is frozen but the input does not need a gradient: no graph at all
    assert cb(x).grad_fn is None
