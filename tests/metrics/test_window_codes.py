"""The paper's window-level code selection (cbinterp.metrics.window_codes) on synthetic caches."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from cbinterp.codecache.store import CodeCache
from cbinterp.metrics.steering import steering_codes
from cbinterp.metrics.window_codes import (
    best_window_codes,
    text_windows,
    topic_window_codes,
    window_code_shares,
    window_codes,
    window_steering_codes,
)

STRINGS = ["war ", "a ", "b ", "c "]


def cache_of(tokens: list[int], doc: list[int], attn: torch.Tensor, mlp: torch.Tensor | None = None) -> CodeCache:
    """A cache with a per-head codebook "attn" (heads x k codes of 8) and optionally a plain one "mlp"."""
    n = len(tokens)
    pos, last, count = [], None, 0
    for d in doc:
        count = count + 1 if d == last else 0
        pos.append(count)
        last = d
    codebooks = {"attn": {"n_codes": 8, "k": attn.shape[2], "groups": attn.shape[1], "dim": 2, "shape": [2, 2]}}
    arrays = {
        "tokens": torch.tensor(tokens, dtype=torch.int32),
        "doc": torch.tensor(doc, dtype=torch.int32),
        "pos": torch.tensor(pos, dtype=torch.int32),
        "codes/attn": attn.to(torch.uint8),
    }
    if mlp is not None:
        codebooks["mlp"] = {"n_codes": 8, "k": mlp.shape[1], "groups": 1, "dim": 2, "shape": [mlp.shape[1]]}
        arrays["codes/mlp"] = mlp.to(torch.uint8)
    meta = {"codebooks": codebooks, "hooks": [], "n_tokens": n, "n_docs": len(set(doc))}
    return CodeCache(meta, arrays=arrays)


def two_doc_cache() -> CodeCache:
    """Doc 0: 8 tokens about war (windows of 4: 3 and 2 "war"), doc 1: 6 tokens without (a 4- and a 2-token window).

    attn head 0: code 5 on every token of doc 0, code 1 elsewhere, code 2 everywhere; head 1: code 2 everywhere,
    code 6 on tokens 0 and 3, code 3 on doc 0's other six tokens, code 7 on every doc-1 token."""
    tokens = [0, 0, 1, 0, 0, 1, 0, 2] + [1, 2, 3, 1, 2, 3]
    doc = [0] * 8 + [1] * 6
    attn = torch.zeros(14, 2, 2, dtype=torch.long)
    attn[:8, 0, 0] = 5
    attn[8:, 0, 0] = 1
    attn[:, 0, 1] = 2
    attn[:, 1, 0] = 3
    attn[:, 1, 1] = 2
    attn[[0, 3], 1, 0] = 6
    attn[8:, 1, 0] = 7
    return cache_of(tokens, doc, attn)


def test_text_windows_follow_documents_and_drop_short_pieces():
    cache = two_doc_cache()
    windows, window_doc = text_windows(cache, window=4)
    # doc 1's last piece has 2 tokens = window // 2: kept; with min_tokens=3 it is dropped
    assert windows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    assert window_doc.tolist() == [0, 0, 1, 1]
    windows, window_doc = text_windows(cache, window=4, min_tokens=3)
    assert windows.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [-1] * 2
    assert window_doc.tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="window must be a positive int"):
        text_windows(cache, window=0)
    with pytest.raises(ValueError, match="min_tokens"):
        text_windows(cache, window=4, min_tokens=5)


def test_shares_are_window_means_of_token_shares():
    cache = two_doc_cache()
    windows, _ = text_windows(cache, window=4)
    group = torch.tensor([True, True, False, False])
    shares = window_code_shares(cache, windows, group)["attn"]
    assert shares.shape == (2, 8)
    assert shares[0, 5] == pytest.approx(1.0) and shares[0, 1] == 0.0
    # code 6: 1 of window 0's 4 tokens, 1 of window 1's 4: mean 0.25
    assert shares[1, 6] == pytest.approx(0.25)
    rest = window_code_shares(cache, windows, ~group)["attn"]
    # code 7 on all tokens of a 4-token and a 2-token window: the windows weigh the same, not their tokens
    assert rest[1, 7] == pytest.approx(1.0) and rest[0, 2] == pytest.approx(1.0)


def test_topic_window_codes_find_the_topic_code_and_count_passes():
    cache = two_doc_cache()
    table, counts = topic_window_codes(cache, r"war", STRINGS, window=4, min_matches=2, min_active=0.5)
    assert counts == {"windows": 4, "topical": 2, "elsewhere": 2}
    top = table.iloc[0]
    assert (top["codebook"], int(top["head"]), int(top["code"])) == ("attn", 0, 5)
    assert top.active_in == pytest.approx(1.0) and top.active_out == 0.0 and bool(top.passes)
    # code 2 is active everywhere: score 0, fails "rare elsewhere"; code 6 is too rare in the topic to pass
    by_code = table.set_index(["head", "code"])
    assert not by_code.loc[(0, 2), "passes"] and by_code.loc[(0, 2), "score"] == pytest.approx(0.0)
    assert not by_code.loc[(1, 6), "passes"]
    assert by_code.loc[(1, 3), "active_in"] == pytest.approx(0.75)
    assert set(table.loc[table.passes, "code"]) == {5, 3}
    lower, _ = topic_window_codes(cache, r"war", STRINGS, window=4, min_matches=2, min_active=0.25)
    assert set(lower.loc[lower.passes, "code"]) == {5, 3, 6}
    # three matches by default: only window 0 has them; with four required, nothing is topical and no code is found
    _, counts = topic_window_codes(cache, r"war", STRINGS, window=4)
    assert counts == {"windows": 4, "topical": 1, "elsewhere": 2}
    none, counts = topic_window_codes(cache, r"war", STRINGS, window=4, min_matches=4)
    assert none.empty and counts["topical"] == 0


def test_best_window_codes_feed_steering_codes_per_head():
    cache = two_doc_cache()
    table, _ = topic_window_codes(cache, r"war", STRINGS, window=4, min_matches=2)
    best = best_window_codes(table, cache)
    assert [(int(r.head), int(r.code)) for r in best.itertuples()] == [(0, 5), (1, 3)]
    assert steering_codes(best, cache)["attn"].tolist() == [[5], [3]]
    assert window_steering_codes(best, cache)["attn"].tolist() == [[5], [3]]
    two = best_window_codes(table, cache, per_head=2)  # each head's two best, best first
    assert window_steering_codes(two, cache)["attn"].tolist() == [[5, 2], [3, 6]]  # code 1 is never topical
    with pytest.raises(ValueError, match="per_head"):
        best_window_codes(table, cache, per_head=0)


def test_window_codes_groups_and_a_codebook_without_heads():
    tokens = [1, 2, 3, 1, 2, 3, 1, 2]
    doc = [0, 0, 0, 0, 1, 1, 1, 1]
    attn = torch.zeros(8, 2, 1, dtype=torch.long)
    mlp = torch.zeros(8, 2, dtype=torch.long)
    mlp[:4, 0] = 4  # the first document's code
    mlp[4:, 0] = 8  # the no-code id (n_codes) counts nowhere
    mlp[:, 1] = 3
    cache = cache_of(tokens, doc, attn, mlp)
    windows, window_doc = text_windows(cache, window=4)
    table = window_codes(cache, windows, window_doc == 0)
    mlp_rows = table[table.codebook == "mlp"]
    assert mlp_rows["head"].isna().all() and table["head"].dtype == "Int64"
    assert mlp_rows.iloc[0].code == 4 and bool(mlp_rows.iloc[0].passes)
    assert mlp_rows.set_index("code").loc[3, "active_out"] == 1.0 and 8 not in set(mlp_rows.code)
    assert list(steering_codes(best_window_codes(table, cache), cache)["mlp"].tolist()) == [4]
    with pytest.raises(ValueError, match="in_group holds no window"):
        window_codes(cache, windows, torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_active must be a share"):
        window_codes(cache, windows, window_doc == 0, min_active=1.5)
    with pytest.raises(ValueError, match="differ in shape"):
        window_codes(cache, windows, window_doc == 0, torch.ones(3, dtype=torch.bool))
    assert isinstance(table, pd.DataFrame)


def test_ratio_score_prefers_a_precise_code_and_min_in_drops_rare_ones():
    """Code 1: on 6/8 of the group's tokens and 2/8 elsewhere (difference 0.5, ratio 0.75); code 2: on 2/8 of the
    group's tokens only (difference 0.25, ratio 1)."""
    doc = [0] * 8 + [1] * 8
    attn = torch.zeros(16, 1, 1, dtype=torch.long)
    attn[[0, 1, 2, 4, 5, 6], 0, 0] = 1
    attn[[3, 7], 0, 0] = 2
    attn[[8, 12], 0, 0] = 1
    cache = cache_of([1] * 16, doc, attn)
    windows, window_doc = text_windows(cache, window=4)
    group = window_doc == 0
    by_diff = window_codes(cache, windows, group)
    assert by_diff.code.tolist() == [1, 2] and by_diff.score.tolist() == pytest.approx([0.5, 0.25])
    by_ratio = window_codes(cache, windows, group, score="ratio")
    assert by_ratio.code.tolist() == [2, 1] and by_ratio.score.tolist() == pytest.approx([1.0, 0.75])
    floor = window_codes(cache, windows, group, score="ratio", min_in=0.3)
    assert floor.code.tolist() == [1]
    with pytest.raises(ValueError, match="score must be one of"):
        window_codes(cache, windows, group, score="log")
    with pytest.raises(ValueError, match="min_in"):
        window_codes(cache, windows, group, min_in=2)
