"""Figures built from the analysis tables, with attention rows (a head) and MLP rows (no head)."""

from __future__ import annotations

import pandas as pd

from cbinterp.viz.plots import heldout_probe_figure


def heldout_table() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "feature_name": ["months", "years", "rare"],
            "codebook": ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"],
            "head": pd.array([pd.NA, 2, pd.NA], dtype="Int64"),
            "code": [7, 5, -1],
            "precision_b": [0.9, 0.6, 0.0],
            "recall_b": [0.4, 0.2, 0.0],
            "neuron_best_precision_b": [0.5, 0.3, 0.1],
            "neuron_best_recall_b": [0.4, 0.2, 0.0],
            "neuron_best_hook": ["blocks.0.hook_mlp_out"] * 3,
            "neuron_best_unit": [3, 4, 5],
        }
    )


def test_heldout_probe_figure_labels_codes_with_and_without_heads():
    fig = heldout_probe_figure(heldout_table())
    codes, neurons = fig.data
    assert list(codes.hovertext) == ["blocks.0.hook_mlp_out/c7", "blocks.1.attn.hook_z/h2/c5", "no code"]
    assert list(codes.y) == [0.9, 0.6, 0.0] and list(codes.text) == ["R 0.40", "R 0.20", "R 0.00"]
    assert list(neurons.y) == [0.5, 0.3, 0.1]


def test_heldout_probe_figure_of_an_empty_table_has_no_bars():
    assert len(heldout_probe_figure(heldout_table().iloc[:0]).data) == 0
