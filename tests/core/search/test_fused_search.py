"""The fused k = 1 code search (`cbinterp.core.search.fused_search`) against the matmul search it stands in for."""

from __future__ import annotations

import logging

import pytest
import torch

from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.codebooks.codes import NO_CODE
from cbinterp.core.search import fused_search

needs_kernel = pytest.mark.skipif(not fused_search.available(), reason="fused search not built on this machine")


def both(cb: Codebook, xg: torch.Tensor):
    """(matmul ids, matmul best), (fused-path ids, fused-path best) of `_search` on the same input."""
    with torch.no_grad():
        cb.use_fused_search = False
        plain = cb._search(xg)
        cb.use_fused_search = True
        fused = cb._search(xg)
    return plain, fused


def test_applies_only_to_cpu_float32_at_shapes_where_it_wins():
    x, w = torch.randn(10, 4, 32), torch.randn(4, 1000, 32)
    assert fused_search.applies(x, w) == fused_search.available()
    assert not fused_search.applies(x.double(), w.double())
    assert not fused_search.applies(x.bfloat16(), w.bfloat16())
    assert not fused_search.applies(x, w[:, : fused_search.MIN_CODES - 1])
    big = torch.randn(10, 1, fused_search.MAX_DIM + 1)
    assert not fused_search.applies(big, torch.randn(1, 1000, fused_search.MAX_DIM + 1))


@needs_kernel
@pytest.mark.parametrize("similarity", ["inner_product", "cosine", "euclidean"])
@pytest.mark.parametrize("groups,dim,n_codes", [(4, 32, 1000), (1, 128, 1000), (3, 33, 100), (1, 8, 64), (2, 256, 77)])
def test_same_ids_and_best_scores_as_the_matmul_search(similarity, groups, dim, n_codes):
    torch.manual_seed(groups * dim + n_codes)
    cb = Codebook(dim=dim, n_codes=n_codes, groups=groups, similarity=similarity, seed=3)
    xg = torch.randn(3, 101, groups, dim) * 2  # 303 rows: not a multiple of the kernel's 6-row tiles
    (ids0, best0), (ids1, best1) = both(cb, xg)
    assert ids1.shape == ids0.shape == (3, 101, groups, 1) and best1.shape == best0.shape == (3, 101, groups)
    assert ids1.dtype == ids0.dtype == torch.long
    assert torch.equal(ids1, ids0)
    torch.testing.assert_close(best1, best0, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_normalized_input_and_trained_like_codes():
    """Codes drawn from the data (as k-means leaves them) make close competitors: still the same ids."""
    torch.manual_seed(0)
    x = torch.randn(4000, 4, 32)
    cb = Codebook(dim=32, n_codes=500, groups=4, normalize_input=True)
    with torch.no_grad():
        cb.weight.copy_(x[torch.randperm(4000)[:500]].transpose(0, 1) + 0.01 * torch.randn(4, 500, 32))
    (ids0, best0), (ids1, best1) = both(cb, x)
    assert torch.equal(ids1, ids0)
    torch.testing.assert_close(best1, best0, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_ties_go_to_the_first_code():
    cb = Codebook(dim=16, n_codes=128, groups=2)
    with torch.no_grad():
        cb.weight[:, 64:] = cb.weight[:, :64]  # every code twice: the lower id must win
    (ids0, _), (ids1, _) = both(cb, torch.randn(500, 2, 16))
    assert torch.equal(ids1, ids0) and bool((ids1 < 64).all())
    zero = Codebook(dim=16, n_codes=100, similarity="euclidean")
    with torch.no_grad():
        zero.weight.zero_()  # all codes the same: id 0 everywhere
    (ids0, _), (ids1, _) = both(zero, torch.randn(50, 1, 16))
    assert torch.equal(ids1, ids0) and bool((ids1 == 0).all())


@needs_kernel
def test_same_result_with_any_number_of_threads():
    cb = Codebook(dim=32, n_codes=300, groups=4)
    xg = torch.randn(1000, 4, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cb._search(xg)
        torch.set_num_threads(max(2, threads))
        many = cb._search(xg)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@needs_kernel
@pytest.mark.parametrize("similarity", ["inner_product", "euclidean"])
def test_non_finite_and_huge_rows_are_searched_as_before(similarity):
    """NaN / infinite rows, and finite rows whose scores overflow, go the matmul way: best stays non-finite."""
    cb = Codebook(dim=32, n_codes=200, groups=4, similarity=similarity)
    xg = torch.randn(40, 4, 32)
    xg[3, 1, 5] = float("nan")
    xg[7, 0, 0] = float("inf")
    xg[8, 2, :] = -float("inf")
    xg[9, 3, :] = 3e38  # finite, but every score overflows
    xg[10, 2, 0] = 1e36  # finite and large: scores may overflow
    (ids0, best0), (ids1, best1) = both(cb, xg)
    assert torch.equal(ids1, ids0)
    assert torch.equal(torch.isfinite(best1), torch.isfinite(best0))
    for row, group in ((3, 1), (7, 0), (8, 2), (9, 3)):
        assert not torch.isfinite(best1[row, group])
    same = torch.isfinite(best0)
    torch.testing.assert_close(best1[same], best0[same], rtol=1e-5, atol=1e-5)
    assert int(torch.isfinite(best1).sum()) >= 40 * 4 - 5  # the other rows' (and groups') results are kept


@needs_kernel
def test_forward_marks_non_finite_rows_and_training_raises():
    cb = Codebook(dim=32, n_codes=100, groups=4).eval()
    x = torch.randn(2, 5, 4, 32)
    x[1, 2, 3, 0] = float("nan")
    codes = []
    cb.hook_codes.add_hook(lambda t, hook: codes.append(t.clone()))
    with torch.no_grad():
        out = cb(x)
    cb.hook_codes.remove_hooks()
    assert int(codes[0][1, 2, 3, 0]) == NO_CODE and bool(torch.isnan(out[1, 2, 3]).all())
    assert bool((codes[0][0] >= 0).all()) and bool(torch.isfinite(out[0]).all())
    cb.train()
    with pytest.raises(FloatingPointError):
        cb(x)


@needs_kernel
def test_non_finite_codes_fall_back_to_the_matmul_search():
    cb = Codebook(dim=32, n_codes=100)
    with torch.no_grad():
        cb.weight[0, 17, 3] = float("nan")
    xg = torch.randn(30, 1, 32)
    flat, w, bias = cb._prepare(xg)
    assert fused_search.argmax(flat, w, bias) is None  # the kernel refuses codes that are not finite
    (ids0, best0), (ids1, best1) = both(cb, xg)
    assert torch.equal(ids1, ids0) and torch.equal(best1.isnan(), best0.isnan())


def test_empty_input():
    cb = Codebook(dim=32, n_codes=100, groups=4)
    ids, best = cb._search(torch.randn(0, 4, 32))
    assert ids.shape == (0, 4, 1) and best.shape == (0, 4)


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """`fused_search._kernel` rebuilt from scratch into an empty cache folder, and restored afterwards."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fused_search._kernel.cache_clear()
    yield tmp_path
    fused_search._kernel.cache_clear()


def test_a_failed_build_logs_and_falls_back(fresh_kernel, monkeypatch, caplog):
    broken = fresh_kernel / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'no compiler here' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    with caplog.at_level(logging.INFO, logger="cbinterp.core.search.fused_search"):
        assert not fused_search.available()
    if fused_search.platform.machine().lower() in ("x86_64", "amd64"):
        assert "no compiler here" in caplog.text
    cb = Codebook(dim=32, n_codes=100, groups=4)
    xg = torch.randn(20, 4, 32)
    ids, best = cb._search(xg)  # the matmul search, silently but for the log line
    scores = cb._scores(xg)
    assert torch.equal(ids[..., 0], scores.argmax(-1))


def test_switched_off_by_the_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CBINTERP_FUSED_SEARCH", "0")
    assert not fused_search.available()
    assert not fused_search.applies(torch.randn(4, 1, 32), torch.randn(1, 100, 32))


@needs_kernel
def test_build_is_cached_under_the_extensions_dir(fresh_kernel):
    assert fused_search.available()  # built into the empty folder
    built = list((fresh_kernel / "cbinterp_fused_search").glob("fused_search_*.so"))
    assert len(built) == 1
    fused_search._kernel.cache_clear()
    mtime = built[0].stat().st_mtime_ns
    assert fused_search.available()  # loaded, not rebuilt
    assert built[0].stat().st_mtime_ns == mtime


def test_not_under_cpu_autocast():
    """Under autocast the matmul search runs in bf16 as it always did; `_search_fp32` (what forward uses) turns
    autocast off first, and so takes the fused search."""
    x, w = torch.randn(10, 1, 32), torch.randn(1, 100, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_search.applies(x, w)


@needs_kernel
def test_a_damaged_cached_library_is_rebuilt(fresh_kernel):
    """A file under the library's name that does not load (a build cut short elsewhere) is built again."""
    target = fresh_kernel / "cbinterp_fused_search" / fused_search.library_name(fused_search._compiler())
    target.parent.mkdir()
    target.write_bytes(b"not a shared library")
    assert fused_search.available()
    assert target.read_bytes()[:4] == b"\x7fELF"


@needs_kernel
def test_a_compiled_codebook_calls_the_kernel_and_agrees(monkeypatch):
    """Under torch.compile the search is the opaque operator `cbinterp::nearest_code`: the kernel still runs (it is
    not traced away into the matmul path), with the same codes, outputs and gradients as eager."""
    calls = []
    kernel = fused_search.argmax
    monkeypatch.setattr(fused_search, "argmax", lambda *args: calls.append(1) or kernel(*args))
    torch.manual_seed(0)
    cb = Codebook(32, 100, groups=4, seed=0).train()
    x = torch.randn(2, 8, 4, 32, requires_grad=True)
    eager = cb(x)
    eager.sum().backward()
    eager_grad, x.grad = x.grad.clone(), None
    n_eager = len(calls)
    torch._dynamo.reset()
    compiled = torch.compile(cb, backend="aot_eager")(x)
    compiled.sum().backward()
    assert n_eager == 1 and len(calls) > n_eager
    assert torch.equal(compiled, eager)
    assert torch.allclose(x.grad, eager_grad)
    torch._dynamo.reset()


def test_nearest_code_searches_every_row_even_where_the_kernel_leaves_some():
    torch.manual_seed(1)
    x, w = torch.randn(20, 2, 16), torch.randn(2, 80, 16)
    x[3, 1, 0] = float("nan")
    x[7, 0, 2] = float("inf")
    ids, best = fused_search.nearest_code(x, w, None)
    plain_ids, plain_best = fused_search._matmul_argmax(x, w, None)
    finite = torch.isfinite(plain_best)
    assert not finite[3, 1] and not finite[7, 0]
    assert torch.equal(ids[finite], plain_ids[finite])
    assert torch.allclose(best[finite], plain_best[finite], rtol=1e-5, atol=1e-5)  # sums in another order
    assert not torch.isfinite(best[3, 1]) and not torch.isfinite(best[7, 0])
    assert (ids >= 0).all()  # no row is left as UNSEARCHED


@needs_kernel
def test_training_with_the_kernel_matches_the_matmul_search(make_tiny_model):
    """The FSM benchmark's figures rest on this: a few training steps of a codebook model, with the fused search
    and with the matmul search, give the same losses and codes (attention heads and MLP, k = 1)."""
    from cbinterp import attach_codebooks, get_codebooks
    from cbinterp.core.training.train import TrainConfig, train
    from cbinterp.tasks.fsm import FSM

    task = FSM.random(6, 2, 10, seed=0)
    runs = []
    for fused in (True, False):
        model = make_tiny_model()
        attach_codebooks(model, ["attn", "mlp"], n_codes=64, k=1, seed=0)
        for cb in get_codebooks(model).values():
            cb.use_fused_search = fused
        result = train(model, task.token_batches(8, 16, seed=0), TrainConfig(steps=6, lr=3e-3, progress=False))
        tokens = task.token_batches(4, 16, seed=1)(0)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens)
        runs.append((result.losses, {k: v for k, v in cache.items() if k.endswith("hook_codes")}))
    (fused_losses, fused_codes), (plain_losses, plain_codes) = runs
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    assert fused_codes.keys() == plain_codes.keys() and len(fused_codes) > 0
    for name in fused_codes:
        assert torch.equal(fused_codes[name], plain_codes[name]), name
