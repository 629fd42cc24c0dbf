"""Code tables (pandas): each code's best features, and the best neuron at each row's recall."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from cbinterp.core.codebooks.heads import HEAD_DTYPE
from cbinterp.core.codebooks.naming import CODES_SUFFIX
from cbinterp.metrics._checks import Features, _as_int, _check_acts
from cbinterp.metrics.classifiers import (
    DEFAULT_CHUNK_ELEMENTS,
    CodeFeatureCounts,
    best_neuron_precision_batch,
    code_feature_counts,
)

__all__ = ["TABLE_COLUMNS", "add_neuron_precision", "code_feature_table"]


def _ranked_features(counts: CodeFeatureCounts, per_code: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(code, feature) pairs with tp > 0, each code's best first (see code_feature_table), codes ascending."""
    tp, fc, n = counts.tp, counts.feature_counts, counts.n_positions
    n_codes, n_features = tp.shape
    if n_features == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # For a fixed code precision is proportional to tp; among equal tp a smaller feature has the higher recall.
    key = tp * (n + 1) + (n - fc).unsqueeze(0)
    if per_code is None:
        code_idx, feat_idx = (x.cpu().numpy() for x in tp.nonzero(as_tuple=True))
        keys = key[tp > 0].cpu().numpy()  # row-major, the same order as nonzero
        order = np.lexsort((feat_idx, -keys, code_idx))
        return code_idx[order], feat_idx[order]
    m = min(per_code, n_features)
    if m == 1:
        feat = key.argmax(dim=1, keepdim=True)  # argmax returns the first maximum: the lowest feature id
    elif (n * (n + 2) + 1) * n_features < 2**62:
        unique_key = key * n_features + (n_features - 1 - torch.arange(n_features, device=tp.device))
        feat = unique_key.topk(m, dim=1).indices
    else:
        feat = key.sort(dim=1, descending=True, stable=True).indices[:, :m]
    keep = tp.gather(1, feat) > 0
    code_idx = torch.arange(n_codes, device=tp.device).unsqueeze(1).expand_as(feat)
    return code_idx[keep].cpu().numpy(), feat[keep].cpu().numpy()


def _per_codebook(value, name: str, what: str):
    if isinstance(value, Mapping):
        for key in (name, name + CODES_SUFFIX, name.removesuffix(CODES_SUFFIX)):
            if key in value:
                return value[key]
        raise ValueError(f"No {what} given for codebook {name!r}; add it to the {what} mapping.")
    return value


#: The columns of `code_feature_table`, in order (plus `feature_name` when names are given).
TABLE_COLUMNS = ["codebook", "head", "code", "n_fires", "feature", "n_feature", "tp", "precision", "recall"]


def code_feature_table(
    codes: Tensor | Mapping[str, Tensor],
    features: Features,
    n_codes: int | Mapping[str, int],
    *,
    n_features: int | None = None,
    feature_names: Sequence[str] | None = None,
    features_per_code: int | None = 1,
    drop_never_firing: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> pd.DataFrame:
    """Each code's best feature(s) by precision, as a table with one row per (codebook, head, code, feature).

    Args:
        codes: one tensor or a mapping from codebook name to tensor (e.g. `cached_codes(cache)`), each
            `(n_positions, k)` or, for a per-head codebook, `(n_positions, n_heads, k)`; heads are counted one at a
            time, so memory is one head's `n_codes x n_features` counts.
        features: bool `(n_positions, n_features)` or integer labels `(n_positions,)` with -1 = none, over the
            same positions as every codes tensor.
        n_codes: the number of codes (per head), one int or a mapping by codebook name.
        n_features: see `code_feature_counts`.
        feature_names: optional names; adds a `feature_name` column ("" where feature is -1).
        features_per_code: how many features to list per code (best first); None lists every feature with tp > 0.
        drop_never_firing: drop codes with n_fires == 0 instead of giving them a placeholder row.

    Returns:
        DataFrame with columns `codebook` (name; "codes" for a bare tensor), `head` (nullable `Int64`: the head
        index of a per-head codebook, `pd.NA` for a codebook without heads, e.g. an MLP codebook), `code`,
        `n_fires`, `feature`, `n_feature` (positions of the feature), `tp`, `precision` (tp / n_fires) and
        `recall` (tp / n_feature), ordered by codebook, head, code and rank. Ranking: higher precision first, then
        higher recall, then lower feature id. Only features with tp > 0 are listed; a code
        with none (including a code that never fires) gets one placeholder row with feature -1, n_feature 0, tp 0,
        precision 0.0 and recall 0.0.
    """
    named = {"codes": codes} if isinstance(codes, Tensor) else dict(codes)
    if not named:
        raise ValueError("codes is empty: pass a tensor or a mapping with at least one codebook.")
    if features_per_code is not None:
        features_per_code = _as_int(features_per_code, "features_per_code")
        if features_per_code < 1:
            raise ValueError(f"features_per_code must be >= 1 or None (all), got {features_per_code}.")
    frames = []
    n_feat_seen = None
    for name, tensor in named.items():
        if not isinstance(tensor, Tensor) or tensor.dim() not in (2, 3):
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(
                f"codes for {name!r} must be (n_positions, k) or (n_positions, n_heads, k), got {shape}; "
                f"flatten batch and position first (codes.flatten(0, 1), or cached_codes(cache))."
            )
        nf = features.shape[0] if isinstance(features, Tensor) else None
        if nf is not None and tensor.shape[0] != nf:
            raise ValueError(
                f"codes for {name!r} cover {tensor.shape[0]} positions (shape {tuple(tensor.shape)}) but features "
                f"cover {nf}; flatten batch and position of both (x.flatten(0, 1)) over the same positions."
            )
        cb_codes = _per_codebook(n_codes, name, "n_codes")
        heads = [(None, tensor)] if tensor.dim() == 2 else list(enumerate(tensor.unbind(1)))
        for head, head_codes in heads:
            counts = code_feature_counts(
                head_codes, features, cb_codes, n_features=n_features, chunk_elements=chunk_elements
            )
            n_feat_seen = counts.n_features
            frames.append(_table_rows(counts, name, head, features_per_code, drop_never_firing))
    table = pd.concat(frames, ignore_index=True)
    if feature_names is not None:
        names = list(feature_names)
        if len(names) != n_feat_seen:
            raise ValueError(f"feature_names has {len(names)} names but there are {n_feat_seen} features.")
        lookup = np.array(names + [""], dtype=object)
        table["feature_name"] = lookup[table["feature"].to_numpy()]  # index -1 picks the trailing ""
    return table


def _table_rows(
    counts: CodeFeatureCounts, name: str, head: int | None, per_code, drop_never_firing: bool
) -> pd.DataFrame:
    code_idx, feat_idx = _ranked_features(counts, per_code)
    fires = counts.code_counts.cpu().numpy()
    fcounts = counts.feature_counts.cpu().numpy()
    dev = counts.tp.device
    tp = counts.tp[torch.from_numpy(code_idx).to(dev), torch.from_numpy(feat_idx).to(dev)].cpu().numpy()
    matched = np.zeros(counts.n_codes, dtype=bool)
    matched[code_idx] = True
    empty = np.flatnonzero(~matched)
    if drop_never_firing:
        empty = empty[fires[empty] > 0]
    code_all = np.concatenate([code_idx, empty]).astype(np.int64)
    feat_all = np.concatenate([feat_idx, np.full(len(empty), -1)]).astype(np.int64)
    tp_all = np.concatenate([tp, np.zeros(len(empty))]).astype(np.int64)
    nfeat_all = np.concatenate([fcounts[feat_idx], np.zeros(len(empty))]).astype(np.int64)
    order = np.argsort(code_all, kind="stable")
    code_all, feat_all, tp_all, nfeat_all = code_all[order], feat_all[order], tp_all[order], nfeat_all[order]
    fires_all = fires[code_all].astype(np.int64)
    frame = pd.DataFrame(
        {
            "codebook": pd.Series([name] * len(code_all), dtype=object),
            "head": pd.Series([pd.NA if head is None else head] * len(code_all), dtype=HEAD_DTYPE),
            "code": code_all,
            "n_fires": fires_all,
            "feature": feat_all,
            "n_feature": nfeat_all,
            "tp": tp_all,
            "precision": tp_all / np.maximum(fires_all, 1),
            "recall": tp_all / np.maximum(nfeat_all, 1),
        }
    )
    return frame[TABLE_COLUMNS]


def add_neuron_precision(
    table: pd.DataFrame,
    neuron_sets: Mapping[str, Float[Tensor, "n_tokens _n_neurons"]],
    features: Features,
    *,
    n_features: int | None = None,
    both_signs: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> pd.DataFrame:
    """A copy of a code table with, per neuron set, the best neuron's precision at each row's own recall.

    Args:
        table: rows with integer `feature` (-1 = none) and float `recall` columns, e.g. from `code_feature_table`.
        neuron_sets: named activations over the same positions as `features`, e.g.
            `{"mlp_post": acts, "site_outputs": acts}`.
        features: the features the table was computed from (same form and positions).
        both_signs: also read neurons from below; adds a `neuron_sign_<set>` column (+1 above, -1 below, 0 none).

    Returns:
        The table plus columns `neuron_precision_<set>` (float) and `neuron_<set>` (int index of the best neuron)
        for each set, side by side. Rows with feature -1 or recall 0 (no match, including codes that never fire)
        and rows whose feature has no positions get precision 0.0 and neuron -1.
    """
    missing = {"feature", "recall"} - set(table.columns)
    if missing:
        raise ValueError(f"table lacks the columns {sorted(missing)}; build it with code_feature_table.")
    if not isinstance(neuron_sets, Mapping) or not neuron_sets:
        raise TypeError(
            "neuron_sets must be a non-empty mapping from a set name to activations (n_positions, n_neurons)."
        )
    out = table.copy()
    feat = out["feature"].to_numpy(dtype=np.int64)
    rec = out["recall"].to_numpy(dtype=np.float64)
    if np.isnan(rec).any():
        raise ValueError("table's recall column holds NaN; fill or drop those rows first.")
    ask = np.flatnonzero((feat >= 0) & (rec > 0))
    for set_name, acts in neuron_sets.items():
        acts = _check_acts(acts, f"neuron set {set_name!r}")
        prec = np.zeros(len(out), dtype=np.float64)
        best = np.full(len(out), -1, dtype=np.int64)
        sgn = np.zeros(len(out), dtype=np.int64)
        if len(ask):
            res = best_neuron_precision_batch(
                acts,
                features,
                torch.from_numpy(feat[ask]),
                torch.from_numpy(np.minimum(rec[ask], 1.0)),
                n_features=n_features,
                both_signs=both_signs,
                chunk_elements=chunk_elements,
            )
            prec[ask] = res.precision.cpu().numpy()
            best[ask] = res.neuron.cpu().numpy()
            sgn[ask] = res.sign.cpu().numpy()
        out[f"neuron_precision_{set_name}"] = prec
        out[f"neuron_{set_name}"] = best
        if both_signs:
            out[f"neuron_sign_{set_name}"] = sgn
    return out
