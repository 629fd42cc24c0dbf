"""Regex feature probes: which codes (and neurons) best detect a pattern in the decoded text of a `CodeCache`."""

from __future__ import annotations

import numbers
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cbinterp.codecache.features import VocabularyLike, token_positions
from cbinterp.core.checks import is_int
from cbinterp.core.codebooks.heads import HEAD_DTYPE
from cbinterp.metrics.tables import add_neuron_precision, code_feature_table

__all__ = ["PROBE_COLUMNS", "SEARCH_COLUMNS", "probe", "search_codes"]

#: Columns of `probe`'s table before any neuron columns.
PROBE_COLUMNS = [
    "codebook",
    "head",
    "feature",
    "feature_name",
    "code",
    "n_fires",
    "n_feature",
    "tp",
    "precision",
    "recall",
    "f1",
]
SEARCH_COLUMNS = ["codebook", "head", "code", "n_fires", "n_feature", "tp", "precision", "recall", "f1"]


RANKINGS = ("precision", "recall", "f1")


def _check_ranking(rank_by: str, min_recall: float, min_fires: int) -> tuple[float, int]:
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {RANKINGS}, got {rank_by!r}.")
    if isinstance(min_recall, bool) or not isinstance(min_recall, numbers.Real):
        raise TypeError(f"min_recall must be a number in [0, 1], got {min_recall!r} ({type(min_recall).__name__}).")
    min_recall = float(min_recall)
    if not 0.0 <= min_recall <= 1.0:  # NaN fails this too
        raise ValueError(f"min_recall must lie in [0, 1], got {min_recall}.")
    if not is_int(min_fires):
        raise TypeError(f"min_fires must be an int >= 1, got {min_fires!r} ({type(min_fires).__name__}).")
    if min_fires < 1:
        raise ValueError(f"min_fires must be an int >= 1, got {min_fires}.")
    return min_recall, int(min_fires)


def _scored(table: pd.DataFrame, min_recall: float, min_fires: int) -> pd.DataFrame:
    """Rows with a true positive that pass the firing and recall floors, with an `f1` column."""
    keep = (table["feature"] >= 0) & (table["tp"] > 0) & (table["n_fires"] >= min_fires)
    keep &= table["recall"] > min_recall if min_recall > 0 else True
    out = table[keep].copy()
    out["f1"] = 2 * out["tp"] / (out["n_fires"] + out["n_feature"]).clip(lower=1)
    return out


def _ranked(table: pd.DataFrame, rank_by: str, first: Sequence[str] = ()) -> pd.DataFrame:
    """Sorted by `first`, then `rank_by` descending, the other two scores descending, then codebook, head, code."""
    others = [r for r in RANKINGS if r != rank_by]
    keys = [*first, rank_by, *others, "codebook", "head", "code"]
    ascending = [True] * len(first) + [False, False, False, True, True, True]
    return table.sort_values(keys, ascending=ascending, kind="mergesort")


def _pick_best(table: pd.DataFrame, rank_by: str) -> pd.DataFrame:
    """Per (codebook, head, feature): the best code by `rank_by` (ties: the other scores, then lower code id)."""
    if table.empty:
        return table
    ranked = _ranked(table, rank_by, first=("codebook", "head", "feature"))
    return ranked.drop_duplicates(["codebook", "head", "feature"], keep="first").reset_index(drop=True)


def _column_dtype(column: str):
    if column in ("codebook", "feature_name"):
        return object
    if column == "head":
        return HEAD_DTYPE
    ints = ("feature", "code", "n_fires", "n_feature", "tp")
    is_neuron_index = column.startswith("neuron_") and not column.startswith("neuron_precision_")
    return np.int64 if column in ints or is_neuron_index else np.float64


def probe(
    cache,
    features: Mapping[str, str | re.Pattern],
    token_strings: VocabularyLike | None = None,
    which: str = "any",
    min_fires: int = 1,
    neurons: bool = True,
    *,
    rank_by: str = "precision",
    min_recall: float = 0.01,
) -> pd.DataFrame:
    """Best code per (codebook, head, feature) as a classifier of each regex feature, beside the best neurons.

    The paper's search, feature first: every code of every codebook is scored as a classifier of the feature
    (`code_feature_table(..., features_per_code=None)`); among the codes with a true positive, `n_fires >=
    min_fires` and recall > `min_recall` (the paper: 1%), the best by `rank_by` ("precision", the paper's;
    "recall" or "f1"; ties: the other two scores, then lower code id) is kept. Without a recall floor the most
    precise code is often one that fires a handful of times, where some neuron is just as precise. A regex that
    matches nothing is warned about and dropped. `token_strings` is anything `Vocabulary` takes (a tokenizer
    gives exact character spans for byte-level BPE); None reads the cache's own text.

    Returns:
        DataFrame with `PROBE_COLUMNS` (`feature` is the index among the kept features, `feature_name` its name;
        `head` is `Int64`, `pd.NA` on the rows of codebooks without heads such as MLP codebooks)
        and, when `neurons` and the cache stores activations, `neuron_precision_<hook>` / `neuron_<hook>` for each
        stored hook (activations flattened to `(n_tokens, -1)`; the best neuron at the row's recall) plus
        `best_neuron_precision` (max over hooks). An empty table (same columns) when no feature survives.
    """
    if not isinstance(features, Mapping):
        raise TypeError("features must be a mapping from a feature name to a regex.")
    min_recall, min_fires = _check_ranking(rank_by, min_recall, min_fires)
    hooks = list(cache.hook_names) if neurons else []
    names, masks = [], []
    for name, pattern in features.items():
        mask = token_positions(cache, token_strings, pattern, which=which)
        if not bool(mask.any()):
            warnings.warn(f"Feature {name!r} ({pattern!r}) matches no token; dropped.", stacklevel=2)
            continue
        names.append(str(name))
        masks.append(mask)
    neuron_cols = [c for h in hooks for c in (f"neuron_precision_{h}", f"neuron_{h}")]
    if hooks:
        neuron_cols.append("best_neuron_precision")
    columns = PROBE_COLUMNS + neuron_cols
    if not names:
        return pd.DataFrame({c: pd.Series(dtype=_column_dtype(c)) for c in columns})
    feat = torch.stack(masks, dim=1)
    codes = {name: cache.codes(name) for name in cache.codebook_names}
    n_codes = {name: cache.n_codes(name) for name in cache.codebook_names}
    table = code_feature_table(codes, feat, n_codes, feature_names=names, features_per_code=None)
    best = _pick_best(_scored(table, min_recall, min_fires), rank_by)
    best = best[PROBE_COLUMNS].reset_index(drop=True)
    if hooks:
        sets = {h: cache.activations(h).reshape(feat.shape[0], -1).float() for h in hooks}
        best = add_neuron_precision(best, sets, feat)
        best["best_neuron_precision"] = (
            best[[f"neuron_precision_{h}" for h in hooks]].max(axis=1) if len(best) else pd.Series(dtype=np.float64)
        )
    return best[columns].reset_index(drop=True)


def search_codes(
    cache,
    pattern_or_mask: str | re.Pattern | Tensor,
    token_strings: VocabularyLike | None = None,
    rank_by: str = "f1",
    which: str = "any",
    min_fires: int = 1,
    *,
    min_recall: float = 0.0,
) -> pd.DataFrame:
    """Codes of every codebook and head ranked as detectors of a regex or of a given bool mask `(n_tokens,)`.

    A regex is matched through `token_positions`, which needs `token_strings`.

    Returns columns `SEARCH_COLUMNS` (`f1` = 2 tp / (n_fires + n_feature); `head` is `Int64`, `pd.NA` for a
    codebook without heads such as an MLP codebook, so `head=row.head` can be passed on), only codes with tp > 0,
    `n_fires >= min_fires` and recall > `min_recall`, sorted by `rank_by` ("f1", "precision" or "recall")
    descending, then by the other two scores descending, then codebook, head and code.
    """
    min_recall, min_fires = _check_ranking(rank_by, min_recall, min_fires)
    if isinstance(pattern_or_mask, Tensor):
        mask = pattern_or_mask.reshape(-1).bool().cpu()
        if mask.shape[0] != cache.n_tokens:
            raise ValueError(f"mask has {mask.shape[0]} entries but the cache has {cache.n_tokens} tokens.")
    else:
        mask = token_positions(cache, token_strings, pattern_or_mask, which=which)
    codes = {name: cache.codes(name) for name in cache.codebook_names}
    n_codes = {name: cache.n_codes(name) for name in cache.codebook_names}
    table = code_feature_table(codes, mask[:, None], n_codes, features_per_code=None)
    return _ranked(_scored(table, min_recall, min_fires), rank_by)[SEARCH_COLUMNS].reset_index(drop=True)
