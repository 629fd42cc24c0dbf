"""The FSM analysis: activations collected over fresh sequences, the per-code table and its summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cbinterp import attach_codebooks
from cbinterp.tasks.fsm import FSM
from cbinterp.tasks.fsm_analysis import (
    MLP_NEURONS,
    SITE_OUTPUTS,
    collect_fsm_activations,
    fsm_code_table,
    summarize_state_codes,
)
from cbinterp.viz.plots import code_vs_neuron_figure


@pytest.fixture
def fsm():
    return FSM.random(n_states=12, n_edges=3, base=4, seed=0)  # two digits per state


@pytest.fixture
def cb_model(make_tiny_model):
    return attach_codebooks(make_tiny_model(seed=0, d_vocab=5), sites=["attn", "mlp"], n_codes=16)


def test_collect_shapes_and_labels(cb_model, fsm):
    acts = collect_fsm_activations(cb_model, fsm, n_positions=300, seq_len=16, seed=3, batch_size=7, progress=False)
    n = acts.n_positions
    assert n >= 300 and n % 15 == 0  # whole sequences, BOS dropped
    data = fsm.sample(n // 15, 16, 3)
    assert torch.equal(acts.labels, fsm.feature_labels(data)[:, 1:].flatten())
    assert acts.codes["blocks.0.hook_mlp_out"].shape == (n, 1)
    assert acts.codes["blocks.1.attn.hook_z"].shape == (n, 4, 1)
    cfg = cb_model.cfg
    assert acts.neurons[MLP_NEURONS].shape == (n, cfg.n_layers * cfg.d_mlp)
    assert acts.neurons[SITE_OUTPUTS].shape == (n, 2 * cfg.n_layers * cfg.d_model)  # attn z (heads x d_head) + mlp out
    # The codes are the model's own: the same as running it directly on the same tokens.
    _, cache = cb_model.run_with_cache(data.tokens[:2])
    direct = cache["blocks.1.hook_mlp_out.hook_codes"][:, 1:].flatten(0, 1)
    assert torch.equal(acts.codes["blocks.1.hook_mlp_out"][: direct.shape[0]], direct)


def test_collect_needs_codebooks(make_tiny_model, fsm):
    with pytest.raises(ValueError, match="no codebooks"):
        collect_fsm_activations(make_tiny_model(d_vocab=5), fsm, n_positions=10, seq_len=8, progress=False)


def test_code_table_rows(cb_model, fsm):
    acts = collect_fsm_activations(cb_model, fsm, n_positions=2000, seq_len=16, progress=False)
    table = fsm_code_table(cb_model, fsm, acts, min_fires=5)
    assert len(table) and (table["n_fires"] >= 5).all() and (table["feature"] >= 0).all()
    assert np.allclose(table["precision"], table["tp"] / table["n_fires"])
    assert ((table["feature"] < fsm.n_states) == (table["kind"] == "state")).all()
    assert set(table["site"]) == {"attn", "mlp"}
    assert set(table.loc[table["site"] == "attn", "head"]) <= {0, 1, 2, 3}
    for column in (f"neuron_precision_{MLP_NEURONS}", f"neuron_precision_{SITE_OUTPUTS}"):
        state = table["kind"] == "state"
        assert table.loc[state, column].between(0, 1).all()
        assert table.loc[~state, column].isna().all()  # not measured
    # Brute force for one code: its best feature's precision over the raw codes and labels.
    row = table[table["codebook"] == "blocks.1.hook_mlp_out"].iloc[0]
    fires = acts.codes["blocks.1.hook_mlp_out"][:, 0] == row["code"]
    counts = torch.bincount(acts.labels[fires & (acts.labels >= 0)], minlength=fsm.n_features())
    assert row["tp"] == counts.max() and row["n_fires"] == fires.sum()
    with pytest.raises(ValueError, match="neuron_kinds"):
        fsm_code_table(cb_model, fsm, acts, neuron_kinds=("states",))


def test_summary_counts_states_with_own_code(fsm):
    table = pd.DataFrame(
        {
            "codebook": ["m"] * 5,
            "layer": [0] * 5,
            "site": ["mlp"] * 5,
            "head": [0] * 5,
            "feature": [1, 1, 2, 3, 40],
            "precision": [0.95, 0.5, 0.9, 0.89, 1.0],
            "kind": ["state", "state", "state", "state", "state+digit"],
            "neuron_precision_x": [0.5, 0.25, 0.75, 0.5, np.nan],
        }
    )
    row = summarize_state_codes(table, fsm).iloc[0]
    assert row["states_with_own_code"] == 2  # states 1 and 2; state 3's best code is below 0.9
    assert row["state_codes"] == 4 and row["state_plus_digit_codes"] == 1
    assert row["state_code_precision_mean"] == pytest.approx((0.95 + 0.5 + 0.9 + 0.89) / 4)
    assert row["state_code_precision_median"] == pytest.approx((0.9 + 0.89) / 2)
    assert row["x_precision_mean"] == pytest.approx(0.5)
    figure = code_vs_neuron_figure(table, summarize_state_codes(table, fsm))
    assert len(figure.data) == 4  # codes and one neuron set, as bars and as boxes


def test_frequency_and_precision_recall_figures(make_tiny_model):
    from cbinterp import cache_codes
    from cbinterp.viz.plots import code_frequency_figure, precision_recall_figure

    model = attach_codebooks(make_tiny_model(seed=0, d_vocab=5), ["mlp"], n_codes=8, layers=[0])
    cache = cache_codes(model, torch.randint(0, 5, (4, 8), generator=torch.Generator().manual_seed(0)), progress=False)
    figure = code_frequency_figure(cache, "blocks.0.hook_mlp_out")
    counts = list(figure.data[0].y)
    assert counts == sorted(counts, reverse=True) and sum(counts) == 32
    table = pd.DataFrame(
        {
            "codebook": ["m", "m", "n"],
            "code": [1, 2, 3],
            "feature": ["a", "b", "a"],
            "precision": [0.5, 1.0, 0.25],
            "recall": [0.1, 0.2, 0.3],
        }
    )
    pr = precision_recall_figure(table)
    assert [trace.name for trace in pr.data] == ["a", "b"] and list(pr.data[0].y) == [0.5, 0.25]
