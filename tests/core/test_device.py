"""Device handling: the search block-size rule, codebooks placed where their block computes, dtypes; CUDA tests skip."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

import cbinterp
from cbinterp.core.codebooks.codebook import Codebook
from cbinterp.core.device import default_device
from cbinterp.core.search import blocks as search_blocks
from cbinterp.core.search import fused_search
from cbinterp.core.search.blocks import (
    CUDA_ASSUMED_FREE_BYTES,
    CUDA_SMALL_SEARCH_BYTES,
    MAX_BLOCK_SCORES,
    bytes_per_row,
    search_block_rows,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GIB = 1 << 30


# -- the default device -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("present,expected", [(True, "cuda"), (False, "cpu")])
def test_the_default_device_is_cuda_when_present_else_the_cpu(monkeypatch, present, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: present)
    assert default_device() == expected


def test_the_default_device_rule_is_written_once():
    """Entry points and scripts that take no device ask `default_device`; none spells the rule again (to drift)."""
    root = Path(cbinterp.__file__).resolve().parents[1]
    rule = re.compile(r"""["']cuda["']\s+if\s+torch\.cuda\.is_available\(\)""")
    files = [p for folder in ("cbinterp", "benchmarks") for p in sorted((root / folder).rglob("*.py"))]
    spelled = [p.relative_to(root).as_posix() for p in files if rule.search(p.read_text(encoding="utf-8"))]
    assert spelled == ["cbinterp/core/device.py"]


# -- the block-size rule -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups,n_codes", [(1, 1), (4, 1000), (16, 10_000), (1, 3 << 21), (8, 7)])
@pytest.mark.parametrize("n_rows", [0, 1, 13, 65_536])
def test_cpu_blocks_are_the_cache_sized_blocks_of_before(groups, n_codes, n_rows):
    """Off CUDA the rule is the old one: about 2**21 scores per block (clamped to the rows there are)."""
    old = max(1, (1 << 21) // (n_codes * groups))
    for kind in ("cpu", "meta", "mps"):
        rows = search_block_rows(n_rows, groups, n_codes, 8 if n_codes >= 8 else 1, torch.float32, kind)
        assert rows == max(1, min(old, n_rows))
    assert search_block_rows(100, 1, 10, 1, torch.float32, "cpu", cpu_block_scores=70) == 7


def test_cuda_searches_the_paper_shape_in_one_block_when_memory_allows():
    """16 heads x 10k codes, k = 8, 8 x 1024 tokens: one matmul and one top-k on a GPU with room, not ~600 blocks."""
    n, groups, n_codes, k = 8 * 1024, 16, 10_000, 8
    assert search_block_rows(n, groups, n_codes, k, torch.float32, "cpu") == 13
    assert search_block_rows(n, groups, n_codes, k, torch.float32, "cuda", free_bytes=120 * GIB) == n


@pytest.mark.parametrize("free_gib", [1, 8, 20, 33])
def test_cuda_blocks_take_at_most_half_the_free_memory(free_gib):
    n, groups, n_codes, k = 8 * 1024, 16, 10_000, 8
    free = free_gib * GIB
    rows = search_block_rows(n, groups, n_codes, k, torch.float32, "cuda", free_bytes=free)
    per_row = bytes_per_row(groups, n_codes, k, torch.float32)
    assert rows * per_row <= free // 2
    assert rows == n or (rows + 1) * per_row > free // 2  # the largest that fits
    assert 1 <= rows < n  # at these sizes the search does not fit in one block


def test_cuda_small_searches_are_one_block_without_knowing_the_free_memory():
    assert search_block_rows(4000, 4, 1000, 1, torch.float32, "cuda", free_bytes=0) == 4000  # 256 MB
    rows = search_block_rows(10**7, 1, 1000, 1, torch.float32, "cuda", free_bytes=0)
    assert rows == CUDA_SMALL_SEARCH_BYTES // bytes_per_row(1, 1000, 1, torch.float32)
    unknown = search_block_rows(10**8, 16, 10_000, 8, torch.float32, "cuda", free_bytes=None)
    assert unknown == search_block_rows(10**8, 16, 10_000, 8, torch.float32, "cuda", free_bytes=CUDA_ASSUMED_FREE_BYTES)


def test_cuda_blocks_stay_under_the_32_bit_index_limit():
    rows = search_block_rows(10**9, 16, 10_000, 8, torch.float16, "cuda", free_bytes=10**15)
    assert rows * 16 * 10_000 <= MAX_BLOCK_SCORES < (rows + 1) * 16 * 10_000


def test_cuda_rule_counts_the_score_dtype():
    """bf16 scores take half the bytes of float32 ones: more rows fit in the same memory."""
    args = (10**7, 16, 10_000, 8)
    fp32 = search_block_rows(*args, torch.float32, "cuda", free_bytes=8 * GIB)
    bf16 = search_block_rows(*args, torch.bfloat16, "cuda", free_bytes=8 * GIB)
    assert bytes_per_row(16, 10_000, 8, torch.bfloat16) < bytes_per_row(16, 10_000, 8, torch.float32)
    assert bf16 > fp32


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_rows=-1), "n_rows"),
        (dict(groups=0), "groups"),
        (dict(n_codes=2.5), "n_codes"),
        (dict(k=True), "k"),
        (dict(fraction=0.0), "fraction"),
    ],
)
def test_rule_refuses_bad_arguments(kwargs, match):
    args = {**dict(n_rows=10, groups=1, n_codes=10, k=1, dtype=torch.float32, device_kind="cuda"), **kwargs}
    with pytest.raises(ValueError, match=match):
        search_block_rows(**args)


# -- the search in blocks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("euclidean", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_block_and_many_blocks_give_the_same_codes(euclidean, k, dtype):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(41, 3, 5, generator=generator).to(dtype)
    w = torch.randn(3, 17, 5, generator=generator).to(dtype)
    bias = w.float().pow(2).sum(-1).to(dtype) if euclidean else None
    ids, best = fused_search.matmul_search(x, w, bias, k, block_rows=41)
    for rows in (1, 6, 40, 1000):
        ids_b, best_b = fused_search.matmul_search(x, w, bias, k, block_rows=rows)
        assert torch.equal(ids_b, ids)
        torch.testing.assert_close(best_b, best)  # BLAS may sum a block of another size in another order
    assert ids.shape == (3, 41, k) and best.shape == (3, 41) and best.dtype == dtype


def test_codebook_searches_on_a_device_without_autocast():
    """On the meta device (shapes only, as when placement is planned) the search runs: no autocast check fails."""
    cb = Codebook(dim=4, n_codes=9, k=2, groups=3, device="meta").eval()
    out = cb(torch.empty(2, 5, 3, 4, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 5, 3, 4)
    assert cb.encode(torch.empty(7, 3, 4, device="meta")).shape == (7, 3, 2)


# -- placement in models split over devices ----------------------------------------------------------------------
@pytest.fixture
def split_model(make_tiny_model, monkeypatch):
    """The tiny model split as TransformerLens splits one over two devices: block 0 on the CPU, block 1 and what
    follows on a second device (meta stands in for it), and the forward moving the residual between them."""
    model = make_tiny_model(normalization_type="LNPre")
    second = torch.device("meta")
    module = importlib.import_module("transformer_lens.HookedTransformer")
    monkeypatch.setattr(
        module, "get_device_for_block_index", lambda i, cfg, device=None: second if i >= 1 else torch.device("cpu")
    )
    for part in (model.blocks[1], model.ln_final, model.unembed):
        part.to(second)
    return model


def test_codebooks_sit_on_the_device_of_their_block(split_model):
    cbinterp.attach_codebooks(split_model, ("attn", "mlp", "resid"), n_codes=8)
    devices = {name: cb.weight.device.type for name, cb in cbinterp.get_codebooks(split_model).items()}
    assert devices == {
        "blocks.0.attn.hook_z": "cpu",
        "blocks.0.hook_mlp_out": "cpu",
        "blocks.0.hook_resid_post": "cpu",
        "blocks.1.attn.hook_z": "meta",
        "blocks.1.hook_mlp_out": "meta",
        "blocks.1.hook_resid_post": "meta",
    }
    for cb in cbinterp.get_codebooks(split_model).values():
        assert {b.device.type for b in cb.buffers()} == {cb.weight.device.type}
    split_model.eval()
    assert split_model(torch.zeros(1, 3, dtype=torch.long)).device.type == "meta"  # no device mixed in a forward


def test_existing_codebooks_move_to_the_device_of_their_block(split_model):
    given = {name: Codebook(dim=8, n_codes=5, groups=4) for name in ("blocks.0.attn.hook_z", "blocks.1.attn.hook_z")}
    cbinterp.attach_codebooks(split_model, given)
    placed = cbinterp.get_codebooks(split_model)
    assert placed["blocks.0.attn.hook_z"].weight.device.type == "cpu"
    assert placed["blocks.1.attn.hook_z"].weight.device.type == "meta"


# -- on CUDA (skipped without a device) -------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("similarity", ["inner_product", "euclidean"])
def test_cuda_codes_equal_cpu_codes(similarity):
    cb = Codebook(dim=32, n_codes=500, k=4, groups=4, similarity=similarity, seed=2)
    x = torch.randn(300, 4, 32, generator=torch.Generator().manual_seed(5))
    on_cpu = cb.encode(x)
    on_cuda = cb.to("cuda").encode(x.cuda()).cpu()
    assert (on_cpu != on_cuda).any(-1).float().mean() < 0.01  # near ties may flip; nothing more


@needs_cuda
def test_cuda_search_asks_for_free_memory_only_when_it_needs_to(monkeypatch):
    asked = []
    real = search_blocks.cuda_free_bytes
    monkeypatch.setattr(search_blocks, "cuda_free_bytes", lambda device: asked.append(device) or real(device))
    small_x, small_w = torch.zeros(64, 4, 8, device="cuda"), torch.zeros(4, 100, 8, device="cuda")
    assert search_blocks.block_rows_for(small_x, small_w, 1) == 64 and not asked
    big_x, big_w = torch.zeros(8192, 16, 8, device="cuda"), torch.zeros(16, 10_000, 8, device="cuda")
    rows = search_blocks.block_rows_for(big_x, big_w, 8)
    assert len(asked) == 1 and 1 <= rows <= 8192
