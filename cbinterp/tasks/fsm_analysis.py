"""The paper's FSM analysis: which codes classify which machine states, and how the best neurons compare."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from cbinterp.codecache.store import cache_codes
from cbinterp.core.codebooks.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.codebooks.heads import head_column
from cbinterp.core.codebooks.naming import INPUT_SUFFIX
from cbinterp.core.tl_compat import Model
from cbinterp.metrics import add_neuron_precision, code_feature_table
from cbinterp.metrics.classifiers import best_neuron_precision_batch, code_feature_counts
from cbinterp.tasks.fsm import FSM

__all__ = [
    "FSMActivations",
    "MLP_NEURONS",
    "PooledCodes",
    "SITE_OUTPUTS",
    "collect_fsm_activations",
    "feature_first_search",
    "fsm_code_table",
    "neurons_at_code_recall",
    "pool_codes",
    "previous_state_split",
    "state_code_headline",
    "state_code_report",
    "summarize_state_codes",
]

#: Names of the two neuron sets compared with codes (the columns `neuron_precision_<set>` of the table).
MLP_NEURONS = "mlp_neurons"
SITE_OUTPUTS = "site_outputs"


@dataclasses.dataclass
class FSMActivations:
    """Everything the classifier analysis needs, over the same flattened positions (BOS dropped)."""

    labels: Int[Tensor, " n_tokens"]  # `FSM.feature_labels` id per position, -1 for none
    codes: dict[str, Tensor]  # codebook name -> (n, k) or (n, heads, k) code ids
    neurons: dict[str, Float[Tensor, "n_tokens _n_neurons"]]  # neuron set name -> activations (sets differ in width)
    previous: Int[Tensor, " n_tokens"] | None = None  # at a state's last digit, the state before it (-1: the start)
    doc: Int[Tensor, " n_tokens"] | None = None  # the sequence each position comes from

    @property
    def n_positions(self) -> int:
        """The number of labelled positions."""
        return int(self.labels.shape[0])

    def halves(self) -> tuple[Tensor, Tensor]:
        """(select, score): bool masks splitting the positions by sequence (even / odd sequence index).

        So that codes and neurons chosen on one half are scored on positions of other sequences."""
        if self.doc is None:
            raise ValueError(
                "These activations carry no sequence ids (doc); collect them with collect_fsm_activations."
            )
        even = self.doc % 2 == 0
        return even, ~even


@torch.no_grad()
def collect_fsm_activations(
    model: Model,
    fsm: FSM,
    n_positions: int = 200_000,
    seq_len: int = 64,
    seed: int = 2024,
    batch_size: int = 256,
    progress: bool = True,
    neurons: bool = True,
) -> FSMActivations:
    """Run `model` over fresh FSM sequences through `cache_codes`, all on the CPU.

    At least `n_positions` positions after BOS. Keeps its codes and (with `neurons`, as float32) its MLP hidden
    neurons (`blocks.{l}.mlp.hook_post`, all layers) and every codebook's input (each attention and MLP output before
    quantization)."""
    require_hooked_transformer(model)
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks; attach_codebooks(model, ...) and train it first.")
    n_sequences = -(-n_positions // (seq_len - 1))
    data = fsm.sample(n_sequences, seq_len, seed)
    input_names = [name + INPUT_SUFFIX for name in codebooks]
    post_names = [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]
    hooks = input_names + post_names if neurons else []
    cache = cache_codes(
        model, data.tokens, batch_size=batch_size, hooks=hooks, progress=progress, activation_dtype=torch.float32
    )
    keep = cache.pos > 0  # BOS carries no feature
    codes = {name: cache.codes(name)[keep] for name in codebooks}
    neuron_sets = {}
    if neurons:
        neuron_sets = {
            MLP_NEURONS: torch.cat([cache.activations(n)[keep] for n in post_names], dim=1),
            SITE_OUTPUTS: torch.cat([cache.activations(n)[keep].flatten(1) for n in input_names], dim=1),
        }
    # The state before each state: the last complete state at the first digit of the state (digits - 1 earlier).
    before = data.prev_state.roll(fsm.digits - 1, dims=1)
    previous = torch.where(data.state_at >= 0, before, -1)[:, 1:]
    doc = torch.arange(n_sequences).unsqueeze(1).expand(n_sequences, seq_len - 1)
    return FSMActivations(
        labels=fsm.feature_labels(data)[:, 1:].flatten(),
        codes=codes,
        neurons=neuron_sets,
        previous=previous.flatten(),
        doc=doc.flatten(),
    )


def fsm_code_table(
    model: Model,
    fsm: FSM,
    acts: FSMActivations,
    min_fires: int = 20,
    neuron_kinds: Sequence[str] = ("state",),
) -> pd.DataFrame:
    """Each code's best FSM feature by precision, with the best neuron's precision at the code's recall.

    Codes firing at least `min_fires` times; the neuron's precision for both neuron sets, on the rows whose feature
    is of a kind in `neuron_kinds`.

    Adds the columns `layer`, `site` ("attn" or "mlp" or the hook name), and `kind` ("state" or "state+digit").
    The neuron columns are NaN ("not measured") on rows of other kinds: the search costs time per feature, and
    the paper compares neurons with the state codes. Pass `neuron_kinds=("state", "state+digit")` for all.
    """
    codebooks = get_codebooks(model)
    table = code_feature_table(
        acts.codes,
        acts.labels,
        {name: cb.n_codes for name, cb in codebooks.items()},
        n_features=fsm.n_features(),
        feature_names=fsm.feature_names(),
        features_per_code=1,
    )
    table = table[(table["n_fires"] >= min_fires) & (table["feature"] >= 0)].reset_index(drop=True)
    table.insert(1, "layer", [_layer_of(name) for name in table["codebook"]])
    table.insert(2, "site", [_site_of(name) for name in table["codebook"]])
    table["kind"] = np.where(table["feature"].to_numpy() < fsm.n_states, "state", "state+digit")
    unknown = set(neuron_kinds) - {"state", "state+digit"}
    if unknown:
        raise ValueError(f"Unknown neuron_kinds {sorted(unknown)}; use 'state' and/or 'state+digit'.")
    measured = table["kind"].isin(list(neuron_kinds)).to_numpy()
    if measured.any():
        with_neurons = add_neuron_precision(table[measured], acts.neurons, acts.labels, n_features=fsm.n_features())
        for column in with_neurons.columns.difference(table.columns):
            values = np.full(len(table), np.nan)
            values[measured] = with_neurons[column].to_numpy()
            table[column] = values
    return table


def summarize_state_codes(table: pd.DataFrame, fsm: FSM, own_code_precision: float = 0.9) -> pd.DataFrame:
    """Per codebook (and head): how many states have a code of their own, and how precise those codes are.

    The precision of the state codes beside the best neurons' at the same recall (mean and median). One row per
    (codebook, head) of `table`, in table order; `head` is `Int64`, `pd.NA` for a codebook without heads (an MLP
    codebook)."""
    rows = []
    neuron_columns = [c for c in table.columns if c.startswith("neuron_precision_")]
    for (name, head), group in table.groupby(["codebook", "head"], sort=False, dropna=False):
        states = group[group["kind"] == "state"]
        own = states.loc[states["precision"] >= own_code_precision, "feature"].nunique()
        row = {
            "codebook": name,
            "layer": group["layer"].iloc[0],
            "site": group["site"].iloc[0],
            "head": head,
            "codes_used": len(group),
            "state_codes": len(states),
            "state_plus_digit_codes": int((group["kind"] == "state+digit").sum()),
            "states_with_own_code": int(own),
            "state_code_precision_mean": _stat(states["precision"], np.mean),
            "state_code_precision_median": _stat(states["precision"], np.median),
        }
        for column in neuron_columns:
            short = column.removeprefix("neuron_precision_")
            row[f"{short}_precision_mean"] = _stat(states[column], np.mean)
            row[f"{short}_precision_median"] = _stat(states[column], np.median)
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["head"] = head_column(out["head"])
    return out


def _stat(values: pd.Series, fn) -> float:
    return float(fn(values.to_numpy())) if len(values) else 0.0


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else -1


def _site_of(name: str) -> str:
    if name.endswith("attn.hook_z"):
        return "attn"
    if name.endswith("hook_mlp_out"):
        return "mlp"
    return name


# ------------------------------------------------------------------------------------------------------------
# the paper's feature-first search, chosen on one half of the positions and scored on the other
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PooledCodes:
    """The codes of several codebooks (heads counted apart) as one pool: pool index -> (codebook, head, code).

    head is None for a codebook without heads (an MLP codebook)."""

    codes: Int[Tensor, "n_tokens slots"]  # per position, the pool ids of the codes firing there (-1 = none)
    names: list[tuple[str, int | None, int]]


def pool_codes(codes: dict[str, Tensor], n_codes: dict[str, int], names: Sequence[str]) -> PooledCodes:
    """Pool the codes of codebooks `names`: each (codebook, head, code) gets its own id."""
    columns, labels, offset = [], [], 0
    for name in names:
        c = codes[name]
        heads = [(None, c)] if c.dim() == 2 else list(enumerate(c.unbind(1)))  # (n, k) per head
        for head, h in heads:
            columns.append(torch.where(h >= 0, h + offset, -1))
            labels += [(name, head, code) for code in range(n_codes[name])]
            offset += n_codes[name]
    return PooledCodes(torch.cat(columns, dim=1), labels)


def _counts(pool: PooledCodes, labels: Tensor, mask: Tensor, n_features: int):
    return code_feature_counts(pool.codes[mask], labels[mask], len(pool.names), n_features=n_features)


def feature_first_search(
    pool: PooledCodes,
    labels: Int[Tensor, " n_tokens"],
    features: Sequence[int],
    select: Tensor,
    score: Tensor,
    n_features: int,
    min_recall: float = 0.01,
    precise: float = 0.9,
) -> pd.DataFrame:
    """The paper's search, feature first: for each feature, its codes with recall > `min_recall` by precision.

    Chosen on the `select` positions and scored on the `score` positions.

    One row per feature with: `n_select`/`n_score` (its positions in each half); the best code by precision on
    `select` (`best_code`: pool id, -1 if no code passes the recall cut) with `best_precision`/`best_recall` on
    `score` (and `best_precision_select`); among codes with precision >= `precise` on `select`, the one of largest
    recall there (`precise_code`) with `precise_precision`/`precise_recall` on `score`; `n_codes_covering` (codes
    with recall > `min_recall` on `select`), `n_precise_codes` and `precise_union_recall` (the share of the
    feature's `score` positions where at least one of those precise codes fires).
    """
    sel = _counts(pool, labels, select, n_features)
    sco = _counts(pool, labels, score, n_features)
    p_sel, r_sel = sel.precision(), sel.recall()
    p_sco, r_sco = sco.precision(), sco.recall()
    score_idx = score.nonzero().flatten()
    rows = []
    for f in features:
        candidates = (r_sel[:, f] > min_recall).nonzero().flatten()
        row = {
            "feature": int(f),
            "n_select": int(sel.feature_counts[f]),
            "n_score": int(sco.feature_counts[f]),
            "n_codes_covering": int(candidates.numel()),
        }
        best = precise_code = -1
        if candidates.numel():
            # by precision on `select`, ties by recall there, then by the lowest id
            order = sorted(candidates.tolist(), key=lambda c: (-float(p_sel[c, f]), -float(r_sel[c, f]), c))
            best = order[0]
            good = [c for c in order if float(p_sel[c, f]) >= precise]
            if good:
                precise_code = max(good, key=lambda c: (float(r_sel[c, f]), -c))
            precise_set = torch.tensor(good, dtype=torch.long)
        else:
            precise_set = torch.zeros(0, dtype=torch.long)
        row |= {
            "best_code": best,
            "best_precision_select": float(p_sel[best, f]) if best >= 0 else 0.0,
            "best_precision": float(p_sco[best, f]) if best >= 0 else 0.0,
            "best_recall": float(r_sco[best, f]) if best >= 0 else 0.0,
            "precise_code": precise_code,
            "precise_precision": float(p_sco[precise_code, f]) if precise_code >= 0 else 0.0,
            "precise_recall": float(r_sco[precise_code, f]) if precise_code >= 0 else 0.0,
            "n_precise_codes": int(precise_set.numel()),
        }
        on = score_idx[labels[score_idx] == f]
        if precise_set.numel() and on.numel():
            fired = torch.isin(pool.codes[on], precise_set).any(1)
            row["precise_union_recall"] = float(fired.double().mean())
        else:
            row["precise_union_recall"] = 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def previous_state_split(
    pool: PooledCodes,
    labels: Tensor,
    previous: Tensor,
    table: pd.DataFrame,
    mask: Tensor,
    n_states: int,
    code_column: str = "precise_code",
) -> pd.DataFrame:
    """How much one previous state explains a state code's firing, on the `mask` positions.

    For each row (a state s and its code in `code_column`): `prev_share` is the largest share of the code's
    firing at s that one previous state r (the state before s; "start" counts as one) accounts for, and
    `prev_share_baseline` the same share among all positions of s (what a code blind to the previous state would
    show). A transition code (r -> s) has `prev_share` near 1.
    """
    idx = mask.nonzero().flatten()
    lab, prev, codes = labels[idx], previous[idx], pool.codes[idx]
    out = table.copy()
    shares, baselines, n_prev = [], [], []
    for s, code in zip(out["feature"].tolist(), out[code_column].tolist()):
        at_s = lab == s
        prev_s = prev[at_s].clamp_min(-1) + 1  # 0 = start
        counts = torch.bincount(prev_s, minlength=n_states + 1)
        baselines.append(float(counts.max() / counts.sum()) if counts.sum() else float("nan"))
        n_prev.append(int((counts > 0).sum()))
        if code < 0:
            shares.append(float("nan"))
            continue
        fires = (codes[at_s] == code).any(1)
        by_prev = torch.bincount(prev_s[fires], minlength=n_states + 1)
        shares.append(float(by_prev.max() / by_prev.sum()) if by_prev.sum() else float("nan"))
    out["prev_share"] = shares
    out["prev_share_baseline"] = baselines
    out["n_previous_states"] = n_prev
    return out


def neurons_at_code_recall(
    acts: Float[Tensor, "n_tokens n_neurons"],
    labels: Tensor,
    table: pd.DataFrame,
    select: Tensor,
    score: Tensor,
    n_features: int,
    code_column: str = "best_code",
    recall_column: str = "best_recall_select",
) -> tuple[np.ndarray, np.ndarray]:
    """For each row's feature, the neuron of best precision at the recall its code reaches.

    The neuron (read from above) is chosen with its threshold on `select`, then scored on `score`: returns
    (precision, recall) on `score` (NaN where the row has no code)."""
    prec = np.full(len(table), np.nan)
    rec = np.full(len(table), np.nan)
    has = (table[code_column] >= 0).to_numpy()
    if not has.any():
        return prec, rec
    feats = torch.as_tensor(table.loc[has, "feature"].to_numpy().copy())
    recalls = torch.as_tensor(table.loc[has, recall_column].to_numpy().copy()).clamp(1e-9, 1.0)
    best = best_neuron_precision_batch(acts[select], labels[select], feats, recalls, n_features=n_features)
    a_score, l_score = acts[score], labels[score]
    p_out, r_out = [], []
    for f, j, theta in zip(feats.tolist(), best.neuron.tolist(), best.threshold.tolist()):
        if j < 0:
            p_out.append(0.0)
            r_out.append(0.0)
            continue
        fires = a_score[:, j].double() >= theta
        on = l_score == f
        tp = int((fires & on).sum())
        p_out.append(tp / max(int(fires.sum()), 1))
        r_out.append(tp / max(int(on.sum()), 1))
    prec[has], rec[has] = p_out, r_out
    return prec, rec


def state_code_report(
    model: Model,
    fsm: FSM,
    acts: FSMActivations,
    codebooks: Sequence[str],
    features: str = "state",
    min_recall: float = 0.01,
    precise: float = 0.9,
    neurons: bool = True,
) -> pd.DataFrame:
    """The feature-first search over the pooled `codebooks` for every state feature or state-and-digits feature.

    Every "state" feature (`features="state"`) or every "state s > digits" feature that occurs (`"state+digit"`),
    chosen on one half of the sequences and scored on the other; for states also the previous-state split and (with
    `neurons`) the best neurons of each neuron set at the best code's recall, both chosen on the selection half.

    The best code is named by `best_codebook`, `best_head` (`Int64`: the head of a per-head codebook, `pd.NA` for
    a codebook without heads and for a feature without a code) and `best_code_id` (-1: no code)."""
    n_codes = {name: cb.n_codes for name, cb in get_codebooks(model).items()}
    pool = pool_codes(acts.codes, n_codes, codebooks)
    select, score = acts.halves()
    n_features = fsm.n_features()
    if features == "state":
        ids = list(range(fsm.n_states))
    elif features == "state+digit":  # those of real states (not "start") that occur on both halves
        present = torch.bincount(acts.labels[acts.labels >= 0], minlength=n_features)
        ids = [f for f in range(fsm.n_states, fsm.n_states + fsm.n_states * fsm.prefix_width) if present[f] > 0]
    else:
        raise ValueError(f"features must be 'state' or 'state+digit', got {features!r}.")
    table = feature_first_search(pool, acts.labels, ids, select, score, n_features, min_recall, precise)
    names = fsm.feature_names()
    table.insert(1, "name", [names[f] for f in table["feature"]])
    where = lambda c: pool.names[c] if c >= 0 else ("", None, -1)
    table["best_codebook"] = [where(c)[0] for c in table["best_code"]]
    table["best_head"] = head_column(where(c)[1] for c in table["best_code"])
    table["best_code_id"] = [where(c)[2] for c in table["best_code"]]
    if features == "state" and acts.previous is not None:
        table = previous_state_split(pool, acts.labels, acts.previous, table, score, fsm.n_states)
    if neurons and acts.neurons:
        sel_counts = _counts(pool, acts.labels, select, n_features)
        table["best_recall_select"] = [
            float(sel_counts.recall()[c, f]) if c >= 0 else 0.0 for c, f in zip(table["best_code"], table["feature"])
        ]
        for set_name, values in acts.neurons.items():
            p, r = neurons_at_code_recall(values, acts.labels, table, select, score, n_features)
            table[f"{set_name}_precision"], table[f"{set_name}_recall"] = p, r
    return table


def state_code_headline(table: pd.DataFrame, precise: float = 0.9, min_recall_own: float = 0.5) -> dict:
    """The headline figures of a `state_code_report` table.

    Mean precision and recall of each feature's best code, how many features have a code of precision >= `precise`
    and recall >= `min_recall_own` (chosen on one half, both measured on the other), and the neuron baselines' means."""
    own = (table["precise_precision"] >= precise) & (table["precise_recall"] >= min_recall_own)
    out = {
        "n_features": int(len(table)),
        "best_code_precision_mean": float(table["best_precision"].mean()),
        "best_code_recall_mean": float(table["best_recall"].mean()),
        "features_with_precise_code": int((table["n_precise_codes"] > 0).sum()),
        "features_with_own_code": int(own.sum()),
        "precise_codes_per_feature_mean": float(table["n_precise_codes"].mean()),
        "codes_covering_mean": float(table["n_codes_covering"].mean()),
        "largest_precise_recall_mean": float(table["precise_recall"].mean()),
        "precise_union_recall_mean": float(table["precise_union_recall"].mean()),
    }
    if "prev_share" in table:
        out["prev_share_mean"] = float(np.nanmean(table["prev_share"])) if table["prev_share"].notna().any() else None
        out["prev_share_baseline_mean"] = float(np.nanmean(table["prev_share_baseline"]))
    for column in table.columns:
        if column.endswith("_precision") and column.split("_precision")[0] in (MLP_NEURONS, SITE_OUTPUTS):
            out[f"{column}_mean"] = float(np.nanmean(table[column]))
            out[column.replace("_precision", "_recall") + "_mean"] = float(
                np.nanmean(table[column.replace("_precision", "_recall")])
            )
    return out
