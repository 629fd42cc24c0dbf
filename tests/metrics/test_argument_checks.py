"""Count-like and threshold arguments of the metrics: bools, floats, NaN and out-of-range values are refused."""

from __future__ import annotations

import pytest
import torch

from cbinterp.metrics import (
    best_neuron_precision_at_recall,
    code_feature_counts,
    code_feature_table,
    neuron_precision_at_recall,
)
from cbinterp.metrics.heldout import probe_heldout
from cbinterp.metrics.probes import search_codes

CODES = torch.tensor([[0, 1], [2, -1], [1, 3]])
LABELS = torch.tensor([0, 1, -1])
ACTS = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([True, False, True])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: code_feature_counts(CODES, LABELS, True), "n_codes must be an int, got the bool True"),
        (lambda: code_feature_counts(CODES, LABELS, 4, n_features=True), "n_features must be an int, got the bool"),
        (lambda: code_feature_counts(CODES, LABELS, 4, chunk_elements=True), "chunk_elements must be an int"),
        (lambda: code_feature_table(CODES, LABELS, 4, features_per_code=True), "features_per_code must be an int"),
        (lambda: neuron_precision_at_recall(ACTS, MASK, [0.5], chunk_elements=False), "chunk_elements"),
        (lambda: neuron_precision_at_recall(ACTS, MASK, [True]), "recalls must be floats"),
        (lambda: best_neuron_precision_at_recall(ACTS, MASK, torch.tensor([True])), "recalls must be floats"),
    ],
)
def test_bools_are_not_counts(call, match):
    with pytest.raises(TypeError, match=match):
        call()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(min_fires=2.5), TypeError, "min_fires must be an int >= 1"),
        (dict(min_fires=2.0), TypeError, "min_fires must be an int >= 1"),
        (dict(min_fires=True), TypeError, "min_fires must be an int >= 1"),
        (dict(min_fires=float("nan")), TypeError, "min_fires must be an int >= 1"),
        (dict(min_fires=float("inf")), TypeError, "min_fires must be an int >= 1"),
        (dict(min_fires=0), ValueError, "min_fires must be an int >= 1, got 0"),
        (dict(min_recall=True), TypeError, "min_recall must be a number"),
        (dict(min_recall="0.1"), TypeError, "min_recall must be a number"),
        (dict(min_recall=float("nan")), ValueError, r"min_recall must lie in \[0, 1\], got nan"),
        (dict(min_recall=-0.1), ValueError, r"min_recall must lie in \[0, 1\]"),
    ],
)
def test_ranking_floors_are_checked(kwargs, error, match):
    """The floors are checked before anything is read, so no cache is needed."""
    with pytest.raises(error, match=match):
        search_codes(None, MASK, **kwargs)
    with pytest.raises(error, match=match):
        probe_heldout(None, None, {}, None, **kwargs)
