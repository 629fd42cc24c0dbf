"""Codes and neurons chosen on one cache and scored on another (cbinterp.metrics.heldout)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from cbinterp.codecache.store import CodeCache
from cbinterp.metrics.heldout import HELDOUT_COLUMNS, code_fires_in, default_neuron_sets, probe_heldout

# token 0 is the feature ("X"); 1 and 2 are other text
STRINGS = ["X ", "a ", "b "]
HOOK = "blocks.0.mlp.hook_post"


def make_cache(tokens, codes, acts) -> CodeCache:
    """An in-memory cache: one codebook "cb" (k=1, 4 codes), one stored hook, one document."""
    n = len(tokens)
    meta = {
        "codebooks": {"cb": {"n_codes": 4, "k": 1, "groups": 1, "dim": 2, "shape": [1]}},
        "hooks": [HOOK],
        "n_tokens": n,
        "n_docs": 1,
    }
    arrays = {
        "tokens": torch.tensor(tokens, dtype=torch.int32),
        "doc": torch.zeros(n, dtype=torch.int32),
        "pos": torch.arange(n, dtype=torch.int32),
        "codes/cb": torch.tensor(codes, dtype=torch.uint8)[:, None],
        "act/" + HOOK: torch.tensor(acts, dtype=torch.float16),
    }
    return CodeCache(meta, arrays=arrays)


def half_a():
    # 10 feature tokens. Code 3 fires twice, both on X: precision 1.0, recall 0.2 on A (chance, as B shows).
    # Code 1 fires on the other 8 X and on 2 non-X: precision 0.8, recall 0.8. Code 0 elsewhere.
    tokens = [0] * 10 + [1] * 10
    codes = [3, 3] + [1] * 8 + [1, 1] + [0] * 8
    # neuron 0 tracks X (8 of 10) with one false alarm; neuron 1 is high on the first two X only (code 3's twin)
    acts = [[0.5, 5.0]] * 2 + [[1.0, 0.0]] * 8 + [[1.0, 0.0]] + [[0.0, 0.0]] * 9
    return make_cache(tokens, codes, acts)


def half_b():
    # On B code 3 fires only on non-X tokens, code 1 still on X (8 of 10) with 2 false alarms.
    tokens = [0] * 10 + [1] * 10
    codes = [1] * 8 + [0, 0] + [3, 3] + [1, 1] + [0] * 6
    acts = [[1.0, 0.0]] * 10 + [[0.0, 5.0]] * 2 + [[0.0, 0.0]] * 8
    return make_cache(tokens, codes, acts)


def test_code_chosen_on_a_is_scored_on_b():
    table = probe_heldout(half_a(), half_b(), {"X": "X"}, STRINGS, neurons=False)
    assert list(table.columns) == HELDOUT_COLUMNS
    row = table.iloc[0]
    # the paper's search (recall > 1%, most precise) picks the lucky code on A ...
    assert (row["codebook"], row["code"]) == ("cb", 3)
    assert row["precision_a"] == 1.0 and row["recall_a"] == pytest.approx(0.2)
    # ... and B shows it: it never fires on X there. In-sample scoring would have reported 1.0.
    assert row["n_fires_b"] == 2 and row["precision_b"] == 0.0 and row["recall_b"] == 0.0
    assert (row["n_feature_a"], row["n_feature_b"]) == (10, 10)


def test_recall_floor_and_min_fires_change_the_choice():
    table = probe_heldout(half_a(), half_b(), {"X": "X"}, STRINGS, neurons=False, min_fires=3)
    row = table.iloc[0]
    assert row["code"] == 1 and row["precision_a"] == pytest.approx(0.8)
    assert row["precision_b"] == pytest.approx(0.8) and row["recall_b"] == pytest.approx(0.8)
    none = probe_heldout(half_a(), half_b(), {"X": "X"}, STRINGS, neurons=False, min_recall=0.9).iloc[0]
    assert none["code"] == -1 and none["precision_b"] == 0.0


def test_neuron_chosen_on_a_keeps_its_threshold_on_b():
    table = probe_heldout(half_a(), half_b(), {"X": "X"}, STRINGS)
    row = table.iloc[0]
    # at the code's recall 0.2 on A, neuron 1 (threshold 5) is perfectly precise on A
    assert row["neuron_mlp_hidden_hook"] == HOOK and row["neuron_mlp_hidden_unit"] == 1
    assert row["neuron_mlp_hidden_precision_a"] == 1.0
    assert row["neuron_mlp_hidden_threshold"] == pytest.approx(5.0)
    # on B, act >= 5 only on non-X tokens: precision 0, recall 0
    assert row["neuron_mlp_hidden_precision_b"] == 0.0 and row["neuron_mlp_hidden_recall_b"] == 0.0
    # "best" is the only set here
    assert row["neuron_best_unit"] == 1 and row["neuron_best_precision_b"] == 0.0


def test_neuron_at_code_recall_on_b():
    table = probe_heldout(half_a(), half_b(), {"X": "X"}, STRINGS, min_fires=3)
    row = table.iloc[0]
    # at code 1's recall 0.8 on A, neuron 0 (threshold 1.0: 8 X and one false alarm) beats neuron 1
    assert row["neuron_best_unit"] == 0 and row["neuron_best_precision_a"] == pytest.approx(8 / 9)
    # on B it fires on every X and nowhere else
    assert row["neuron_best_precision_b"] == 1.0 and row["neuron_best_recall_b"] == 1.0
    assert row["neuron_best_precision_b_at_code_recall"] == 1.0


def test_feature_missing_on_a_is_dropped_with_a_warning():
    with pytest.warns(UserWarning, match="matches no token"):
        table = probe_heldout(half_a(), half_b(), {"X": "X", "none": "zzz"}, STRINGS, neurons=False)
    assert list(table["feature_name"]) == ["X"]


def test_unknown_hook_is_refused():
    with pytest.raises(ValueError, match="not stored"):
        probe_heldout(half_a(), half_b(), {"X": "X"}, STRINGS, neuron_sets={"other": ["blocks.1.mlp.hook_post"]})


def test_helpers():
    assert code_fires_in(half_b(), "cb", 3).nonzero().flatten().tolist() == [10, 11]
    for head in (None, pd.NA, 0):  # "cb" has no heads: no head (or its only group, 0)
        assert code_fires_in(half_b(), "cb", 3, head).nonzero().flatten().tolist() == [10, 11]
    with pytest.raises(ValueError, match="has no heads"):
        code_fires_in(half_b(), "cb", 3, 1)
    sets = default_neuron_sets(["blocks.0.mlp.hook_post", "blocks.0.attn.hook_z.hook_input", "blocks.0.hook_resid_pre"])
    assert sets == {
        "mlp_hidden": ["blocks.0.mlp.hook_post"],
        "codebook_input": ["blocks.0.attn.hook_z.hook_input"],
        "blocks.0.hook_resid_pre": ["blocks.0.hook_resid_pre"],
    }


def grouped(cache: CodeCache) -> CodeCache:
    """`cache` with a second codebook "attn" of 2 heads: head 1 holds cb's codes, head 0 only code 0."""
    codes = cache.codes("cb")
    attn = torch.stack([torch.zeros_like(codes), codes], dim=1)  # (n, 2, 1)
    n = cache.n_tokens
    meta = {
        "codebooks": {
            "cb": {"n_codes": 4, "k": 1, "groups": 1, "dim": 2, "shape": [1]},
            "attn": {"n_codes": 4, "k": 1, "groups": 2, "dim": 2, "shape": [2, 1]},
        },
        "hooks": [HOOK],
        "n_tokens": n,
        "n_docs": 1,
    }
    arrays = {
        "tokens": cache.tokens.int(),
        "doc": torch.zeros(n, dtype=torch.int32),
        "pos": torch.arange(n, dtype=torch.int32),
        "codes/cb": codes.to(torch.uint8),
        "codes/attn": attn.to(torch.uint8),
        "act/" + HOOK: cache.activations(HOOK).half(),
    }
    return CodeCache(meta, arrays=arrays)


def test_codes_without_heads_report_no_head():
    table = probe_heldout(half_a(), half_b(), {"X": "X", "not_X": "[ab]"}, STRINGS, neurons=False)
    assert table["head"].dtype == "Int64"
    assert list(table["codebook"]) == ["cb", "cb"] and table["head"].isna().all()  # "cb" has no heads: not 0


def test_attention_codes_report_their_head():
    # "cb" and head 1 of "attn" hold the same codes: the tie goes to the codebook first in order ("attn")
    table = probe_heldout(grouped(half_a()), grouped(half_b()), {"X": "X"}, STRINGS, neurons=False)
    row = table.iloc[0]
    assert (row["codebook"], row["head"], row["code"]) == ("attn", 1, 3)
    assert table["head"].dtype == "Int64"
    assert row["precision_b"] == 0.0 and row["n_fires_b"] == 2  # scored on head 1 of B, where code 3 misses X


def test_a_feature_without_a_code_has_no_head():
    table = probe_heldout(half_a(), half_b(), {"X": "X"}, STRINGS, neurons=False, min_fires=1000)
    assert table.iloc[0]["code"] == -1 and table.iloc[0]["codebook"] == "" and pd.isna(table.iloc[0]["head"])
    assert table["head"].dtype == "Int64"
