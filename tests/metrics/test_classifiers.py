"""Tests of cbinterp.metrics: codes and neurons as classifiers, checked against brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cbinterp.codecache.store import cached_codes
from cbinterp.metrics import (
    TABLE_COLUMNS,
    CodeFeatureCounts,
    add_neuron_precision,
    best_neuron_precision_at_recall,
    best_neuron_precision_batch,
    code_feature_counts,
    code_feature_table,
    neuron_precision_at_recall,
    recall_targets,
)

PROPERTY = settings(max_examples=20, deadline=None)


# -- brute-force references ------------------------------------------------------------------------------
def brute_counts(codes: torch.Tensor, feats: torch.Tensor, n_codes: int):
    """tp, code counts and feature counts with Python loops; feats is a bool (n, F) matrix."""
    n, n_features = feats.shape
    tp = np.zeros((n_codes, n_features), dtype=np.int64)
    fires = np.zeros(n_codes, dtype=np.int64)
    for i in range(n):
        on = {int(c) for c in codes[i] if int(c) >= 0}
        for c in on:
            fires[c] += 1
            for f in range(n_features):
                if bool(feats[i, f]):
                    tp[c, f] += 1
    return tp, fires, feats.sum(0).numpy().astype(np.int64)


def labels_to_bool(labels: torch.Tensor, n_features: int) -> torch.Tensor:
    out = torch.zeros(labels.shape[0], n_features, dtype=torch.bool)
    for i, lab in enumerate(labels.tolist()):
        if lab >= 0:
            out[i, lab] = True
    return out


def brute_target(r: float, n_pos: int) -> int:
    """ceil(r * n_pos), exact for r given as a fraction of small integers, clamped to [1, n_pos]."""
    from fractions import Fraction

    return min(n_pos, max(1, math.ceil(Fraction(r).limit_denominator(10_000) * n_pos)))


def brute_neuron(values: list[float], mask: list[bool], r: float, from_below: bool = False):
    """(precision, threshold, tp, fires) of one neuron at target recall r, by the documented rule."""
    pos = [v for v, m in zip(values, mask) if m]
    if not pos:
        return 0.0, None, 0, 0
    t = brute_target(r, len(pos))
    if from_below:
        theta = sorted(pos)[t - 1]
        fire = [v <= theta for v in values]
    else:
        theta = sorted(pos, reverse=True)[t - 1]
        fire = [v >= theta for v in values]
    tp = sum(1 for f, m in zip(fire, mask) if f and m)
    fires = sum(fire)
    return tp / fires, theta, tp, fires


# -- strategies -----------------------------------------------------------------------------------------
@st.composite
def code_data(draw, labels: bool):
    n = draw(st.integers(0, 30))
    k = draw(st.integers(1, 3))
    n_codes = draw(st.integers(1, 6))
    n_features = draw(st.integers(1 if labels else 0, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, n_codes, (n, k), generator=g)  # -1 and repeats within a row both occur
    if labels:
        feats = torch.randint(-1, n_features, (n,), generator=g)
    else:
        feats = torch.rand(n, n_features, generator=g) < draw(st.sampled_from([0.1, 0.5, 0.9]))
    return codes, feats, n_codes, n_features


# -- code counts ----------------------------------------------------------------------------------------
@PROPERTY
@given(code_data(labels=False), st.sampled_from([1, 7, 1 << 20]))
def test_counts_match_brute_force_bool(data, chunk):
    codes, feats, n_codes, n_features = data
    counts = code_feature_counts(codes, feats, n_codes, chunk_elements=chunk)
    tp, fires, fc = brute_counts(codes, feats, n_codes)
    assert counts.tp.shape == (n_codes, n_features)
    np.testing.assert_array_equal(counts.tp.numpy(), tp)
    np.testing.assert_array_equal(counts.code_counts.numpy(), fires)
    np.testing.assert_array_equal(counts.feature_counts.numpy(), fc)
    assert counts.n_positions == codes.shape[0]


@PROPERTY
@given(code_data(labels=True))
def test_counts_match_brute_force_labels(data):
    codes, labels, n_codes, n_features = data
    counts = code_feature_counts(codes, labels, n_codes, n_features=n_features)
    tp, fires, fc = brute_counts(codes, labels_to_bool(labels, n_features), n_codes)
    np.testing.assert_array_equal(counts.tp.numpy(), tp)
    np.testing.assert_array_equal(counts.code_counts.numpy(), fires)
    np.testing.assert_array_equal(counts.feature_counts.numpy(), fc)


def test_precision_recall_and_zero_rules():
    codes = torch.tensor([[0], [0], [1], [-1]])
    labels = torch.tensor([0, 1, 0, 0])
    counts = code_feature_counts(codes, labels, n_codes=3, n_features=3)  # code 2 never fires, feature 2 empty
    prec, rec = counts.precision(), counts.recall()
    assert prec.dtype == torch.float64 and not torch.isnan(prec).any() and not torch.isnan(rec).any()
    torch.testing.assert_close(prec[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(rec[:, 0], torch.tensor([1 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert prec[2].eq(0).all() and rec[:, 2].eq(0).all()


def test_label_count_inferred_and_all_none():
    codes = torch.tensor([[0], [1]])
    assert code_feature_counts(codes, torch.tensor([2, -1]), 2).n_features == 3
    empty = code_feature_counts(codes, torch.tensor([-1, -1]), 2)
    assert empty.tp.shape == (2, 0) and empty.code_counts.tolist() == [1, 1]


# -- code table -----------------------------------------------------------------------------------------
def brute_best(tp, fires, fc):
    """Best feature per code: max precision (i.e. tp), then max recall (min feature count), then lowest id."""
    best = {}
    for c in range(tp.shape[0]):
        cands = [(-tp[c, f], fc[f], f) for f in range(tp.shape[1]) if tp[c, f] > 0]
        best[c] = min(cands)[2] if cands else -1
    return best


@PROPERTY
@given(code_data(labels=False))
def test_table_best_feature_matches_brute_force(data):
    codes, feats, n_codes, _ = data
    table = code_feature_table(codes, feats, n_codes)
    tp, fires, fc = brute_counts(codes, feats, n_codes)
    assert list(table["code"]) == list(range(n_codes))  # one row per code, never-firing ones included
    assert table["head"].isna().all()  # an (n, k) codebook has no heads
    assert not table.drop(columns="head").isna().any().any()
    best = brute_best(tp, fires, fc)
    for row in table.itertuples():
        assert row.feature == best[row.code]
        assert row.n_fires == fires[row.code]
        if row.feature >= 0:
            assert row.tp == tp[row.code, row.feature] and row.n_feature == fc[row.feature]
            assert row.precision == tp[row.code, row.feature] / fires[row.code]
            assert row.recall == tp[row.code, row.feature] / fc[row.feature]
        else:
            assert (row.tp, row.n_feature, row.precision, row.recall) == (0, 0, 0.0, 0.0)


@PROPERTY
@given(code_data(labels=False), st.sampled_from([2, 3, None]))
def test_table_lists_features_in_rank_order(data, per_code):
    codes, feats, n_codes, n_features = data
    table = code_feature_table(codes, feats, n_codes, features_per_code=per_code)
    tp, fires, fc = brute_counts(codes, feats, n_codes)
    for c in range(n_codes):
        ranked = sorted((-tp[c, f], fc[f], f) for f in range(n_features) if tp[c, f] > 0)
        want = [f for _, _, f in ranked][: per_code or None] or [-1]
        assert list(table.loc[table["code"] == c, "feature"]) == want


def test_planted_perfect_code():
    g = torch.Generator().manual_seed(0)
    n = 200
    labels = torch.randint(-1, 4, (n,), generator=g)
    codes = torch.randint(0, 10, (n, 2), generator=g)
    codes[:, 0] = torch.where(labels == 2, 10, codes[:, 0])  # code 10 fires exactly where feature 2 holds
    codes[:, 1] = torch.where(codes[:, 1] == 10, 0, codes[:, 1])
    table = code_feature_table(codes, labels, n_codes=11)
    row = table.set_index("code").loc[10]
    assert (row.feature, row.precision, row.recall) == (2, 1.0, 1.0)
    bool_table = code_feature_table(codes, labels_to_bool(labels, 4), n_codes=11)
    pd.testing.assert_frame_equal(table, bool_table)


def test_ties_in_table_ranking():
    # code 0 fires at positions 0..3; features 0 and 1 each cover two of them (equal precision).
    codes = torch.tensor([[0], [0], [0], [0], [1], [1]])
    feats = torch.tensor(
        [
            [0, 1, 1],
            [0, 1, 1],
            [1, 0, 0],
            [1, 0, 0],
            [1, 0, 0],
            [0, 0, 0],
        ],
        dtype=torch.bool,
    )
    table = code_feature_table(codes, feats, 2, features_per_code=None)
    # feature 1 and 2 have two positions each (recall 1.0) and feature 0 has three: 1, then 2 (lower id), then 0.
    assert list(table.loc[table.code == 0, "feature"]) == [1, 2, 0]
    assert list(table.loc[table.code == 0, "precision"]) == [0.5, 0.5, 0.5]


def test_never_firing_codes_and_empty_features():
    codes = torch.tensor([[0], [0], [1]])
    labels = torch.tensor([-1, -1, 0])
    table = code_feature_table(codes, labels, n_codes=3, n_features=2, feature_names=["a", "b"])
    assert not table.drop(columns="head").isna().any().any()
    by_code = table.set_index("code")
    assert by_code.loc[0, "feature"] == -1 and by_code.loc[0, "n_fires"] == 2  # fires, matches no feature
    assert by_code.loc[2, "feature"] == -1 and by_code.loc[2, "n_fires"] == 0  # never fires
    assert by_code.loc[1, "feature_name"] == "a" and by_code.loc[2, "feature_name"] == ""
    dropped = code_feature_table(codes, labels, n_codes=3, drop_never_firing=True)
    assert list(dropped["code"]) == [0, 1]
    assert table.dtypes["precision"] == np.float64 and table.dtypes["code"] == np.int64
    assert list(table.columns) == TABLE_COLUMNS + ["feature_name"]


def test_table_per_head_and_named_codebooks():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(-1, 3, (40,), generator=g)
    heads = torch.randint(0, 5, (40, 2, 1), generator=g)  # (n_positions, n_heads, k)
    mlp = torch.randint(0, 4, (40, 1), generator=g)
    table = code_feature_table({"attn": heads, "mlp": mlp}, labels, {"attn": 5, "mlp": 4})
    # attention heads are integers; the MLP codebook has no head (pd.NA, not 0)
    assert table["head"].dtype == "Int64"
    assert table.loc[table.codebook == "mlp", "head"].isna().all()
    assert table.loc[table.codebook == "attn", "head"].notna().all()
    sizes = table.groupby(["codebook", "head"], sort=False, dropna=False).size()
    assert [(name, None if pd.isna(head) else int(head), n) for (name, head), n in sizes.items()] == [
        ("attn", 0, 5),
        ("attn", 1, 5),
        ("mlp", None, 4),
    ]
    for h in range(2):
        one = code_feature_table(heads[:, h], labels, 5)
        got = table[(table.codebook == "attn") & (table["head"] == h)].drop(columns=["codebook", "head"])
        pd.testing.assert_frame_equal(got.reset_index(drop=True), one.drop(columns=["codebook", "head"]))


# -- neurons --------------------------------------------------------------------------------------------
@st.composite
def neuron_data(draw):
    n = draw(st.integers(1, 25))
    d = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from([3, 1000]))  # few levels: many ties
    acts = torch.randint(0, levels, (n, d), generator=g).float() / levels - 0.5
    mask = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7]))
    recalls = draw(st.lists(st.sampled_from([0.1, 0.25, 0.3, 1 / 3, 0.5, 0.7, 0.9, 1.0]), min_size=1, max_size=4))
    return acts, mask, recalls


@PROPERTY
@given(neuron_data(), st.booleans(), st.sampled_from([1, 10, 1 << 20]))
def test_neuron_precision_matches_brute_force(data, from_below, chunk):
    acts, mask, recalls = data
    stats = neuron_precision_at_recall(acts, mask, recalls, from_below=from_below, chunk_elements=chunk)
    assert stats.precision.shape == (len(recalls), acts.shape[1])
    assert not torch.isnan(stats.precision).any() and not torch.isnan(stats.threshold).any()
    for i, r in enumerate(recalls):
        for j in range(acts.shape[1]):
            prec, theta, tp, fires = brute_neuron(acts[:, j].tolist(), mask.tolist(), r, from_below)
            assert stats.precision[i, j].item() == prec
            assert (stats.tp[i, j].item(), stats.n_fires[i, j].item()) == (tp, fires)
            if theta is not None:
                assert stats.threshold[i, j].item() == theta


@PROPERTY
@given(neuron_data(), st.booleans(), st.sampled_from([1, 1 << 20]))
def test_best_neuron_matches_brute_force(data, both_signs, chunk):
    acts, mask, recalls = data
    best = best_neuron_precision_at_recall(acts, mask, recalls, both_signs=both_signs, chunk_elements=chunk)
    values, m = acts.T.tolist(), mask.tolist()
    for i, r in enumerate(recalls):
        cands = [(brute_neuron(values[j], m, r)[0], j, 1) for j in range(acts.shape[1])]
        if both_signs:
            cands += [(brute_neuron(values[j], m, r, True)[0], j, -1) for j in range(acts.shape[1])]
        if not any(m):
            assert (best.precision[i].item(), best.neuron[i].item(), best.sign[i].item()) == (0.0, -1, 0)
            assert best.threshold[i].item() == math.inf and best.recall[i].item() == 0.0
            continue
        top = max(c[0] for c in cands)
        # ties: lowest neuron, then from above
        want = min((j, -s) for p, j, s in cands if p == top)
        assert best.precision[i].item() == top
        assert (best.neuron[i].item(), best.sign[i].item()) == (want[0], -want[1])
        prec, theta, tp, _ = brute_neuron(values[want[0]], m, r, from_below=want[1] == 1)
        assert best.threshold[i].item() == theta and best.recall[i].item() == tp / sum(m)
        assert best.recall[i].item() >= r - 1e-12


def test_planted_perfect_neuron():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(300, 8, generator=g)
    mask = torch.rand(300, generator=g) < 0.2
    acts[:, 5] = torch.where(mask, 2.0 + torch.rand(300, generator=g), -1.0 - torch.rand(300, generator=g))
    recalls = [0.01, 0.1, 0.5, 0.9, 1.0]
    best = best_neuron_precision_at_recall(acts, mask, recalls, chunk_elements=300 * 3)
    assert best.precision.tolist() == [1.0] * 5 and best.sign.tolist() == [1] * 5
    assert best.neuron[-2:].tolist() == [5, 5]  # at low recall a random neuron can be perfect too
    stats = neuron_precision_at_recall(acts[:, 5:6], mask, recalls)
    assert stats.precision.flatten().tolist() == [1.0] * 5
    # the same neuron read upside down is only found with both_signs
    flipped = acts.clone()
    flipped[:, 5] = -flipped[:, 5]
    assert best_neuron_precision_at_recall(flipped, mask, recalls).precision[2:].lt(1).all()
    both = best_neuron_precision_at_recall(flipped, mask, recalls, both_signs=True)
    assert both.precision.tolist() == [1.0] * 5 and both.sign.tolist() == [-1] * 5


def test_neuron_ties_count_every_equal_activation():
    acts = torch.tensor([[1.0], [1.0], [1.0], [0.0]])
    mask = torch.tensor([True, False, True, False])
    stats = neuron_precision_at_recall(acts, mask, [0.5])
    # t = 1, threshold 1.0; all three positions at 1.0 fire, two of them are the feature's
    assert (stats.threshold.item(), stats.tp.item(), stats.n_fires.item()) == (1.0, 2, 3)
    assert stats.precision.item() == 2 / 3
    best = best_neuron_precision_at_recall(acts, mask, [0.5])
    assert best.recall.item() == 1.0


def test_best_neuron_tie_goes_to_lowest_index():
    col = torch.tensor([3.0, 2.0, 1.0, 0.0])
    acts = torch.stack([-col, col, col], dim=1)  # neurons 1 and 2 are equal; neuron 0 is their mirror
    mask = torch.tensor([True, True, False, False])
    best = best_neuron_precision_at_recall(acts, mask, [1.0], chunk_elements=4)
    assert (best.neuron.item(), best.sign.item(), best.precision.item()) == (1, 1, 1.0)
    both = best_neuron_precision_at_recall(acts, mask, [1.0], both_signs=True, chunk_elements=4)
    assert (both.neuron.item(), both.sign.item()) == (0, -1)


def test_empty_feature_gives_zero_not_nan():
    acts = torch.randn(10, 3)
    mask = torch.zeros(10, dtype=torch.bool)
    stats = neuron_precision_at_recall(acts, mask, [0.5, 1.0])
    assert stats.precision.eq(0).all() and stats.threshold.eq(math.inf).all() and stats.n_fires.eq(0).all()
    best = best_neuron_precision_at_recall(acts, mask, [0.5])
    assert (best.precision.item(), best.neuron.item()) == (0.0, -1)


def test_recall_targets_float_rounding():
    # (7 / 25) * 25 == 7.000000000000001 and (0.1 * 3) * 10 == 3.0000000000000004 in floating point
    assert recall_targets([7 / 25, 14 / 25], 25).tolist() == [7, 14]
    assert recall_targets([0.1 * 3], 10).item() == 3
    assert recall_targets([0.3], 10).item() == 3 and recall_targets([0.31], 10).item() == 4
    assert recall_targets([0.01, 1.0], 5).tolist() == [1, 5]
    assert recall_targets([0.5], 0).item() == 0


@PROPERTY
@given(st.integers(0, 2**31 - 1), st.booleans())
def test_batch_matches_single_feature_calls(seed, as_labels):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randint(0, 5, (30, 4), generator=g).float()
    labels = torch.randint(-1, 3, (30,), generator=g)
    features = labels if as_labels else labels_to_bool(labels, 3)
    qf = torch.tensor([0, 1, 2, 0, 1])
    qr = torch.tensor([0.5, 1.0, 0.2, 0.5, 0.3], dtype=torch.float64)
    batch = best_neuron_precision_batch(acts, features, qf, qr, n_features=3, both_signs=True, chunk_elements=30)
    for i in range(5):
        one = best_neuron_precision_at_recall(acts, labels == qf[i], [qr[i].item()], both_signs=True)
        for got, want in zip(batch, one):
            assert got[i].item() == want[0].item()


# -- matched-recall table -------------------------------------------------------------------------------
def test_add_neuron_precision_matches_direct_calls():
    g = torch.Generator().manual_seed(1)
    n = 120
    labels = torch.randint(-1, 4, (n,), generator=g)
    codes = torch.randint(0, 6, (n, 1), generator=g)
    codes[:, 0] = torch.where(labels == 3, 6, codes[:, 0])
    table = code_feature_table(codes, labels, n_codes=8, features_per_code=2)
    mlp = torch.randn(n, 10, generator=g)
    mlp[:, 7] = (labels == 3).float()  # a perfect neuron for feature 3
    out = add_neuron_precision(table, {"mlp_post": mlp, "site_outputs": torch.randn(n, 6, generator=g)}, labels)
    assert list(out.columns[-4:]) == [
        "neuron_precision_mlp_post",
        "neuron_mlp_post",
        "neuron_precision_site_outputs",
        "neuron_site_outputs",
    ]
    assert not out.drop(columns="head").isna().any().any()
    pd.testing.assert_frame_equal(out[table.columns], table)
    for row in out.itertuples():
        if row.feature < 0:  # code 7 never fires
            assert (row.neuron_precision_mlp_post, row.neuron_mlp_post) == (0.0, -1)
            continue
        want = best_neuron_precision_at_recall(mlp, labels == row.feature, [row.recall])
        assert row.neuron_precision_mlp_post == want.precision.item()
        assert row.neuron_mlp_post == want.neuron.item()
        # matched recall: the neuron is thresholded to fire on the code's tp feature positions (or more, on ties)
        stats = neuron_precision_at_recall(mlp[:, [row.neuron_mlp_post]], labels == row.feature, [row.recall])
        assert stats.tp.item() >= row.tp
    perfect = out[(out.code == 6) & (out.feature == 3)].iloc[0]
    assert (perfect.precision, perfect.recall, perfect.neuron_precision_mlp_post, perfect.neuron_mlp_post) == (
        1.0,
        1.0,
        1.0,
        7,
    )
    signed = add_neuron_precision(table, {"mlp_post": mlp}, labels, both_signs=True)
    assert set(signed["neuron_sign_mlp_post"]) <= {-1, 0, 1}


# -- errors ---------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    codes = torch.zeros(4, 1, dtype=torch.long)
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(n_positions, k\).*flatten"):
        code_feature_counts(torch.zeros(2, 2, 1, dtype=torch.long), labels, 3)
    with pytest.raises(TypeError, match="integer tensor of code ids"):
        code_feature_counts(codes.float(), labels, 3)
    with pytest.raises(ValueError, match="code id 5"):
        code_feature_counts(codes + 5, labels, 3)
    with pytest.raises(ValueError, match="code id -2"):
        code_feature_counts(codes - 2, labels, 3)
    with pytest.raises(ValueError, match="3 positions but the codes/activations have 4"):
        code_feature_counts(codes, labels[:3], 3)
    with pytest.raises(TypeError, match=r"features.bool\(\)"):
        code_feature_counts(codes, torch.zeros(4, 2), 3)
    with pytest.raises(ValueError, match=r"features.bool\(\)"):
        code_feature_counts(codes, torch.zeros(4, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"mask\[:, None\]"):
        code_feature_counts(codes, torch.zeros(4, dtype=torch.bool), 3)
    with pytest.raises(ValueError, match="out of range for n_features=1"):
        code_feature_counts(codes, labels + 1, 3, n_features=1)
    with pytest.raises(ValueError, match="cover 2 positions"):
        code_feature_table(torch.zeros(2, 4, 1, dtype=torch.long), labels, 3)
    with pytest.raises(ValueError, match="No n_codes given for codebook 'b'"):
        code_feature_table({"b": codes}, labels, {"a": 3})
    acts = torch.randn(4, 3)
    mask = labels == 0
    with pytest.raises(ValueError, match=r"\(n_positions, n_neurons\).*flatten"):
        best_neuron_precision_at_recall(acts[None], mask, [0.5])
    with pytest.raises(TypeError, match="floating-point"):
        best_neuron_precision_at_recall(acts.long(), mask, [0.5])
    with pytest.raises(TypeError, match="1-D bool tensor"):
        best_neuron_precision_at_recall(acts, labels, [0.5])
    with pytest.raises(ValueError, match="3 positions but acts has 4"):
        best_neuron_precision_at_recall(acts, mask[:3], [0.5])
    with pytest.raises(ValueError, match=r"recalls must lie in \(0, 1\]"):
        best_neuron_precision_at_recall(acts, mask, [0.0])
    with pytest.raises(ValueError, match="NaN"):
        best_neuron_precision_at_recall(torch.full((4, 3), math.nan), mask, [0.5])
    with pytest.raises(ValueError, match="one recall per query"):
        best_neuron_precision_batch(acts, labels, [0, 0], [0.5])
    with pytest.raises(ValueError, match="lacks the columns"):
        add_neuron_precision(pd.DataFrame({"code": [0]}), {"x": acts}, labels)


# -- with a model ---------------------------------------------------------------------------------------
def test_table_from_a_model_cache(model, tokens):
    from cbinterp import attach_codebooks

    attach_codebooks(model, sites=("attn", "mlp"), n_codes=7, k=2, layers=[0])
    _, cache = model.run_with_cache(tokens)
    keep = torch.ones(tokens.shape, dtype=torch.bool)
    keep[:, 0] = False  # drop the first position
    codes = cached_codes(cache, mask=keep)
    assert set(codes) == {"blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"}
    assert codes["blocks.0.attn.hook_z"].shape == (keep.sum(), model.cfg.n_heads, 2)
    labels = tokens[keep] % 3
    n_codes = {name: 7 for name in codes}
    table = code_feature_table(codes, labels, n_codes)
    assert len(table) == 7 * (model.cfg.n_heads + 1)
    assert isinstance(code_feature_counts(codes["blocks.0.hook_mlp_out"], labels, 7), CodeFeatureCounts)
    acts = cache["blocks.0.mlp.hook_post"][keep]
    out = add_neuron_precision(table, {"mlp_post": acts}, labels)
    assert out["neuron_precision_mlp_post"].between(0, 1).all()
