"""Codes versus neurons as regex-feature classifiers, chosen on one cache and scored on another.

`probe` finds the best code of each feature and scores it on the same tokens, so its precision is an in-sample
maximum: with thousands of codes, one that fires a few times on the feature looks perfect by chance. Here the
paper's feature-first search runs on cache A (`choose`): every code of every codebook (and head) is a classifier
of the feature; among codes with recall > `min_recall` (the paper: 1%) and at least `min_fires` firings the most
precise is chosen (ties: recall, F1, then codebook, head, code). The best neuron is chosen on A too, at the chosen
code's recall on A: for every neuron set (hooks whose activations the caches store), the neuron and threshold of
`best_neuron_precision_batch` (read from above, as the paper), and overall the set whose neuron is most precise
on A. Both are then fixed classifiers — a code id, a (hook, unit, threshold) — and are scored on cache B
(`score`): precision and recall on B are held-out numbers for both. Also reported: the neuron's precision on B at
the code's recall on B (the neuron chosen on A, its threshold re-set on B), and the in-sample numbers on A.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cbinterp.codecache.features import VocabularyLike, token_positions
from cbinterp.core.codebooks.heads import HEAD_DTYPE, check_head, is_missing_head
from cbinterp.metrics.classifiers import best_neuron_precision_batch, neuron_precision_at_recall
from cbinterp.metrics.probes import _check_ranking, _ranked, _scored
from cbinterp.metrics.tables import code_feature_table

__all__ = ["HELDOUT_COLUMNS", "code_fires_in", "default_neuron_sets", "probe_heldout"]

#: Columns about the code, before the neuron columns.
HELDOUT_COLUMNS = [
    "feature_name",
    "codebook",
    "head",
    "code",
    "n_feature_a",
    "n_feature_b",
    "n_fires_a",
    "precision_a",
    "recall_a",
    "n_fires_b",
    "precision_b",
    "recall_b",
]


def default_neuron_sets(hooks: Sequence[str]) -> dict[str, list[str]]:
    """Neuron sets by kind of hook.

    "mlp_hidden" (`*.mlp.hook_post`), "codebook_input" (`*.hook_input`, a codebook's activation before quantization),
    and one set per any other hook under its own name."""
    sets: dict[str, list[str]] = {}
    for hook in hooks:
        if hook.endswith("mlp.hook_post"):
            key = "mlp_hidden"
        elif hook.endswith(".hook_input"):
            key = "codebook_input"
        else:
            key = hook
        sets.setdefault(key, []).append(hook)
    return sets


def code_fires_in(cache, codebook: str, code: int, head: int | None = None) -> Tensor:
    """Bool `(n_tokens,)`: where `code` is among the ids of `codebook` (in `head`).

    Of its `head` for a per-head codebook (any head when `head` is None or missing), of the whole codebook for one
    without heads (`head` None or missing, as in the tables; 0 is accepted as its only group, see
    `cbinterp.core.codebooks.heads`)."""
    codes = cache.codes(codebook)
    head = check_head(head, codebook, codes.shape[1] if codes.dim() == 3 else None)
    if head is not None:
        codes = codes[:, head]
    return (codes == int(code)).reshape(codes.shape[0], -1).any(-1)


def _masks(cache, features, token_strings, which) -> dict[str, Tensor]:
    return {name: token_positions(cache, token_strings, pattern, which=which) for name, pattern in features.items()}


def _rate(num: int, den: int) -> float:
    return num / den if den else 0.0


def probe_heldout(
    choose,
    score,
    features: Mapping[str, str | re.Pattern],
    token_strings: VocabularyLike,
    *,
    which: str = "any",
    rank_by: str = "precision",
    min_recall: float = 0.01,
    min_fires: int = 1,
    neuron_sets: Mapping[str, Sequence[str]] | None = None,
    neurons: bool = True,
) -> pd.DataFrame:
    """For each feature, the best code and the best neuron chosen on `choose` (cache A), scored on `score` (B).

    Args:
        choose, score: `CodeCache`s of the same model (same codebooks and stored hooks) over disjoint text.
        features: name -> regex over decoded text (`token_positions`).
        token_strings: how token ids read as text (a tokenizer, `Vocabulary` or per-id strings).
        which, rank_by, min_recall, min_fires: as in `probe` (the paper: precision, recall > 1%).
        neuron_sets: set name -> hook names whose activations both caches store; default `default_neuron_sets`
            of the stored hooks. `neurons=False` skips neurons.

    Returns:
        One row per feature matched on A, with `HELDOUT_COLUMNS` (the code; `*_a` in-sample on A, `*_b` held out
        on B; `head` is `Int64`, `pd.NA` for a code of a codebook without heads, such as an MLP codebook) and, per
        neuron set `s` and for `s = "best"` (the set whose neuron is most precise on A): `neuron_<s>_hook`,
        `neuron_<s>_unit`, `neuron_<s>_threshold`, `neuron_<s>_precision_a` (at the code's recall on A),
        `neuron_<s>_precision_b`, `neuron_<s>_recall_b` (A's threshold applied on B) and
        `neuron_<s>_precision_b_at_code_recall` (threshold re-set on B to reach the code's recall on B).
        A feature with no code passing the floors on A gets codebook "", head `pd.NA`, code -1 and zeros.
        Features matching nothing on A are warned about and dropped.
    """
    min_recall, min_fires = _check_ranking(rank_by, min_recall, min_fires)
    if list(choose.codebook_names) != list(score.codebook_names):
        raise ValueError(f"The caches hold different codebooks: {choose.codebook_names} vs {score.codebook_names}.")
    if not neurons:
        sets: dict[str, list[str]] = {}
    elif neuron_sets is None:
        sets = default_neuron_sets(choose.hook_names)
    else:
        sets = {str(k): list(v) for k, v in neuron_sets.items()}
    for hooks in sets.values():
        for hook in hooks:
            for cache, which_cache in ((choose, "choose"), (score, "score")):
                if hook not in cache.hook_names:
                    raise ValueError(f"Hook {hook!r} is not stored in the {which_cache} cache ({cache.hook_names}).")
    masks_a = _masks(choose, features, token_strings, which)
    masks_b = _masks(score, features, token_strings, which)
    names = []
    for name, mask in masks_a.items():
        if not bool(mask.any()):
            warnings.warn(f"Feature {name!r} matches no token of the choose cache; dropped.", stacklevel=2)
            continue
        names.append(name)
    columns = list(HELDOUT_COLUMNS)
    for s in [*sets, "best"] if sets else []:
        columns += [
            f"neuron_{s}_hook",
            f"neuron_{s}_unit",
            f"neuron_{s}_threshold",
            f"neuron_{s}_precision_a",
            f"neuron_{s}_precision_b",
            f"neuron_{s}_recall_b",
            f"neuron_{s}_precision_b_at_code_recall",
        ]
    if not names:
        return pd.DataFrame(columns=columns).astype({"head": HEAD_DTYPE})
    feat_a = torch.stack([masks_a[n] for n in names], dim=1)
    feat_b = torch.stack([masks_b[n] for n in names], dim=1)
    codes_a = {name: choose.codes(name) for name in choose.codebook_names}
    n_codes = {name: choose.n_codes(name) for name in choose.codebook_names}
    table = code_feature_table(codes_a, feat_a, n_codes, feature_names=names, features_per_code=None)
    ranked = _ranked(_scored(table, min_recall, min_fires), rank_by, first=("feature",))
    best = ranked.drop_duplicates("feature", keep="first").set_index("feature")
    rows = []
    for f, name in enumerate(names):
        n_a, n_b = int(feat_a[:, f].sum()), int(feat_b[:, f].sum())
        row = {"feature_name": name, "n_feature_a": n_a, "n_feature_b": n_b}
        if f in best.index:
            pick = best.loc[f]
            head = None if is_missing_head(pick["head"]) else int(pick["head"])
            fires_b = code_fires_in(score, pick["codebook"], int(pick["code"]), head)
            tp_b = int((fires_b & feat_b[:, f]).sum())
            row.update(
                codebook=pick["codebook"],
                head=pd.NA if head is None else head,
                code=int(pick["code"]),
                n_fires_a=int(pick["n_fires"]),
                precision_a=float(pick["precision"]),
                recall_a=float(pick["recall"]),
                n_fires_b=int(fires_b.sum()),
                precision_b=_rate(tp_b, int(fires_b.sum())),
                recall_b=_rate(tp_b, n_b),
            )
        else:
            row.update(codebook="", head=pd.NA, code=-1, n_fires_a=0, precision_a=0.0, recall_a=0.0, n_fires_b=0)
            row.update(precision_b=0.0, recall_b=0.0)
        rows.append(row)
    out = pd.DataFrame(rows).astype({"head": HEAD_DTYPE})
    if sets:
        _add_neurons(out, sets, choose, score, feat_a, feat_b)
    return out[columns].reset_index(drop=True)


def _add_neurons(out: pd.DataFrame, sets, choose, score, feat_a: Tensor, feat_b: Tensor) -> None:
    """Fill the neuron columns of `out` in place, one stored hook at a time (bounded memory)."""
    n_rows = len(out)
    asked = np.flatnonzero(out["code"].to_numpy() >= 0)
    recall_a = torch.from_numpy(np.minimum(out["recall_a"].to_numpy(dtype=np.float64), 1.0))
    results = {}
    for set_name, hooks in sets.items():
        prec = np.zeros(n_rows)
        hook_of = np.array([""] * n_rows, dtype=object)
        unit = np.full(n_rows, -1, dtype=np.int64)
        theta = np.full(n_rows, np.inf)
        for hook in hooks:
            if not len(asked):
                break
            acts = choose.activations(hook).reshape(choose.n_tokens, -1).float()
            res = best_neuron_precision_batch(acts, feat_a, torch.from_numpy(asked), recall_a[asked])
            del acts
            p = res.precision.cpu().numpy()
            better = (p > prec[asked]) & (res.neuron.cpu().numpy() >= 0)
            idx = asked[better]
            prec[idx] = p[better]
            hook_of[idx] = hook
            unit[idx] = res.neuron.cpu().numpy()[better]
            theta[idx] = res.threshold.cpu().numpy()[better]
        results[set_name] = (prec, hook_of, unit, theta)
    # the best set per row: the most precise neuron on A (ties: the first set)
    stacked = np.stack([results[s][0] for s in sets])
    pick = stacked.argmax(axis=0)
    names = list(sets)
    results["best"] = tuple(
        np.array([results[names[pick[i]]][j][i] for i in range(n_rows)], dtype=results[names[0]][j].dtype)
        for j in range(4)
    )
    recall_b = out["recall_b"].to_numpy(dtype=np.float64)
    for set_name, (prec, hook_of, unit, theta) in results.items():
        p_b = np.zeros(n_rows)
        r_b = np.zeros(n_rows)
        p_same = np.zeros(n_rows)
        for hook in sorted({h for h in hook_of if h}):
            rows = np.flatnonzero(hook_of == hook)
            acts = score.activations(hook).reshape(score.n_tokens, -1)
            for i in rows:
                a = acts[:, int(unit[i])].float()
                fires = a >= float(theta[i])
                f = feat_b[:, int(i)]
                tp = int((fires & f).sum())
                p_b[i] = _rate(tp, int(fires.sum()))
                r_b[i] = _rate(tp, int(f.sum()))
                if recall_b[i] > 0:
                    stats = neuron_precision_at_recall(a[:, None], f, [min(float(recall_b[i]), 1.0)])
                    p_same[i] = float(stats.precision[0, 0])
        out[f"neuron_{set_name}_hook"] = hook_of
        out[f"neuron_{set_name}_unit"] = unit
        out[f"neuron_{set_name}_threshold"] = theta
        out[f"neuron_{set_name}_precision_a"] = prec
        out[f"neuron_{set_name}_precision_b"] = p_b
        out[f"neuron_{set_name}_recall_b"] = r_b
        out[f"neuron_{set_name}_precision_b_at_code_recall"] = p_same
