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
from collections.abc import Sequence
from typing import NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from cbinterp.core.codebooks.codes import dedupe_codes
from cbinterp.metrics._checks import (
    Features,
    _as_int,
    _check_acts,
    _check_codes,
    _check_features,
    _chunk,
    _feature_positions,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "BestNeurons",
    "CodeFeatureCounts",
    "NeuronRecallStats",
    "best_neuron_precision_at_recall",
    "best_neuron_precision_batch",
    "code_feature_counts",
    "neuron_precision_at_recall",
    "recall_targets",
]

#: Working blocks hold about this many elements (positions x neurons, or (position, feature) pairs x k).
DEFAULT_CHUNK_ELEMENTS = 1 << 23
_RECALL_RTOL = 1e-9


# ------------------------------------------------------------------------------------------------------------
# codes as classifiers
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CodeFeatureCounts:
    """Co-occurrence counts of one codebook's codes (or one head's) with a set of features."""

    tp: Int[Tensor, "n_codes n_features"]  # positions where the code fires and the feature holds
    code_counts: Int[Tensor, " n_codes"]  # positions where the code fires
    feature_counts: Int[Tensor, " n_features"]  # positions where the feature holds
    n_positions: int

    @property
    def n_codes(self) -> int:
        """The number of codes (rows of the counts)."""
        return self.tp.shape[0]

    @property
    def n_features(self) -> int:
        """The number of features (columns of the counts)."""
        return self.tp.shape[1]

    def precision(self) -> Float[Tensor, "n_codes n_features"]:
        """Precision, `tp / code_counts` as float64; 0.0 for codes that never fire."""
        return self.tp.double() / self.code_counts.clamp_min(1).double().unsqueeze(1)

    def recall(self) -> Float[Tensor, "n_codes n_features"]:
        """Recall, `tp / feature_counts` as float64; 0.0 for features with no positions."""
        return self.tp.double() / self.feature_counts.clamp_min(1).double().unsqueeze(0)


def code_feature_counts(
    codes: Int[Tensor, "n_tokens k"],
    features: Features,
    n_codes: int,
    *,
    n_features: int | None = None,
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
    codes = dedupe_codes(codes)
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


# ------------------------------------------------------------------------------------------------------------
# neurons as classifiers
# ------------------------------------------------------------------------------------------------------------
class NeuronRecallStats(NamedTuple):
    """Every neuron thresholded at each requested recall, for one feature."""

    precision: Float[Tensor, "recalls n_neurons"]  # float64, tp / n_fires (0.0 for an empty feature)
    threshold: Float[Tensor, "recalls n_neurons"]  # +inf (-inf from below) for an empty feature
    tp: Int[Tensor, "recalls n_neurons"]  # feature positions at which the neuron fires (>= t because of ties)
    n_fires: Int[Tensor, "recalls n_neurons"]  # all positions at which the neuron fires


class BestNeurons(NamedTuple):
    """The most precise neuron per query; neuron -1 (precision 0.0, sign 0) where the feature has no positions."""

    precision: Float[Tensor, " queries"]  # float64
    neuron: Int[Tensor, " queries"]
    sign: Int[Tensor, " queries"]  # +1: fires at act >= threshold, -1: fires at act <= threshold, 0: no neuron
    threshold: Float[Tensor, " queries"]  # float64; +inf where neuron is -1
    recall: Float[Tensor, " queries"]  # float64, the recall actually achieved (ties can push it above the target)


def _check_recalls(recalls) -> Float[Tensor, " recalls"]:
    is_bool = recalls.dtype == torch.bool if isinstance(recalls, Tensor) else isinstance(recalls, bool)
    if is_bool or (isinstance(recalls, (list, tuple)) and any(isinstance(x, bool) for x in recalls)):
        raise TypeError(f"recalls must be floats in (0, 1], got bools {recalls!r}.")
    r = torch.as_tensor(recalls, dtype=torch.float64).cpu()  # float64 straight away: a float32 step rounds 1/3
    if r.dim() == 0:
        r = r.unsqueeze(0)
    if r.dim() != 1:
        raise ValueError(f"recalls must be a 1-D sequence of floats, got shape {tuple(r.shape)}.")
    if r.numel() and not bool(((r > 0) & (r <= 1)).all()):
        bad = r[~((r > 0) & (r <= 1))][0].item()
        raise ValueError(f"recalls must lie in (0, 1], got {bad}.")
    return r


def recall_targets(recalls, n_feature: int) -> Int[Tensor, " recalls"]:
    """The true positives each recall in `recalls` needs: `t = ceil(r * n_feature)`.

    Clamped to [1, n_feature] (0 when n_feature is 0), with a 1e-9 relative tolerance.
    """
    r = _check_recalls(recalls)
    if n_feature == 0:
        return torch.zeros_like(r, dtype=torch.long)
    t = torch.ceil(r * n_feature * (1 - _RECALL_RTOL)).long()
    return t.clamp(1, n_feature)


def _block_stats(pos_sorted: Tensor, all_sorted: Tensor, t: Tensor, from_below: bool):
    """The (threshold, tp, n_fires) of every neuron, each (neurons, m).

    From ascending per-neuron sorts of the feature's and all positions."""
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
    acts: Float[Tensor, "n_tokens n_neurons"],
    feature_mask: Bool[Tensor, " n_tokens"],
    recalls: Sequence[float] | Float[Tensor, " recalls"],
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
    acts: Float[Tensor, "n_tokens n_neurons"],
    feature_mask: Bool[Tensor, " n_tokens"],
    recalls: Sequence[float] | Float[Tensor, " recalls"],
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
        acts,
        mask.unsqueeze(1),
        torch.zeros(r.numel(), dtype=torch.long),
        r,
        both_signs=both_signs,
        chunk_elements=chunk_elements,
    )


def best_neuron_precision_batch(
    acts: Float[Tensor, "n_tokens n_neurons"],
    features: Features,
    query_features: Sequence[int] | Int[Tensor, " queries"],
    query_recalls: Sequence[float] | Float[Tensor, " queries"],
    *,
    n_features: int | None = None,
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
        raise ValueError(
            f"query_features must be a 1-D integer sequence of feature ids, got {qf.dtype} {tuple(qf.shape)}."
        )
    qf = qf.long().cpu()
    qr = _check_recalls(query_recalls)
    if qr.numel() != qf.numel():
        raise ValueError(
            f"query_features has {qf.numel()} entries but query_recalls has {qr.numel()}; give one recall per query."
        )
    if qf.numel() and (int(qf.min()) < 0 or int(qf.max()) >= n_features):
        raise ValueError(
            f"query_features must lie in [0, n_features={n_features}), got {int(qf.min())}..{int(qf.max())}."
        )
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
