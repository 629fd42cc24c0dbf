"""The paper's FSM analysis: which codes classify which machine states, and how the best neurons compare."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from cbinterp.core.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.naming import INPUT_SUFFIX, codes_hook_name
from cbinterp.metrics import add_neuron_precision, code_feature_table
from cbinterp.tasks.fsm import FSM

#: Names of the two neuron sets compared with codes (the columns `neuron_precision_<set>` of the table).
MLP_NEURONS = "mlp_neurons"
SITE_OUTPUTS = "site_outputs"


@dataclasses.dataclass
class FSMActivations:
    """Everything the classifier analysis needs, over the same flattened positions (BOS dropped)."""

    labels: Int[Tensor, " n"]  # `FSM.feature_labels` id per position, -1 for none
    codes: dict[str, Tensor]  # codebook name -> (n, k) or (n, heads, k) code ids
    neurons: dict[str, Float[Tensor, "n d"]]  # neuron set name -> activations

    @property
    def n_positions(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def collect_fsm_activations(
    model: HookedTransformer,
    fsm: FSM,
    n_positions: int = 200_000,
    seq_len: int = 64,
    seed: int = 2024,
    batch_size: int = 256,
    progress: bool = True,
) -> FSMActivations:
    """Run `model` over fresh FSM sequences (at least `n_positions` positions after BOS) and keep its codes,
    its MLP hidden neurons (`blocks.{l}.mlp.hook_post`, all layers) and every codebook's input (each attention
    and MLP output before quantization), all on the CPU."""
    require_hooked_transformer(model)
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks; attach_codebooks(model, ...) and train it first.")
    device = next(model.parameters()).device
    n_sequences = -(-n_positions // (seq_len - 1))
    data = fsm.sample(n_sequences, seq_len, seed)
    labels = fsm.feature_labels(data)[:, 1:]
    code_names = [codes_hook_name(name) for name in codebooks]
    input_names = [name + INPUT_SUFFIX for name in codebooks]
    post_names = [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]
    wanted = set(code_names + input_names + post_names)
    parts: dict[str, list[Tensor]] = {name: [] for name in wanted}
    for start in tqdm(range(0, n_sequences, batch_size), desc="collect", disable=not progress):
        tokens = data.tokens[start : start + batch_size].to(device)
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in wanted)
        for name in wanted:
            parts[name].append(cache[name][:, 1:].flatten(0, 1).cpu())
    joined = {name: torch.cat(chunks) for name, chunks in parts.items()}
    codes = {name: joined[codes_hook_name(name)] for name in codebooks}
    neurons = {
        MLP_NEURONS: torch.cat([joined[n] for n in post_names], dim=1),
        SITE_OUTPUTS: torch.cat([joined[n].flatten(1) for n in input_names], dim=1),
    }
    return FSMActivations(labels=labels.flatten(), codes=codes, neurons=neurons)


def fsm_code_table(
    model: HookedTransformer,
    fsm: FSM,
    acts: FSMActivations,
    min_fires: int = 20,
    neuron_kinds: Sequence[str] = ("state",),
) -> pd.DataFrame:
    """Each code's best FSM feature by precision (codes firing at least `min_fires` times), with the best
    neuron's precision at the code's recall, for both neuron sets, on the rows whose feature is of a kind in
    `neuron_kinds`.

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
    """Per codebook (and head): how many states have a code of their own, and the precision of the state codes
    beside the best neurons' at the same recall (mean and median)."""
    rows = []
    neuron_columns = [c for c in table.columns if c.startswith("neuron_precision_")]
    for (name, head), group in table.groupby(["codebook", "head"], sort=False):
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
    return pd.DataFrame(rows)


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
