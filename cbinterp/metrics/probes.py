"""Regex feature probes: which codes (and neurons) best detect a pattern in the decoded text of a `CodeCache`."""

from __future__ import annotations

import re
import warnings
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cbinterp.codecache.features import token_positions
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
]
SEARCH_COLUMNS = ["codebook", "head", "code", "n_fires", "n_feature", "tp", "precision", "recall", "f1"]


def _pick_best(table: pd.DataFrame) -> pd.DataFrame:
    """Per (codebook, head, feature): highest precision, then higher recall, then lower code id."""
    if table.empty:
        return table
    ranked = table.sort_values(
        ["codebook", "head", "feature", "precision", "recall", "code"],
        ascending=[True, True, True, False, False, True],
        kind="mergesort",
    )
    return ranked.drop_duplicates(["codebook", "head", "feature"], keep="first").reset_index(drop=True)


def probe(
    cache,
    features: Mapping[str, Union[str, "re.Pattern"]],
    token_strings: Sequence[str],
    which: str = "any",
    min_fires: int = 1,
    neurons: bool = True,
) -> pd.DataFrame:
    """Best code per (codebook, head, feature) as a classifier of each regex feature, beside the best neurons.

    Every code of every codebook is scored by `code_feature_table(..., features_per_code=None)`; among the codes
    with `n_fires >= min_fires` and at least one true positive, the best by precision (ties: higher recall, then
    lower code id) is kept. A regex that matches nothing is warned about and dropped.

    Returns:
        DataFrame with `PROBE_COLUMNS` (`feature` is the index among the kept features, `feature_name` its name)
        and, when `neurons` and the cache stores activations, `neuron_precision_<hook>` / `neuron_<hook>` for each
        stored hook (activations flattened to `(n_tokens, -1)`; the best neuron at the row's recall) plus
        `best_neuron_precision` (max over hooks). An empty table (same columns) when no feature survives.
    """
    if not isinstance(features, Mapping):
        raise TypeError("features must be a mapping from a feature name to a regex.")
    min_fires = int(min_fires)
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
        return pd.DataFrame(
            {
                c: pd.Series(
                    dtype=object
                    if c in ("codebook", "feature_name")
                    else (
                        np.int64
                        if c in ("head", "feature", "code", "n_fires", "n_feature", "tp")
                        or (c.startswith("neuron_") and not c.startswith("neuron_precision_"))
                        else np.float64
                    )
                )
                for c in columns
            }
        )
    feat = torch.stack(masks, dim=1)
    codes = {name: cache.codes(name) for name in cache.codebook_names}
    n_codes = {name: cache.n_codes(name) for name in cache.codebook_names}
    table = code_feature_table(codes, feat, n_codes, feature_names=names, features_per_code=None)
    table = table[(table["feature"] >= 0) & (table["n_fires"] >= min_fires) & (table["tp"] > 0)]
    best = _pick_best(table)
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
    pattern_or_mask: Union[str, "re.Pattern", Tensor],
    token_strings: Optional[Sequence[str]] = None,
    rank_by: str = "f1",
    which: str = "any",
    min_fires: int = 1,
) -> pd.DataFrame:
    """Codes of every codebook and head ranked as detectors of a regex (through `token_positions`, which
    needs `token_strings`) or of a given bool mask `(n_tokens,)`.

    Returns columns `SEARCH_COLUMNS` (`f1` = 2 tp / (n_fires + n_feature)), only codes with tp > 0 and
    `n_fires >= min_fires`, sorted by `rank_by` ("f1", "precision" or "recall") descending, then by the other two
    scores descending, then codebook, head and code.
    """
    scores = ("f1", "precision", "recall")
    if rank_by not in scores:
        raise ValueError(f"rank_by must be one of {scores}, got {rank_by!r}.")
    if isinstance(pattern_or_mask, Tensor):
        mask = pattern_or_mask.reshape(-1).bool().cpu()
        if mask.shape[0] != cache.n_tokens:
            raise ValueError(f"mask has {mask.shape[0]} entries but the cache has {cache.n_tokens} tokens.")
    else:
        if token_strings is None:
            raise ValueError("A regex needs token_strings to decode the documents.")
        mask = token_positions(cache, token_strings, pattern_or_mask, which=which)
    codes = {name: cache.codes(name) for name in cache.codebook_names}
    n_codes = {name: cache.n_codes(name) for name in cache.codebook_names}
    table = code_feature_table(codes, mask[:, None], n_codes, features_per_code=None)
    table = table[(table["feature"] == 0) & (table["tp"] > 0) & (table["n_fires"] >= int(min_fires))].copy()
    table["f1"] = 2 * table["tp"] / (table["n_fires"] + table["n_feature"]).clip(lower=1)
    others = [s for s in scores if s != rank_by]
    table = table.sort_values(
        [rank_by, *others, "codebook", "head", "code"],
        ascending=[False, False, False, True, True, True],
        kind="mergesort",
    )
    return table[SEARCH_COLUMNS].reset_index(drop=True)
