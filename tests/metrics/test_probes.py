"""Regex features mapped to tokens (cbinterp.codecache.features) and the best codes/neurons per feature (probes)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from cbinterp import attach_codebooks, cache_codes
from cbinterp.codecache.features import token_positions
from cbinterp.metrics.probes import PROBE_COLUMNS, probe
from cbinterp.viz.plots import probe_figure

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.0.mlp.hook_post"
SUB = ["Ja", "nuary", " 20", "24", " B", "ob", "", ","]
DOCS = torch.tensor(
    [
        [0, 1, 2, 3, 6, 7, 4, 5],  # "January 2024, Bob" (an empty token before ",")
        [4, 5, 4, 5, 6, 6, 0, 1],
    ]
)  # " Bob Bob" + "" + "" + "January"
CHARS = [chr(ord("a") + i) for i in range(11)]


def idx(*flat):
    m = torch.zeros(DOCS.numel(), dtype=torch.bool)
    m[list(flat)] = True
    return m


@pytest.mark.parametrize(
    "pattern, which, expected",
    [
        (r"\d+", "any", [2, 3]),
        (r"\d+", "first", [2]),
        (r"\d+", "last", [3]),
        (r"uary 2", "any", [1, 2]),
        (r"4,", "any", [3, 5]),
        (r"4,", "first", [3]),
        (r"4,", "last", [5]),  # the empty token in between is skipped
        (r"Bob", "any", [6, 7, 8, 9, 10, 11]),
        (r"Bob", "first", [6, 8, 10]),
        (r"Bob", "last", [7, 9, 11]),
        (r"o", "any", [7, 9, 11]),  # inside a sub-word token
        (r"x*", "any", []),  # zero-length matches only
        (r"ob Bob Bob", "any", []),  # never across documents (doc 0 ends "Bob", doc 1 starts " Bob Bob")
        (r"BobJ", "any", [10, 11, 14]),  # across empty tokens
        (re.compile(r"^ B"), "any", [8]),  # compiled pattern, anchored per document
    ],
)
def test_token_positions_subword(pattern, which, expected):
    assert torch.equal(token_positions(DOCS, SUB, pattern, which=which), idx(*expected))


def test_token_positions_char_vocab_and_cache_order():
    toks = torch.tensor([[0, 1, 2, 0, 1], [2, 2, 0, 1, 3]])  # "abcab", "ccabd"
    assert torch.equal(token_positions(toks, CHARS, "ab"), torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 1, 0]).bool())
    assert torch.equal(
        token_positions(toks, CHARS, "ab", which="last"), torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 1, 0]).bool()
    )
    assert torch.equal(token_positions(toks[0], CHARS, "c"), torch.tensor([0, 0, 1, 0, 0]).bool())
    # a cache-like object whose tokens are stored out of order: the mask follows the stored order
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    flat = toks.reshape(-1)
    doc, pos = torch.arange(2).repeat_interleave(5), torch.arange(5).repeat(2)
    fake = SimpleNamespace(tokens=flat[perm], doc=doc[perm], pos=pos[perm])
    assert torch.equal(token_positions(fake, CHARS, "ab"), token_positions(toks, CHARS, "ab")[perm])
    with pytest.raises(ValueError):
        token_positions(toks, CHARS, "a", which="middle")
    with pytest.raises(ValueError):
        token_positions(toks, CHARS[:2], "a")


@pytest.fixture(scope="module")
def cache(_base_model):
    import copy

    model = attach_codebooks(copy.deepcopy(_base_model), ["attn", "mlp"], n_codes=8)
    docs = torch.randint(0, 11, (6, 8), generator=torch.Generator().manual_seed(5))
    return cache_codes(model, docs, batch_size=6, hooks=[HOOK], progress=False)


def brute_best(codes, feat, n_codes, min_fires=1):
    """(precision, recall, code) of the best code, by brute force."""
    best = None
    for c in range(n_codes):
        fires = (codes == c).any(-1)
        n, tp = int(fires.sum()), int((fires & feat).sum())
        if n < min_fires or tp == 0:
            continue
        key = (tp / n, tp / int(feat.sum()), -c)
        best = key if best is None or key > best else best
    return best


def test_probe_matches_brute_force(cache):
    feats = {"tok_c": "c", "a_then": "a.", "d_or_e": "[de]"}
    table = probe(cache, feats, CHARS, min_fires=2)
    assert list(table.columns[: len(PROBE_COLUMNS)]) == PROBE_COLUMNS
    assert {f"neuron_precision_{HOOK}", f"neuron_{HOOK}", "best_neuron_precision"} <= set(table.columns)
    assert not table.drop(columns="head").isna().any().any()
    assert table["head"].dtype == "Int64"
    grouped = table["codebook"].map(lambda name: cache.codes(name).dim() == 3)
    assert table.loc[~grouped, "head"].isna().all() and (~grouped).any()  # MLP rows: no head
    assert table.loc[grouped, "head"].between(0, 3).all() and grouped.any()  # attention rows: integer heads
    assert (table["n_fires"] >= 2).all()
    for f, (fname, pat) in enumerate(feats.items()):
        mask = token_positions(cache, CHARS, pat)
        if fname == "tok_c":
            assert torch.equal(mask, cache.tokens == 2)
        for name in cache.codebook_names:
            codes = cache.codes(name)
            heads = [(None, codes)] if codes.dim() == 2 else list(enumerate(codes.unbind(1)))
            for h, hc in heads:
                want = brute_best(hc, mask, cache.n_codes(name), min_fires=2)
                same_head = table["head"].isna() if h is None else table["head"].eq(h).fillna(False)
                row = table[(table.codebook == name) & same_head & (table.feature_name == fname)]
                if want is None:
                    assert row.empty
                    continue
                assert len(row) == 1
                r = row.iloc[0]
                assert r.feature == f
                assert r.precision == pytest.approx(want[0]) and r.recall == pytest.approx(want[1])
                assert r.code == -want[2]
    assert table["best_neuron_precision"].between(0, 1).all()
    fig = probe_figure(table)
    assert len(fig.data) == 2


def test_probe_without_neurons(cache):
    table = probe(cache, {"tok_c": "c"}, CHARS, neurons=False)
    assert list(table.columns) == PROBE_COLUMNS and len(table) > 0


def test_probe_no_match_warns_and_drops(cache):
    with pytest.warns(UserWarning, match="nothing_here"):
        table = probe(cache, {"nothing_here": "z", "tok_c": "c"}, CHARS)
    assert set(table.feature_name) == {"tok_c"}
    with pytest.warns(UserWarning, match="nothing_here"):
        empty = probe(cache, {"nothing_here": "z"}, CHARS)
    assert isinstance(empty, pd.DataFrame) and empty.empty
    assert list(empty.columns[: len(PROBE_COLUMNS)]) == PROBE_COLUMNS
    assert "best_neuron_precision" in empty.columns
    assert empty["head"].dtype == "Int64"
    assert len(probe_figure(empty).data) == 0


def _ranking_cache():
    """One document of 300 tokens, 200 of them "a"; code 1 fires once (on an "a"), code 2 on 150 "a" + 10 others,
    code 3 on every token."""
    tokens = torch.tensor([0] * 200 + [1] * 100)
    codes = torch.full((300, 3), -1, dtype=torch.long)  # k = 3, -1 = no code
    codes[:, 0] = 3
    codes[0, 1] = 1
    codes[1:151, 2] = 2
    codes[200:210, 2] = 2
    return SimpleNamespace(
        tokens=tokens,
        doc=torch.zeros(300, dtype=torch.long),
        pos=torch.arange(300),
        n_tokens=300,
        codebook_names=["cb"],
        hook_names=[],
        codes=lambda name: codes,
        n_codes=lambda name: 4,
    )


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({}, 2),  # the paper's search: recall > 1%, then precision
        ({"min_recall": 0.0}, 1),  # without a recall floor a single precise firing wins
        ({"rank_by": "recall"}, 3),
        ({"rank_by": "f1"}, 2),
        ({"min_fires": 200}, 3),
    ],
)
def test_probe_ranking_and_recall_floor(kwargs, code):
    table = probe(_ranking_cache(), {"a": "a"}, CHARS, neurons=False, **kwargs)
    assert len(table) == 1 and table.iloc[0].code == code
    row = table.iloc[0]
    assert row.f1 == pytest.approx(2 * row.tp / (row.n_fires + row.n_feature))


def test_probe_and_search_reject_bad_rankings(cache):
    for bad in ({"rank_by": "auc"}, {"min_recall": 1.5}, {"min_fires": 0}):
        with pytest.raises(ValueError):
            probe(cache, {"tok_c": "c"}, CHARS, **bad)
    with pytest.raises(TypeError, match="min_fires must be an int"):  # a count: never a float
        probe(cache, {"tok_c": "c"}, CHARS, min_fires=2.5)


def test_probe_figure_shows_recall():
    table = probe(_ranking_cache(), {"a": "a"}, CHARS, neurons=False)
    fig = probe_figure(table)
    assert "recall 0.75" in fig.data[0].text[0]
    assert pd.isna(table.iloc[0]["head"])  # the (n, k) codebook "cb" has no heads
    assert fig.data[0].hovertext[0] == "a (cb/c2)"  # no "/h0"


def test_probe_figure_names_attention_heads():
    table = pd.DataFrame(
        {
            "feature_name": ["x", "y"],
            "codebook": ["blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"],
            "head": pd.array([2, pd.NA], dtype="Int64"),
            "code": [5, 7],
            "precision": [0.9, 0.8],
            "recall": [0.1, 0.2],
        }
    )
    labels = list(probe_figure(table).data[0].hovertext)
    assert labels == ["x (blocks.0.attn.hook_z/h2/c5)", "y (blocks.0.hook_mlp_out/c7)"]
