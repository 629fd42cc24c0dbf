"""Topic codes for steering: per codebook and head, the code that best detects a topic's words.

`topic_codes` runs the paper's search (`search_codes`: every code a classifier of the regex's tokens, recall >
`min_recall`, ranked by precision) and keeps the best code of every (codebook, head). `steering_codes` turns that
into the mapping `generate_with_codes` takes: for a per-head codebook a `(heads, 1)` tensor, each head its own code.
"""

from __future__ import annotations

import re

import pandas as pd
import torch
from torch import Tensor

from cbinterp.codecache.features import VocabularyLike
from cbinterp.metrics.probes import search_codes

__all__ = ["steering_codes", "topic_codes"]


def topic_codes(
    cache,
    pattern: str | re.Pattern | Tensor,
    token_strings: VocabularyLike = None,
    *,
    min_recall: float = 0.01,
    min_fires: int = 5,
    rank_by: str = "precision",
) -> pd.DataFrame:
    """The best code of every codebook and head for a regex (or a bool token mask) on `cache`.

    Returns `search_codes`' columns, one row per (codebook, head) that has a code passing the floors, in codebook
    then head order (`head` is `Int64`, `pd.NA` for a codebook without heads such as an MLP codebook).
    """
    found = search_codes(cache, pattern, token_strings, rank_by=rank_by, min_recall=min_recall, min_fires=min_fires)
    best = found.drop_duplicates(["codebook", "head"], keep="first")  # search_codes sorts best first
    order = {name: i for i, name in enumerate(cache.codebook_names)}
    best = best.assign(_order=best["codebook"].map(order)).sort_values(["_order", "head"], kind="mergesort")
    return best.drop(columns="_order").reset_index(drop=True)


def steering_codes(table: pd.DataFrame, cache) -> dict[str, Tensor]:
    """`generate_with_codes`' `codebook_codes` from a `topic_codes` table.

    Codebook -> `(k_ids,)` ids, or `(heads, 1)` for a per-head codebook. `generate_with_codes` forces every head of a
    codebook, so a per-head codebook with a head that has no topic code is left out."""
    out = {}
    for name in cache.codebook_names:
        rows = table[table["codebook"] == name]
        if rows.empty:
            continue
        codes = cache.codes(name)
        if codes.dim() == 3:
            if len(rows) != codes.shape[1]:
                continue
            out[name] = torch.tensor(rows.sort_values("head")["code"].to_list(), dtype=torch.long)[:, None]
        else:
            out[name] = torch.tensor([int(rows.iloc[0]["code"])], dtype=torch.long)
    return out
