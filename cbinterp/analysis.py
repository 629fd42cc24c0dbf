"""Codes and neurons as classifiers of binary features, over cached activations.

Everything here works on positions that have already been flattened: `n_positions` rows, one per (sequence,
token) that the caller wants to count. Drop positions that should not count at all (BOS, padding) before
calling; `cached_codes(cache, mask=...)` does this for the code ids of an `ActivationCache`.

Features come in one of two forms, accepted everywhere a `features` argument appears:

* a bool matrix `(n_positions, n_features)`: feature f holds at position i when `features[i, f]`;
* integer labels `(n_positions,)`: feature `labels[i]` holds at position i, and -1 means none holds (at most one
  feature per position, e.g. "the FSM state read here"). This form is much cheaper.

**Codes.** A code fires at a position when it is among the position's top-k code ids (-1 = no code; a code
listed twice at one position counts once). As a classifier of feature f it has
`precision = tp / n_fires` and `recall = tp / n_feature`, with `tp` the positions where both hold.

**Neurons.** A neuron is read from above: at target recall r for a feature with `n_feature` positions, let
`t = ceil(r * n_feature)` (clamped to [1, n_feature]; computed with a relative tolerance of 1e-9 so that float
rounding of e.g. `r = tp / n_feature` gives back `tp`) and let the threshold be the t-th largest activation among
the feature's positions. The neuron fires wherever its activation is `>= threshold`, on any position. Ties are
counted explicitly: every position whose activation equals the threshold fires, so the achieved recall can exceed
r (it is reported). Read from below (`from_below`/`both_signs`), the threshold is the t-th smallest activation and
the neuron fires where the activation is `<= threshold`.

**Rules for degenerate cases (no NaN is ever returned).** A code that never fires has precision 0.0 against every
feature; a feature with no positions has recall 0.0 from every code; a neuron query for a feature with no
positions gets precision 0.0, neuron -1, sign 0, threshold +inf and recall 0.0.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "BestNeurons",
    "CodeFeatureCounts",
    "NeuronRecallStats",
    "TABLE_COLUMNS",
    "add_neuron_precision",
    "best_neuron_precision_at_recall",
    "best_neuron_precision_batch",
    "cached_codes",
    "code_feature_counts",
    "code_feature_table",
    "neuron_precision_at_recall",
    "recall_targets",
]

#: Working blocks hold about this many elements (positions x neurons, or (position, feature) pairs x k).
DEFAULT_CHUNK_ELEMENTS = 1 << 23
_RECALL_RTOL = 1e-9
_CODES_SUFFIX = ".hook_codes"

Features = Union[Bool[Tensor, "n_positions n_features"], Int[Tensor, "n_positions"]]


# ------------------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------------------
def _as_int(value, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}.") from None


def _check_codes(codes, n_codes, what: str = "codes") -> Int[Tensor, "n_positions k"]:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of code ids, got {type(codes).__name__}.")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise TypeError(
            f"{what} must be an integer tensor of code ids (-1 = no code), got dtype {codes.dtype}; "
            f"pass the `hook_codes` activation as cached (int64)."
        )
    if codes.dim() != 2:
        raise ValueError(
            f"{what} must have shape (n_positions, k), got {tuple(codes.shape)}. Flatten batch and position first "
            f"(codes.flatten(0, 1)); for a per-head codebook pass one head (codes[:, h]) or use code_feature_table, "
            f"which iterates heads."
        )
    n_codes = _as_int(n_codes, "n_codes")
    if n_codes < 1:
        raise ValueError(f"n_codes must be >= 1, got {n_codes}.")
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < -1 or hi >= n_codes:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"{what} holds code id {bad}, outside [0, n_codes={n_codes}) and not -1 (no code); "
                f"pass the codebook's n_codes."
            )
    return codes.long()


def _check_features(features, n_positions: int, n_features: Optional[int]) -> tuple[Tensor, bool, int]:
    """Validate `features`; returns (features, is_labels, n_features)."""
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}.")
    if n_features is not None:
        n_features = _as_int(n_features, "n_features")
        if n_features < 0:
            raise ValueError(f"n_features must be >= 0, got {n_features}.")
    form = "bool (n_positions, n_features) or integer labels (n_positions,) with -1 for none"
    if features.dtype == torch.bool:
        if features.dim() != 2:
            raise ValueError(
                f"bool features must have shape (n_positions, n_features), got {tuple(features.shape)}; "
                f"give a single feature mask as mask[:, None], and flatten batch and position first."
            )
        if features.shape[0] != n_positions:
            raise ValueError(
                f"features has {features.shape[0]} positions but the codes/activations have {n_positions}; "
                f"both must be flattened over the same positions, in the same order."
            )
        if n_features is not None and n_features != features.shape[1]:
            raise ValueError(f"n_features={n_features} does not match features' {features.shape[1]} columns.")
        return features, False, features.shape[1]
    if features.is_floating_point() or features.is_complex():
        raise TypeError(
            f"features must be {form}; got dtype {features.dtype}. Convert a 0/1 matrix with features.bool()."
        )
    if features.dim() != 1:
        raise ValueError(
            f"integer features are labels and must have shape (n_positions,), got {tuple(features.shape)}; "
            f"flatten batch and position first, or pass a (n_positions, n_features) 0/1 matrix as features.bool()."
        )
    if features.shape[0] != n_positions:
        raise ValueError(
            f"features has {features.shape[0]} positions but the codes/activations have {n_positions}; "
            f"both must be flattened over the same positions, in the same order."
        )
    features = features.long()
    top = int(features.max()) if features.numel() else -1
    if features.numel() and int(features.min()) < -1:
        raise ValueError(f"feature labels must be >= -1 (-1 = no feature), got {int(features.min())}.")
    if n_features is None:
        n_features = top + 1
    elif top >= n_features:
        raise ValueError(f"feature label {top} is out of range for n_features={n_features}.")
    return features, True, n_features


def _check_acts(acts, what: str = "acts") -> Float[Tensor, "n_positions n_neurons"]:
    if not isinstance(acts, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(acts).__name__}.")
    if not acts.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor of activations, got dtype {acts.dtype}.")
    if acts.dim() != 2:
        raise ValueError(
            f"{what} must have shape (n_positions, n_neurons), got {tuple(acts.shape)}; flatten batch and position "
            f"(acts.flatten(0, 1)) and any per-head axes (acts.flatten(1))."
        )
    return acts


def _chunk(chunk_elements) -> int:
    chunk_elements = _as_int(chunk_elements, "chunk_elements")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}.")
    return chunk_elements


def _feature_positions(features: Tensor, is_labels: bool, f: int) -> Int[Tensor, "n_pos_f"]:
    column = features == f if is_labels else features[:, f]
    return column.nonzero().flatten()


# ------------------------------------------------------------------------------------------------------------
# codes as classifiers
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CodeFeatureCounts:
    """Co-occurrence counts of one codebook's codes (or one head's) with a set of features."""

    tp: Int[Tensor, "n_codes n_features"]  # positions where the code fires and the feature holds
    code_counts: Int[Tensor, "n_codes"]  # positions where the code fires
    feature_counts: Int[Tensor, "n_features"]  # positions where the feature holds
    n_positions: int

    @property
    def n_codes(self) -> int:
        return self.tp.shape[0]

    @property
    def n_features(self) -> int:
        return self.tp.shape[1]

    def precision(self) -> Float[Tensor, "n_codes n_features"]:
        """tp / code_counts as float64; 0.0 for codes that never fire."""
        return self.tp.double() / self.code_counts.clamp_min(1).double().unsqueeze(1)

    def recall(self) -> Float[Tensor, "n_codes n_features"]:
        """tp / feature_counts as float64; 0.0 for features with no positions."""
        return self.tp.double() / self.feature_counts.clamp_min(1).double().unsqueeze(0)


def _dedupe_codes(codes: Tensor) -> Tensor:
    """Replace repeats of a code id within a position by -1, so that a code counts once per position."""
    if codes.shape[1] < 2:
        return codes
    s = codes.sort(dim=1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return s.masked_fill(dup, -1)


def code_feature_counts(
    codes: Int[Tensor, "n_positions k"],
    features: Features,
    n_codes: int,
    *,
    n_features: Optional[int] = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> CodeFeatureCounts:
    """Dense firing, feature and true-positive counts of every code against every feature, in one pass.

    Args:
        codes: code ids per position (-1 = none), e.g. `cache["blocks.0.hook_mlp_out.hook_codes"].flatten(0, 1)`;
            for a per-head codebook, one head's ids `codes[:, h]`.
        features: bool `(n_positions, n_features)` or integer labels `(n_positions,)` with -1 = none.
        n_codes: the codebook's number of codes (ids must lie in [0, n_codes) or be -1).
        n_features: number of features; for labels defaults to `max(label) + 1`, for a bool matrix its width.
        chunk_elements: bound on the working block for bool features, in (position, feature) pairs times k.

    Returns:
        `CodeFeatureCounts` with int64 `tp (n_codes, n_features)`, `code_counts (n_codes,)`,
        `feature_counts (n_features,)` on the codes' device. Labels cost one 2-D bincount; a bool matrix one
        `index_add_` over its (position, feature) pairs per block of positions, so memory stays at the
        `n_codes * n_features` output plus one block.
    """
    codes = _check_codes(codes, n_codes)
    n_codes = _as_int(n_codes, "n_codes")
    n, k = codes.shape
    features, is_labels, n_features = _check_features(features, n, n_features)
    chunk_elements = _chunk(chunk_elements)
    device = codes.device
    features = features.to(device)
    codes = _dedupe_codes(codes)
    code_counts = torch.bincount(codes[codes >= 0], minlength=n_codes)
    if is_labels:
        feature_counts = torch.bincount(features[features >= 0], minlength=n_features)
        labels = features.unsqueeze(1).expand(n, k)
        both = (codes >= 0) & (labels >= 0)
        flat = codes[both] * n_features + labels[both]
        tp = torch.bincount(flat, minlength=n_codes * n_features)
    else:
        feature_counts = features.sum(0, dtype=torch.long)
        tp = torch.zeros(n_codes * n_features, dtype=torch.long, device=device)
        if n_features and n:
            rows = max(1, chunk_elements // (n_features * k))
            for start in range(0, n, rows):
                pos, feat = features[start : start + rows].nonzero(as_tuple=True)
                slot_codes = codes[start : start + rows][pos]  # (pairs, k)
                flat = slot_codes * n_features + feat.unsqueeze(1)
                flat = flat[slot_codes >= 0]
                tp.index_add_(0, flat, torch.ones_like(flat))
    return CodeFeatureCounts(
        tp=tp.view(n_codes, n_features), code_counts=code_counts, feature_counts=feature_counts, n_positions=n
    )


def _ranked_features(counts: CodeFeatureCounts, per_code: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
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
        for key in (name, name + _CODES_SUFFIX, name.removesuffix(_CODES_SUFFIX)):
            if key in value:
                return value[key]
        raise ValueError(f"No {what} given for codebook {name!r}; add it to the {what} mapping.")
    return value


#: The columns of `code_feature_table`, in order (plus `feature_name` when names are given).
TABLE_COLUMNS = ["codebook", "head", "code", "n_fires", "feature", "n_feature", "tp", "precision", "recall"]


def code_feature_table(
    codes: Union[Tensor, Mapping[str, Tensor]],
    features: Features,
    n_codes: Union[int, Mapping[str, int]],
    *,
    n_features: Optional[int] = None,
    feature_names: Optional[Sequence[str]] = None,
    features_per_code: Optional[int] = 1,
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
        DataFrame with columns `codebook` (name; "codes" for a bare tensor), `head` (head index, 0 for codebooks
        without heads), `code`, `n_fires`, `feature`, `n_feature` (positions of the feature), `tp`, `precision`
        (tp / n_fires) and `recall` (tp / n_feature), ordered by codebook, head, code and rank. Ranking: higher
        precision first, then higher recall, then lower feature id. Only features with tp > 0 are listed; a code
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
        heads = [tensor] if tensor.dim() == 2 else list(tensor.unbind(1))
        for head, head_codes in enumerate(heads):
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


def _table_rows(counts: CodeFeatureCounts, name: str, head: int, per_code, drop_never_firing: bool) -> pd.DataFrame:
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
    frame = pd.DataFrame({
        "codebook": pd.Series([name] * len(code_all), dtype=object),
        "head": np.full(len(code_all), head, dtype=np.int64),
        "code": code_all,
        "n_fires": fires_all,
        "feature": feat_all,
        "n_feature": nfeat_all,
        "tp": tp_all,
        "precision": tp_all / np.maximum(fires_all, 1),
        "recall": tp_all / np.maximum(nfeat_all, 1),
    })
    return frame[TABLE_COLUMNS]


def cached_codes(cache, mask: Optional[Bool[Tensor, "batch pos"]] = None) -> dict[str, Tensor]:
    """The code ids of every codebook in an `ActivationCache` (or any name -> tensor mapping), positions flattened.

    Returns `{codebook name: codes}` keyed by the codebook's hook name (".hook_codes" removed, as in
    `get_codebooks`), each `(n_positions, k)` or `(n_positions, n_heads, k)`. `mask (batch, pos)` keeps only the
    positions where it is True (e.g. to drop BOS or padding); without it all `batch * pos` positions are kept.
    """
    out = {}
    for name in list(cache.keys()):
        if not name.endswith(_CODES_SUFFIX):
            continue
        codes = cache[name]
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(codes.shape[:2]):
                raise ValueError(
                    f"mask must be a bool tensor of shape (batch, pos) = {tuple(codes.shape[:2])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}."
                )
            out[name.removesuffix(_CODES_SUFFIX)] = codes[mask.to(codes.device)]
        else:
            out[name.removesuffix(_CODES_SUFFIX)] = codes.flatten(0, 1)
    if not out:
        raise ValueError("The cache holds no '*.hook_codes' activations; run_with_cache a model with codebooks attached.")
    return out


# ------------------------------------------------------------------------------------------------------------
# neurons as classifiers
# ------------------------------------------------------------------------------------------------------------
class NeuronRecallStats(NamedTuple):
    """Every neuron thresholded at each requested recall, for one feature."""

    precision: Float[Tensor, "m n_neurons"]  # float64, tp / n_fires (0.0 for an empty feature)
    threshold: Float[Tensor, "m n_neurons"]  # +inf (-inf from below) for an empty feature
    tp: Int[Tensor, "m n_neurons"]  # feature positions at which the neuron fires (>= t because of ties)
    n_fires: Int[Tensor, "m n_neurons"]  # all positions at which the neuron fires


class BestNeurons(NamedTuple):
    """The most precise neuron per query; neuron -1 (precision 0.0, sign 0) where the feature has no positions."""

    precision: Float[Tensor, "q"]  # float64
    neuron: Int[Tensor, "q"]
    sign: Int[Tensor, "q"]  # +1: fires at act >= threshold, -1: fires at act <= threshold, 0: no neuron
    threshold: Float[Tensor, "q"]  # float64; +inf where neuron is -1
    recall: Float[Tensor, "q"]  # float64, the recall actually achieved (ties can push it above the target)


def _check_recalls(recalls) -> Float[Tensor, "m"]:
    r = torch.as_tensor(recalls, dtype=torch.float64).cpu()
    if r.dim() == 0:
        r = r.unsqueeze(0)
    if r.dim() != 1:
        raise ValueError(f"recalls must be a 1-D sequence of floats, got shape {tuple(r.shape)}.")
    if r.numel() and not bool(((r > 0) & (r <= 1)).all()):
        bad = r[~((r > 0) & (r <= 1))][0].item()
        raise ValueError(f"recalls must lie in (0, 1], got {bad}.")
    return r


def recall_targets(recalls, n_feature: int) -> Int[Tensor, "m"]:
    """t = ceil(r * n_feature), clamped to [1, n_feature] (0 when n_feature is 0), with a 1e-9 relative tolerance."""
    r = _check_recalls(recalls)
    if n_feature == 0:
        return torch.zeros_like(r, dtype=torch.long)
    t = torch.ceil(r * n_feature * (1 - _RECALL_RTOL)).long()
    return t.clamp(1, n_feature)


def _block_stats(pos_sorted: Tensor, all_sorted: Tensor, t: Tensor, from_below: bool):
    """(threshold, tp, n_fires), each (neurons, m), from ascending per-neuron sorts of the feature's and all positions."""
    n_pos, n = pos_sorted.shape[1], all_sorted.shape[1]
    if from_below:
        theta = pos_sorted[:, t - 1]
        tp = torch.searchsorted(pos_sorted, theta, side="right")
        fires = torch.searchsorted(all_sorted, theta, side="right")
    else:
        theta = pos_sorted[:, n_pos - t]
        tp = n_pos - torch.searchsorted(pos_sorted, theta, side="left")
        fires = n - torch.searchsorted(all_sorted, theta, side="left")
    return theta, tp, fires


def _neuron_blocks(acts: Tensor, chunk_elements: int):
    """Yield (first neuron, block (neurons, n_positions), its ascending sort) over blocks of neurons."""
    n, d = acts.shape
    work = torch.float64 if acts.dtype == torch.float64 else torch.float32
    cols = max(1, chunk_elements // max(n, 1))
    for j0 in range(0, d, cols):
        block = acts[:, j0 : j0 + cols].T.to(work).contiguous()
        if bool(torch.isnan(block).any()):
            raise ValueError(f"acts holds NaN (neurons {j0}..{j0 + block.shape[0] - 1}); activations must not be NaN.")
        yield j0, block, block.sort(dim=1).values


def neuron_precision_at_recall(
    acts: Float[Tensor, "n_positions n_neurons"],
    feature_mask: Bool[Tensor, "n_positions"],
    recalls: Union[Sequence[float], Float[Tensor, "m"]],
    *,
    from_below: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> NeuronRecallStats:
    """Precision of every neuron at each target recall for one feature (thresholds as in the module docstring).

    Args:
        acts: activations, positions flattened.
        feature_mask: where the feature holds.
        recalls: target recalls in (0, 1].
        from_below: read neurons from below (fire at act <= threshold) instead of from above.
        chunk_elements: neurons are processed in blocks of about this many activations (peak memory is about
            20 bytes per element).

    Returns:
        `NeuronRecallStats` of `(m, n_neurons)` tensors on the activations' device.
    """
    acts = _check_acts(acts)
    n, d = acts.shape
    mask = _check_mask(feature_mask, n)
    chunk_elements = _chunk(chunk_elements)
    idx = mask.to(acts.device).nonzero().flatten()
    t = recall_targets(recalls, idx.numel()).to(acts.device)
    m = t.numel()
    precision = torch.zeros(m, d, dtype=torch.float64, device=acts.device)
    threshold = torch.full((m, d), -math.inf if from_below else math.inf, dtype=torch.float64, device=acts.device)
    tp = torch.zeros(m, d, dtype=torch.long, device=acts.device)
    fires = torch.zeros(m, d, dtype=torch.long, device=acts.device)
    if idx.numel() == 0 or m == 0:
        return NeuronRecallStats(precision, threshold, tp, fires)
    for j0, block, all_sorted in _neuron_blocks(acts, chunk_elements):
        j1 = j0 + block.shape[0]
        pos_sorted = block[:, idx].sort(dim=1).values
        theta, tp_b, fires_b = _block_stats(pos_sorted, all_sorted, t, from_below)
        threshold[:, j0:j1] = theta.T.double()
        tp[:, j0:j1] = tp_b.T
        fires[:, j0:j1] = fires_b.T
        precision[:, j0:j1] = (tp_b.double() / fires_b.double()).T
    return NeuronRecallStats(precision, threshold, tp, fires)


def _check_mask(mask, n: int) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
        desc = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(
            f"feature_mask must be a 1-D bool tensor (n_positions,), got {desc}; for labels use (labels == f), "
            f"for several features use best_neuron_precision_batch."
        )
    if mask.shape[0] != n:
        raise ValueError(f"feature_mask has {mask.shape[0]} positions but acts has {n}; flatten both the same way.")
    return mask


def best_neuron_precision_at_recall(
    acts: Float[Tensor, "n_positions n_neurons"],
    feature_mask: Bool[Tensor, "n_positions"],
    recalls: Union[Sequence[float], Float[Tensor, "m"]],
    *,
    both_signs: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> BestNeurons:
    """For each target recall, the highest precision over all neurons for one feature, and which neuron.

    Neurons are read from above (as in the paper) unless `both_signs`, which also reads each from below. Ties in
    precision go to the lowest neuron index and, for the same neuron, to reading from above. An empty feature
    gives precision 0.0 and neuron -1. Returns `BestNeurons` of `(m,)` tensors.
    """
    acts = _check_acts(acts)
    mask = _check_mask(feature_mask, acts.shape[0])
    r = _check_recalls(recalls)
    return best_neuron_precision_batch(
        acts, mask.unsqueeze(1), torch.zeros(r.numel(), dtype=torch.long), r,
        both_signs=both_signs, chunk_elements=chunk_elements,
    )


def best_neuron_precision_batch(
    acts: Float[Tensor, "n_positions n_neurons"],
    features: Features,
    query_features: Union[Sequence[int], Int[Tensor, "q"]],
    query_recalls: Union[Sequence[float], Float[Tensor, "q"]],
    *,
    n_features: Optional[int] = None,
    both_signs: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> BestNeurons:
    """The best neuron for each (feature, target recall) query, sorting every neuron's activations only once.

    Args:
        acts: activations, positions flattened.
        features: bool `(n_positions, n_features)` or integer labels `(n_positions,)` with -1 = none.
        query_features: feature id of each query, in [0, n_features).
        query_recalls: target recall of each query, in (0, 1].
        both_signs, chunk_elements: as in `best_neuron_precision_at_recall` / `neuron_precision_at_recall`.

    Returns:
        `BestNeurons` of `(q,)` tensors (on the activations' device), in query order. Queries that share a feature
        and a target count t share the work.
    """
    acts = _check_acts(acts)
    n, d = acts.shape
    device = acts.device
    features, is_labels, n_features = _check_features(features, n, n_features)
    features = features.to(device)
    chunk_elements = _chunk(chunk_elements)
    qf = torch.as_tensor(query_features)
    if qf.dtype == torch.bool or qf.is_floating_point() or qf.dim() != 1:
        raise ValueError(f"query_features must be a 1-D integer sequence of feature ids, got {qf.dtype} {tuple(qf.shape)}.")
    qf = qf.long().cpu()
    qr = _check_recalls(query_recalls)
    if qr.numel() != qf.numel():
        raise ValueError(f"query_features has {qf.numel()} entries but query_recalls has {qr.numel()}; give one recall per query.")
    if qf.numel() and (int(qf.min()) < 0 or int(qf.max()) >= n_features):
        raise ValueError(f"query_features must lie in [0, n_features={n_features}), got {int(qf.min())}..{int(qf.max())}.")
    q = qf.numel()
    precision = torch.zeros(q, dtype=torch.float64)
    best = torch.full((q,), -1.0, dtype=torch.float64)  # running best; every real candidate has precision > 0
    neuron = torch.full((q,), -1, dtype=torch.long)
    sign = torch.zeros(q, dtype=torch.long)
    threshold = torch.full((q,), math.inf, dtype=torch.float64)
    recall = torch.zeros(q, dtype=torch.float64)
    # Per feature: its positions, the distinct targets t of its queries and which query maps to which target.
    plan = []
    for f in qf.unique().tolist():
        rows = (qf == f).nonzero().flatten()
        idx = _feature_positions(features, is_labels, f)
        if idx.numel() == 0:
            continue
        t = recall_targets(qr[rows], idx.numel())
        targets, inverse = t.unique(return_inverse=True)
        plan.append((rows, idx, targets.to(device), inverse))
    signs = (False, True) if both_signs else (False,)
    if plan and q:
        for j0, block, all_sorted in _neuron_blocks(acts, chunk_elements):
            for rows, idx, targets, inverse in plan:
                pos_sorted = block[:, idx].sort(dim=1).values
                stats = [_block_stats(pos_sorted, all_sorted, targets, below) for below in signs]
                # Candidates interleaved neuron-major (j from above, j from below, j+1 ...) so that argmax, which
                # returns the first maximum, breaks ties by the lowest neuron, then from above.
                theta, tp, fires = (torch.stack([s[i] for s in stats], dim=1).flatten(0, 1) for i in range(3))
                prec = tp.double() / fires.double()  # (candidates, targets)
                top, arg = prec.max(dim=0)
                top, arg = top.cpu()[inverse], arg.cpu()[inverse]
                better = top > best[rows]
                if not bool(better.any()):
                    continue
                upd = rows[better]
                a = arg[better]
                best[upd] = top[better]
                neuron[upd] = j0 + a // len(signs)
                sign[upd] = torch.where(a % len(signs) == 0, 1, -1)
                t_index = inverse[better]
                threshold[upd] = theta.cpu().double()[a, t_index]
                recall[upd] = tp.cpu().double()[a, t_index] / idx.numel()
    found = neuron >= 0
    precision[found] = best[found]
    out = BestNeurons(precision, neuron, sign, threshold, recall)
    return BestNeurons(*(x.to(device) for x in out))


def add_neuron_precision(
    table: pd.DataFrame,
    neuron_sets: Mapping[str, Float[Tensor, "n_positions n_neurons"]],
    features: Features,
    *,
    n_features: Optional[int] = None,
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
        raise TypeError("neuron_sets must be a non-empty mapping from a set name to activations (n_positions, n_neurons).")
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
                acts, features, torch.from_numpy(feat[ask]), torch.from_numpy(np.minimum(rec[ask], 1.0)),
                n_features=n_features, both_signs=both_signs, chunk_elements=chunk_elements,
            )
            prec[ask] = res.precision.cpu().numpy()
            best[ask] = res.neuron.cpu().numpy()
            sgn[ask] = res.sign.cpu().numpy()
        out[f"neuron_precision_{set_name}"] = prec
        out[f"neuron_{set_name}"] = best
        if both_signs:
            out[f"neuron_sign_{set_name}"] = sgn
    return out
