"""Tests for cbinterp.codecache.queries, checked by brute force on a tiny cache."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from cbinterp import attach_codebooks, cache_codes
from cbinterp.codecache.queries import (
    code_contexts,
    code_fires,
    code_frequencies,
    codes_at,
    codes_for_token,
    cooccurrence,
    dead_codes,
    top_tokens,
)
from cbinterp.metrics.probes import SEARCH_COLUMNS, search_codes
from cbinterp.viz.html import context_view
from cbinterp.viz.plots import code_frequency_figure

pytestmark = pytest.mark.usefixtures("one_thread")

CHARS = [chr(ord("a") + i) for i in range(11)]
ATTN = "blocks.0.attn.hook_z"  # per-head codebook
MLP = "blocks.0.hook_mlp_out"  # one group, no heads


@pytest.fixture(scope="module")
def cache(_base_model):
    model = attach_codebooks(copy.deepcopy(_base_model), ["attn", "mlp"], n_codes=8, k=2)
    docs = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(2))
    return cache_codes(model, docs, batch_size=5, progress=False)


def per_head(cache, name):
    codes = cache.codes(name)
    return [(None, codes)] if codes.dim() == 2 else [(None, codes)] + [(h, codes[:, h]) for h in range(codes.shape[1])]


def test_frequencies_and_dead(cache):
    for name in cache.codebook_names:
        for head, codes in per_head(cache, name):
            rows = codes.reshape(-1, codes.shape[-1])
            want = torch.tensor([sum(int(c in set(r.tolist())) for r in rows) for c in range(cache.n_codes(name))])
            freq = code_frequencies(cache, name, head)
            assert freq.dtype == torch.int64 and torch.equal(freq, want)
            assert torch.equal(dead_codes(cache, name, head), torch.nonzero(want == 0).flatten())
    with pytest.raises(ValueError):
        code_frequencies(cache, ATTN, head=99)


def test_codes_for_token_top_tokens_cooccurrence(cache):
    names = cache.codebook_names
    mlp = [n for n in names if n != ATTN][0]
    codes, toks = cache.codes(mlp), cache.tokens
    tid = int(toks[0])
    table = codes_for_token(cache, mlp, tid)
    occ = codes[toks == tid]
    for row in table.itertuples():
        count = int((occ == row.code).any(-1).sum())
        assert row.count == count and row.share == pytest.approx(count / len(occ))
    assert int(table["count"].sum()) == sum(len(set(r.tolist()) - {-1}) for r in occ)
    assert (np.diff(table["count"].to_numpy()) <= 0).all()

    c = int(codes[0, 0])
    fires = (codes == c).any(-1)
    tt = top_tokens(cache, mlp, c, n=3)
    counts = torch.bincount(toks[fires], minlength=11)
    assert len(tt) <= 3 and tt["count"].iloc[0] == counts.max()
    for row in tt.itertuples():
        assert counts[row.token] == row.count and row.share == pytest.approx(row.count / int(fires.sum()))

    a2 = int(cache.codes(ATTN)[0, 1, 0])
    b = code_fires(cache, ATTN, a2)
    assert torch.equal(b, (cache.codes(ATTN) == a2).flatten(1).any(1))
    co = cooccurrence(cache, mlp, c, ATTN, a2)
    n_both = int((fires & b).sum())
    assert co == {
        "n_a": int(fires.sum()),
        "n_b": int(b.sum()),
        "n_both": n_both,
        "jaccard": pytest.approx(n_both / int((fires | b).sum())),
    }
    assert cooccurrence(cache, mlp, c, mlp, c)["jaccard"] == 1.0


def test_contexts_and_codes_at(cache):
    name = cache.codebook_names[-1]
    codes = cache.codes(name)
    c = int(codes[3, 0])
    ctx = code_contexts(cache, name, c, CHARS, window=2, max_examples=4, sample="first")
    fires = torch.nonzero((codes == c).any(-1)).flatten()[:4]
    assert len(ctx) == len(fires)
    docs = cache.tokens.reshape(5, 7)
    for ex, i in zip(ctx, fires.tolist()):
        d, p = i // 7, i % 7
        text = "".join(CHARS[t] for t in docs[d].tolist())
        assert (ex["doc"], ex["pos"]) == (d, p)
        assert ex["left"] == text[max(p - 2, 0) : p] and ex["token"] == text[p] and ex["right"] == text[p + 1 : p + 3]
    at = codes_at(cache, 2, 4)
    assert set(at) == set(cache.codebook_names)
    for n in cache.codebook_names:
        assert torch.equal(at[n], cache.codes(n)[2 * 7 + 4])
    with pytest.raises(KeyError):
        codes_at(cache, 9, 0)


def test_contexts_sample_the_firings(cache):
    name = cache.codebook_names[-1]
    codes = cache.codes(name)
    c = int(torch.bincount(codes[:, 0]).argmax())  # the most frequent code
    fires = torch.nonzero((codes == c).any(-1)).flatten().tolist()
    assert len(fires) > 4
    where = [d * 7 + p for d, p in ((x["doc"], x["pos"]) for x in code_contexts(cache, name, c, CHARS, max_examples=4))]
    assert len(where) == 4 and set(where) <= set(fires) and where == sorted(where)
    again = [(x["doc"], x["pos"]) for x in code_contexts(cache, name, c, CHARS, max_examples=4)]
    assert again == [(i // 7, i % 7) for i in where]  # seeded
    seeds = {
        tuple((x["doc"], x["pos"]) for x in code_contexts(cache, name, c, CHARS, max_examples=4, seed=s))
        for s in range(8)
    }
    assert len(seeds) > 1  # not always the same firings (a first-N sample would be)
    assert len(code_contexts(cache, name, c, CHARS, max_examples=None)) == len(fires)
    with pytest.raises(ValueError, match="sample"):
        code_contexts(cache, name, c, CHARS, sample="best")


def test_search_codes(cache):
    mask = cache.tokens == 3
    by_regex = search_codes(cache, "d", CHARS)
    by_mask = search_codes(cache, mask)
    assert list(by_mask.columns) == SEARCH_COLUMNS
    assert by_regex.equals(by_mask)
    # brute force over every codebook/head/code
    want = []
    for name in cache.codebook_names:
        codes = cache.codes(name)
        heads = [(None, codes)] if codes.dim() == 2 else list(enumerate(codes.unbind(1)))
        for h, hc in heads:
            for c in range(cache.n_codes(name)):
                f = (hc == c).any(-1)
                tp, n = int((f & mask).sum()), int(f.sum())
                if tp:
                    want.append((name, h, c, tp / n, tp / int(mask.sum()), 2 * tp / (n + int(mask.sum()))))
    assert len(by_mask) == len(want)
    got = {
        (r.codebook, None if pd.isna(r.head) else int(r.head), r.code): (r.precision, r.recall, r.f1)
        for r in by_mask.itertuples()
    }
    for name, h, c, p, r, f1 in want:
        assert got[(name, h, c)] == pytest.approx((p, r, f1))
    assert (np.diff(by_mask["f1"].to_numpy()) <= 1e-12).all()
    by_p = search_codes(cache, mask, rank_by="precision")
    assert by_p["precision"].iloc[0] == max(w[3] for w in want)
    with pytest.raises(ValueError):
        search_codes(cache, "d")
    with pytest.raises(ValueError):
        search_codes(cache, mask, rank_by="auc")


def test_search_codes_edge_cases(cache):
    empty = search_codes(cache, torch.zeros(cache.n_tokens, dtype=torch.bool))
    assert list(empty.columns) == SEARCH_COLUMNS and empty.empty
    with pytest.raises(ValueError):
        search_codes(cache, torch.ones(3, dtype=torch.bool))
    strict = search_codes(cache, cache.tokens == 3, min_fires=4)
    assert (strict["n_fires"] >= 4).all()


# -- heads: an MLP codebook has none (pd.NA in tables), attention heads are integers ---------------------------
def test_search_codes_reports_no_head_for_mlp_codebooks(cache):
    found = search_codes(cache, cache.tokens >= 0)  # every token: every code that fires has tp > 0
    assert found["head"].dtype == "Int64"
    mlp, attn = found[found.codebook == MLP], found[found.codebook == ATTN]
    assert len(mlp) and mlp["head"].isna().all()  # not head 0
    assert len(attn) and attn["head"].notna().all() and set(attn["head"].astype(int)) == {0, 1, 2, 3}
    empty = search_codes(cache, torch.zeros(cache.n_tokens, dtype=torch.bool))
    assert empty["head"].dtype == "Int64"


def test_a_table_row_head_is_passed_on_as_is(cache):
    """`head=row.head` works for rows of both kinds: NA reads as no head, an attention head as that head."""
    found = search_codes(cache, cache.tokens == 3)
    for kind in (MLP, ATTN):
        row = found[found.codebook == kind].iloc[0]
        codes = cache.codes(kind)
        codes = codes if pd.isna(row["head"]) else codes[:, int(row["head"])]
        fires = (codes == int(row["code"])).any(-1)
        assert torch.equal(code_fires(cache, kind, int(row["code"]), head=row["head"]), fires)
        top = top_tokens(cache, kind, int(row["code"]), head=row["head"])
        assert int(top["count"].sum()) == int(fires.sum())
        where = [(c["doc"], c["pos"]) for c in code_contexts(cache, kind, int(row["code"]), CHARS, head=row["head"])]
        assert len(where) == min(int(fires.sum()), 20)


def test_head_arguments_for_a_codebook_without_heads(cache):
    code = int(cache.codes(MLP)[0, 0])
    kwargs = dict(token_strings=CHARS, max_examples=None)
    want = code_contexts(cache, MLP, code, **kwargs)
    assert want  # the code fires
    # None (the default), a missing value and, for backward compatibility, 0 all mean the whole codebook
    for head in (pd.NA, np.nan, 0):
        assert code_contexts(cache, MLP, code, head=head, **kwargs) == want
        pd.testing.assert_frame_equal(top_tokens(cache, MLP, code, head=head), top_tokens(cache, MLP, code))
        assert torch.equal(code_frequencies(cache, MLP, head=head), code_frequencies(cache, MLP))
    for bad in (1, -1):
        with pytest.raises(ValueError, match=r"has no heads.*head=None"):
            top_tokens(cache, MLP, code, head=bad)
        with pytest.raises(ValueError, match="has no heads"):
            code_contexts(cache, MLP, code, CHARS, head=bad)
    with pytest.raises(TypeError, match="head must be an int"):
        top_tokens(cache, ATTN, code, head=1.5)
    # on a per-head codebook a missing value is no head too: every head pooled, as head=None
    pd.testing.assert_frame_equal(top_tokens(cache, ATTN, code, head=pd.NA), top_tokens(cache, ATTN, code))


def test_labels_name_a_head_only_for_per_head_codebooks(cache):
    code = int(cache.codes(MLP)[0, 0])
    for head in (None, pd.NA, 0):
        title = context_view(cache, MLP, code, CHARS, head=head).title
        assert title.startswith(f"{MLP}, code {code}: ") and "head" not in title
        assert code_frequency_figure(cache, MLP, head=head).layout.title.text.startswith(f"{MLP}: code frequency")
    code = int(cache.codes(ATTN)[0, 2, 0])
    assert context_view(cache, ATTN, code, CHARS, head=2).title.startswith(f"{ATTN} head 2, code {code}: ")
    with pytest.raises(ValueError, match=r"head -1 is out of range.*0\.\.3; for the last head pass 3"):
        context_view(cache, ATTN, code, CHARS, head=-1)
    assert context_view(cache, ATTN, code, CHARS).title.startswith(f"{ATTN}, code {code}: ")  # every head
    assert code_frequency_figure(cache, ATTN, head=1).layout.title.text.startswith(f"{ATTN} head 1: code frequency")


def test_a_negative_head_is_refused_everywhere(cache):
    """One rule for heads (heads.check_head), the interventions' rule too: heads are 0..n_heads-1."""
    code = int(cache.codes(ATTN)[0, 3, 0])
    calls = [
        lambda h: top_tokens(cache, ATTN, code, head=h),
        lambda h: code_contexts(cache, ATTN, code, CHARS, head=h),
        lambda h: code_frequencies(cache, ATTN, head=h),
        lambda h: dead_codes(cache, ATTN, head=h),
        lambda h: code_fires(cache, ATTN, code, head=h),
        lambda h: codes_for_token(cache, ATTN, 1, head=h),
        lambda h: cooccurrence(cache, ATTN, code, MLP, 0, head_a=h),
    ]
    for call in calls:
        for bad in (-1, -4, 4):
            with pytest.raises(ValueError, match=rf"head {bad} is out of range.*0\.\.3"):
                call(bad)
        with pytest.raises(TypeError, match="head must be an int"):
            call(True)
    assert torch.equal(code_fires(cache, ATTN, code, head=np.int64(3)), code_fires(cache, ATTN, code, head=3))


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda c, code: top_tokens(c, MLP, code, n=-1), ValueError, "n must be an int >= 1, got -1"),
        (lambda c, code: top_tokens(c, MLP, code, n=0), ValueError, "n must be an int >= 1"),
        (lambda c, code: top_tokens(c, MLP, code, n=2.5), TypeError, "n must be an int"),
        (lambda c, code: top_tokens(c, MLP, code, n=2.0), TypeError, "n must be an int"),
        (lambda c, code: top_tokens(c, MLP, code, n=True), TypeError, "n must be an int"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, max_examples=-1), ValueError, "max_examples"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, max_examples=0), ValueError, "max_examples"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, max_examples=2.5), TypeError, "max_examples"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, max_examples=True), TypeError, "max_examples"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, window=-1), ValueError, "window must be an int >= 0"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, window=1.5), TypeError, "window must be an int"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, window=float("nan")), TypeError, "window"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, seed=None), TypeError, "seed must be an int"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, seed=-3), ValueError, "seed must be an int >= 0"),
        (lambda c, code: code_contexts(c, MLP, code, CHARS, sample=["first"]), ValueError, "sample must be one"),
        (lambda c, code: context_view(c, MLP, code, CHARS, max_examples=-1), ValueError, "max_examples"),
        (lambda c, code: codes_for_token(c, MLP, 11), ValueError, r"token id 11.*\[0, 11\)"),
        (lambda c, code: codes_for_token(c, MLP, -1), ValueError, "token_id must be an int >= 0"),
        (lambda c, code: codes_for_token(c, MLP, 2.7), TypeError, "token_id must be an int"),
        (lambda c, code: codes_at(c, 1.9, 0), TypeError, "doc must be an int"),
        (lambda c, code: codes_at(c, True, 0), TypeError, "doc must be an int"),
        (lambda c, code: codes_at(c, 0, -1), ValueError, "pos must be an int >= 0"),
    ],
)
def test_count_arguments_are_checked(cache, call, error, match):
    with pytest.raises(error, match=match):
        call(cache, int(cache.codes(MLP)[0, 0]))
