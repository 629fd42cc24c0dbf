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
    assert table["head"].dtype == "Int64"
    assert set(table.loc[table["site"] == "attn", "head"]) <= {0, 1, 2, 3}
    assert table.loc[table["site"] == "mlp", "head"].isna().all()  # MLP codebooks have no head (not 0)
    summary = summarize_state_codes(table, fsm)
    assert summary["head"].dtype == "Int64"
    mlp_rows = summary[summary["site"] == "mlp"]
    assert len(mlp_rows) == table.loc[table["site"] == "mlp", "codebook"].nunique()  # NA heads are not dropped
    assert mlp_rows["head"].isna().all() and summary.loc[summary["site"] == "attn", "head"].notna().all()
    labels = list(code_vs_neuron_figure(table, summary).data[0].x)
    assert all(" h" not in label for label, site in zip(labels, summary["site"]) if site == "mlp")
    assert all(label.endswith(f" h{h}") for label, h in zip(labels, summary["head"]) if not pd.isna(h))
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
            "head": pd.array([pd.NA] * 5, dtype="Int64"),
            "feature": [1, 1, 2, 3, 40],
            "precision": [0.95, 0.5, 0.9, 0.89, 1.0],
            "kind": ["state", "state", "state", "state", "state+digit"],
            "neuron_precision_x": [0.5, 0.25, 0.75, 0.5, np.nan],
        }
    )
    summary = summarize_state_codes(table, fsm)
    assert len(summary) == 1 and pd.isna(summary["head"].iloc[0])  # the group of an MLP codebook is kept
    row = summary.iloc[0]
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


# -- the paper's feature-first search on constructed data ---------------------------------------------------
from cbinterp.tasks.fsm_analysis import (  # noqa: E402
    feature_first_search,
    neurons_at_code_recall,
    pool_codes,
    previous_state_split,
    state_code_headline,
)


def _constructed():
    """Feature 0 on 40 positions of each half. Code 0 (codebook A) fires on all of them in the select half but
    also on 40 others (precision 0.5); code 1 (codebook B) fires on the first 10 only (precision 1.0 on select,
    but on the score half it also fires on 10 non-feature positions: 0.5). Code 2 (B) fires on positions 10..29 of
    the feature in both halves, precisely (recall 0.5). Code 3 (A) fires on one feature position only (recall
    1/40 = 2.5%) and nowhere else."""
    n_half = 200
    labels = torch.full((2 * n_half,), -1)
    a = torch.full((2 * n_half, 1), 5)  # codebook A: code 5 = background
    b = torch.full((2 * n_half, 1), 5)
    for half in (0, 1):
        base = half * n_half
        feat = torch.arange(base, base + 40)
        labels[feat] = 0
        a[feat, 0] = 0
        a[base + 100 : base + 140, 0] = 0  # 40 false fires
        b[feat[:10], 0] = 1
        b[feat[10:30], 0] = 2
        a[feat[39], 0] = 3
        if half == 1:
            b[base + 150 : base + 160, 0] = 1  # code 1 is not precise on the held-out half
    select = torch.arange(2 * n_half) < n_half
    return labels, {"A": a, "B": b}, select, ~select


def test_feature_first_search_chooses_on_one_half_and_scores_on_the_other():
    labels, codes, select, score = _constructed()
    pool = pool_codes(codes, {"A": 8, "B": 8}, ["A", "B"])
    assert pool.names[9] == ("B", None, 1) and pool.codes.shape == (400, 2)  # (n, k) codebooks: no head
    table = feature_first_search(pool, labels, [0], select, score, n_features=1)
    row = table.iloc[0]
    # Candidates with recall > 1%: A0 (p 39/79), A3 (p 1, r .025), B1 (p 1, r .25), B2 (p 1, r .5) and B's
    # background code 5 (r .25, imprecise); the best by precision on select, ties by recall there: B2.
    assert row["n_codes_covering"] == 5 and row["best_code"] == 8 + 2
    assert row["best_precision"] == 1.0 and row["best_recall"] == 0.5
    # The largest-recall code of precision >= 0.9 on select is also B2; B1 is precise on select only.
    assert row["precise_code"] == 10 and row["n_precise_codes"] == 3
    assert row["precise_union_recall"] == pytest.approx(31 / 40)  # B1, B2 and A3 together
    # Raise the recall cut above B2's: A0 is then the only candidate, and a poor one.
    strict = feature_first_search(pool, labels, [0], select, score, n_features=1, min_recall=0.6).iloc[0]
    assert strict["best_code"] == 0 and strict["best_precision"] == pytest.approx(39 / 79)
    assert strict["n_precise_codes"] == 0
    # B1 alone: precise on the selection half (1.0), scored on the held-out half it is 0.5.
    only_b1 = feature_first_search(pool, labels, [0], select, score, n_features=1, min_recall=0.2).iloc[0]
    assert only_b1["n_codes_covering"] == 4  # A0, B1, B2, B5
    only = {"B": torch.where(codes["B"] == 1, 1, 0)}  # B1, and one code for everything else
    b1 = feature_first_search(pool_codes(only, {"B": 2}, ["B"]), labels, [0], select, score, n_features=1).iloc[0]
    assert b1["best_code"] == 1 and b1["best_precision_select"] == 1.0 and b1["best_precision"] == 0.5


def test_feature_first_search_with_no_candidate():
    labels = torch.tensor([0, 0, -1, -1])
    codes = {"A": torch.tensor([[1], [1], [0], [0]])}
    pool = pool_codes(codes, {"A": 2}, ["A"])
    select = torch.tensor([True, False, True, False])
    row = feature_first_search(pool, labels, [0, 1], select, ~select, n_features=2).iloc[1]  # feature 1 never holds
    assert row["best_code"] == -1 and row["best_precision"] == 0.0 and row["n_codes_covering"] == 0


def test_previous_state_split_tells_transition_codes_from_state_codes():
    # State 3 at 20 positions: 10 after state 1, 10 after state 2. Code 0 fires only after 1 (a transition code),
    # code 1 on all 20 (a state code).
    labels = torch.full((40,), -1)
    labels[:20] = 3
    previous = torch.full((40,), -1)
    previous[:10], previous[10:20] = 1, 2
    codes = torch.full((40, 2), 7)
    codes[:10, 0] = 0
    codes[:20, 1] = 1
    pool = pool_codes({"A": codes[:, :1], "B": codes[:, 1:]}, {"A": 8, "B": 8}, ["A", "B"])
    table = pd.DataFrame({"feature": [3, 3, 3], "precise_code": [0, 8 + 1, -1]})
    out = previous_state_split(pool, labels, previous, table, torch.ones(40, dtype=torch.bool), n_states=5)
    assert out["prev_share"].iloc[0] == 1.0 and out["prev_share"].iloc[1] == 0.5 and np.isnan(out["prev_share"].iloc[2])
    assert (out["prev_share_baseline"] == 0.5).all() and (out["n_previous_states"] == 2).all()


def test_neurons_at_code_recall_pick_the_threshold_on_one_half():
    # Feature 0 on positions 0..9 of each half (20 positions per half). Neuron 0 is high on the feature in the
    # select half but, on the score half, equally high on 10 other positions; neuron 1 is a clean detector in both.
    n = 40
    labels = torch.full((n,), -1)
    labels[0:10], labels[20:30] = 0, 0
    acts = torch.zeros(n, 2)
    acts[0:10, 0] = 2.0
    acts[20:30, 0], acts[30:40, 0] = 2.0, 2.0
    acts[0:10, 1] = torch.linspace(1.0, 1.9, 10)
    acts[20:30, 1] = torch.linspace(1.0, 1.9, 10)
    select = torch.arange(n) < 20
    table = pd.DataFrame({"feature": [0, 0], "best_code": [1, -1], "best_recall_select": [1.0, 1.0]})
    precision, recall = neurons_at_code_recall(acts, labels, table, select, ~select, n_features=1)
    # On select, neuron 0 (lowest index) ties neuron 1 at precision 1.0 and wins; on the held-out half it fires
    # on 20 positions, 10 of them the feature.
    assert precision[0] == 0.5 and recall[0] == 1.0 and np.isnan(precision[1])
    table["best_recall_select"] = [0.5, 1.0]  # at recall 0.5 neuron 0's threshold still catches everything
    precision, _ = neurons_at_code_recall(acts, labels, table, select, ~select, n_features=1)
    assert precision[0] == 0.5


def test_state_code_headline_counts_own_codes():
    table = pd.DataFrame(
        {
            "best_precision": [1.0, 0.8, 0.95],
            "best_recall": [0.2, 0.6, 0.5],
            "precise_precision": [0.95, 0.0, 0.91],
            "precise_recall": [0.6, 0.0, 0.4],
            "n_precise_codes": [3, 0, 1],
            "n_codes_covering": [5, 2, 1],
            "precise_union_recall": [0.9, 0.0, 0.4],
        }
    )
    head = state_code_headline(table)
    assert head["features_with_own_code"] == 1 and head["features_with_precise_code"] == 2
    assert head["best_code_precision_mean"] == pytest.approx((1.0 + 0.8 + 0.95) / 3)
    assert head["best_code_recall_mean"] == pytest.approx((0.2 + 0.6 + 0.5) / 3)


def test_state_code_report_names_heads_only_for_per_head_codebooks(cb_model, fsm):
    from cbinterp.tasks.fsm_analysis import state_code_report

    acts = collect_fsm_activations(cb_model, fsm, n_positions=2000, seq_len=16, progress=False, neurons=False)
    names = ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"]
    table = state_code_report(cb_model, fsm, acts, names, neurons=False)
    assert table["best_head"].dtype == "Int64"
    found = table[table["best_code"] >= 0]
    assert len(found) and set(found["best_codebook"]) <= set(names)
    mlp = found["best_codebook"] == names[0]
    assert mlp.any() and (~mlp).any()  # both kinds win some state on this seeded model
    assert found.loc[mlp, "best_head"].isna().all()
    assert found.loc[~mlp, "best_head"].between(0, 3).all()
    assert table.loc[table["best_code"] < 0, "best_head"].isna().all()  # no code: no head either
    pool = pool_codes(acts.codes, {n: 16 for n in names}, names)
    assert pool.names[0] == (names[0], None, 0) and pool.names[16] == (names[1], 0, 0)
    assert [pool.names[c][1] for c in found["best_code"]] == [
        None if pd.isna(h) else int(h) for h in found["best_head"]
    ]
