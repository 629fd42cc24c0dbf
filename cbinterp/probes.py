"""Regex feature probes: which codes (and neurons) best detect a pattern in the decoded text of a `CodeCache`.

A feature is a regular expression over the text of each document, decoded by concatenating per-token strings
(`token_strings[token_id]`). Each match's character span is mapped to the tokens it covers: a token is covered
when its character span `[start, end)` overlaps the match's; a match that starts or ends inside a sub-word token
covers that token; zero-length tokens cover nothing; zero-length matches are ignored. `which` picks the first,
the last or any covered token of every match.
"""

from __future__ import annotations

import re
import warnings
from typing import Mapping, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cbinterp.analysis import add_neuron_precision, code_feature_table

__all__ = ["PROBE_COLUMNS", "doc_token_indices", "probe", "probe_figure", "token_positions"]

#: Columns of `probe`'s table before any neuron columns.
PROBE_COLUMNS = ["codebook", "head", "feature", "feature_name", "code", "n_fires", "n_feature", "tp",
                 "precision", "recall"]
_WHICH = ("first", "last", "any")


def _flat_tokens(cache_or_tokens) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, doc, pos) flattened, int64 on the CPU."""
    if isinstance(cache_or_tokens, Tensor):
        t = cache_or_tokens.long().cpu()
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2:
            raise ValueError(f"tokens must be (seq,) or (n_docs, seq), got shape {tuple(cache_or_tokens.shape)}.")
        n, s = t.shape
        return t.reshape(-1), torch.arange(n).repeat_interleave(s), torch.arange(s).repeat(n)
    return cache_or_tokens.tokens.cpu(), cache_or_tokens.doc.cpu(), cache_or_tokens.pos.cpu()


def doc_token_indices(doc: Tensor, pos: Tensor) -> list[tuple[int, np.ndarray]]:
    """For each document id (ascending), the flat token indices of its tokens in position order."""
    doc_np, pos_np = doc.cpu().numpy(), pos.cpu().numpy()
    order = np.lexsort((pos_np, doc_np))
    if len(order) == 0:
        return []
    cuts = np.flatnonzero(np.diff(doc_np[order])) + 1
    return [(int(doc_np[g[0]]), g) for g in np.split(order, cuts)]


def _decode(ids: np.ndarray, token_strings: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
    pieces = []
    for i in ids:
        if not 0 <= int(i) < len(token_strings):
            raise ValueError(f"token id {int(i)} has no string: token_strings has {len(token_strings)} entries.")
        pieces.append(str(token_strings[int(i)]))
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return "".join(pieces), starts, ends


def token_positions(cache_or_tokens, token_strings: Sequence[str], pattern: Union[str, "re.Pattern"],
                    which: str = "any") -> Tensor:
    """Bool mask `(n_tokens,)` of the tokens covered by matches of `pattern` in each decoded document.

    Args:
        cache_or_tokens: a `CodeCache` (the mask follows its token order) or token ids `(n_docs, seq)` / `(seq,)`
            (the mask is over the flattened ids, document by document).
        token_strings: one string per vocabulary id, e.g. `[tok.decode([i]) for i in range(vocab)]`.
        pattern: a regex (str or compiled), searched with `finditer` over each document's text.
        which: "first", "last" or "any" covered token of each match.
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}.")
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    tokens, doc, pos = _flat_tokens(cache_or_tokens)
    tok_np = tokens.numpy()
    mask = np.zeros(len(tok_np), dtype=bool)
    for _, idx in doc_token_indices(doc, pos):
        text, starts, ends = _decode(tok_np[idx], token_strings)
        nonempty = ends > starts
        for m in regex.finditer(text):
            a, b = m.span()
            if b <= a:
                continue
            covered = np.flatnonzero(nonempty & (starts < b) & (ends > a))
            if len(covered) == 0:
                continue
            if which == "any":
                mask[idx[covered]] = True
            elif which == "first":
                mask[idx[covered[0]]] = True
            else:
                mask[idx[covered[-1]]] = True
    return torch.from_numpy(mask)


def _pick_best(table: pd.DataFrame) -> pd.DataFrame:
    """Per (codebook, head, feature): highest precision, then higher recall, then lower code id."""
    if table.empty:
        return table
    ranked = table.sort_values(["codebook", "head", "feature", "precision", "recall", "code"],
                               ascending=[True, True, True, False, False, True], kind="mergesort")
    return ranked.drop_duplicates(["codebook", "head", "feature"], keep="first").reset_index(drop=True)


def probe(cache, features: Mapping[str, Union[str, "re.Pattern"]], token_strings: Sequence[str],
          which: str = "any", min_fires: int = 1, neurons: bool = True) -> pd.DataFrame:
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
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("codebook", "feature_name") else
                                          (np.int64 if c in ("head", "feature", "code", "n_fires", "n_feature", "tp")
                                           or (c.startswith("neuron_") and not c.startswith("neuron_precision_"))
                                           else np.float64)) for c in columns})
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
        best["best_neuron_precision"] = (best[[f"neuron_precision_{h}" for h in hooks]].max(axis=1)
                                         if len(best) else pd.Series(dtype=np.float64))
    return best[columns].reset_index(drop=True)


def probe_figure(table: pd.DataFrame, title: str = "Regex probes: best code vs best neuron"):
    """Grouped bars per feature: the best code's precision (max over codebooks/heads) beside the best neuron's
    precision at that code's recall (`best_neuron_precision`, when present)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if table.empty:
        fig.update_layout(title=title)
        return fig
    idx = table.groupby("feature_name", sort=False)["precision"].idxmax()
    top = table.loc[idx.to_numpy()]
    label = [f"{r.feature_name} ({r.codebook}/h{r.head}/c{r.code})" for r in top.itertuples()]
    fig.add_bar(name="best code", x=list(top["feature_name"]), y=list(top["precision"]), hovertext=label)
    if "best_neuron_precision" in top.columns:
        fig.add_bar(name="best neuron", x=list(top["feature_name"]), y=list(top["best_neuron_precision"]))
    fig.update_layout(title=title, barmode="group", yaxis_title="precision", yaxis_range=[0, 1.05])
    return fig
