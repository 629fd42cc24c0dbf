"""Topic codes for steering (cbinterp.metrics.steering)."""

from __future__ import annotations

import pandas as pd
import torch

from cbinterp.codecache.store import CodeCache
from cbinterp.metrics.steering import steering_codes, topic_codes

STRINGS = ["war ", "a ", "b "]


def grouped_cache(heads_with_code: int = 2) -> CodeCache:
    """One per-head codebook "attn" (2 heads, k=1, 4 codes) and one plain codebook "mlp" (k=2, 4 codes)."""
    tokens = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1], dtype=torch.int32)
    is_war = tokens == 0
    n = len(tokens)
    attn = torch.zeros(n, 2, 1, dtype=torch.uint8)
    attn[is_war, 0, 0] = 3  # head 0: code 3 on every "war"
    if heads_with_code == 2:
        attn[is_war, 1, 0] = 2  # head 1: code 2 on every "war"
        attn[1, 1, 0] = 2  # ... and one false alarm
    mlp = torch.zeros(n, 2, dtype=torch.uint8)
    mlp[:, 1] = 1
    mlp[is_war, 0] = 2
    meta = {
        "codebooks": {
            "attn": {"n_codes": 4, "k": 1, "groups": 2, "dim": 2, "shape": [2, 1]},
            "mlp": {"n_codes": 4, "k": 2, "groups": 1, "dim": 2, "shape": [2]},
        },
        "hooks": [],
        "n_tokens": n,
        "n_docs": 1,
    }
    arrays = {
        "tokens": tokens,
        "doc": torch.zeros(n, dtype=torch.int32),
        "pos": torch.arange(n, dtype=torch.int32),
        "codes/attn": attn,
        "codes/mlp": mlp,
    }
    return CodeCache(meta, arrays=arrays)


def test_topic_codes_best_per_codebook_and_head():
    cache = grouped_cache()
    table = topic_codes(cache, "war", STRINGS, min_fires=1)
    got = [(r.codebook, None if pd.isna(r.head) else int(r.head), r.code) for r in table.itertuples()]
    assert got == [("attn", 0, 3), ("attn", 1, 2), ("mlp", None, 2)]  # the plain codebook has no head, not 0
    assert table["head"].dtype == "Int64"
    assert table.loc[1, "precision"] == 0.75 and table.loc[0, "precision"] == 1.0
    codes = steering_codes(table, cache)
    assert codes["attn"].tolist() == [[3], [2]]  # (heads, 1): each head its own code
    assert codes["mlp"].tolist() == [2]


def test_per_head_codebook_with_a_head_without_code_is_left_out():
    cache = grouped_cache(heads_with_code=1)
    table = topic_codes(cache, "war", STRINGS, min_fires=1)
    # head 1 has only code 0, which fires everywhere: it passes the floors with precision 3/8
    table = table[table["precision"] > 0.5]
    assert set(steering_codes(table, cache)) == {"mlp"}


def test_mask_input_and_floors():
    cache = grouped_cache()
    mask = cache.tokens == 0
    assert topic_codes(cache, mask, min_fires=1).equals(topic_codes(cache, "war", STRINGS, min_fires=1))
    assert topic_codes(cache, mask, min_fires=100).empty
