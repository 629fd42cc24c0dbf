"""tools/results_tables.py: the FSM tables of benchmarks/README.md rendered from (and checked against) a
`fsm_precision.py` run."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_README = ROOT / "benchmarks" / "README.md"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "tools" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stat(mean: float, std: float, lo: float | None = None, hi: float | None = None) -> dict:
    return {"mean": mean, "std": std, "min": mean if lo is None else lo, "max": mean if hi is None else hi, "n": 3}


@pytest.fixture
def default_run(load_benchmark) -> tuple[dict, dict]:
    """A results.json and seeds.json laid out as fsm_precision.py writes them, holding the figures that
    benchmarks/README.md reports for the default run (seed 0, and seeds 0-2)."""
    headline = {
        "state_accuracy_without_codebooks": 0.443,
        "state_accuracy_control": 0.470,
        "state_accuracy_with_codebooks": 0.443,
        "state_accuracy_bypassed": 0.300,
        "valid_mass_without_codebooks": 0.449,
        "valid_mass_control": 0.473,
        "valid_mass_with_codebooks": 0.445,
        "valid_mass_bypassed": 0.299,
        "teacher_forced_without_codebooks": 0.761,
        "teacher_forced_with_codebooks": 0.761,
        "state_code_precision_mean": 0.945,
        "state_code_recall_mean": 0.188,
        "states_with_own_code": 3,
        "states_with_precise_code": 92,
        "precise_codes_per_state_mean": 4.02,
        "prev_share_mean": 0.610,
        "prev_share_baseline_mean": 0.165,
        "site_outputs_precision_mean": 0.557,
        "mlp_neurons_precision_mean": 0.712,
        "state_digit_features": 690,
        "state_digit_code_precision_mean": 0.678,
        "state_digit_code_recall_mean": 0.716,
        "state_digit_features_with_own_code": 179,
        "state_digit_precise_codes": 558,
    }
    losses = {"without_codebooks": 1.592, "control": 1.531, "with_codebooks": 1.614, "bypassed": 2.359}
    per_layer = {0: (0.692, 0.160), 1: (0.890, 0.199), 2: (0.911, 0.209), 3: (0.891, 0.212)}
    results = {
        "recipe": {"n_states": 100},
        "phases": [
            {"phase": "warm", "steps": 250},
            {"phase": "codebooks", "steps": 150},
            {"phase": "control_codebooks", "steps": 150},
        ],
        "paper": load_benchmark("fsm_precision").PAPER,
        "headline": headline,
        "accuracy": {name: {"loss": loss, "optimal_loss": 1.178} for name, loss in losses.items()},
        "code_search": {
            "pooled_mlp_layers": [1, 2, 3],
            "min_recall": 0.01,
            "state_headline": {"precise_union_recall_mean": 0.345},
            "state_digit_headline": {"n_features": 690},
            "per_mlp_layer": {
                f"mlp_layer_{i}": {"best_code_precision_mean": p, "best_code_recall_mean": r}
                for i, (p, r) in per_layer.items()
            },
        },
    }
    aggregate = {
        "state_accuracy_without_codebooks": _stat(0.482, 0.033, 0.443, 0.502),
        "state_accuracy_with_codebooks": _stat(0.468, 0.023, 0.443, 0.488),
        "state_code_precision_mean": _stat(0.964, 0.017, 0.945, 0.979),
        "site_outputs_precision_mean": _stat(0.565, 0.017, 0.553, 0.584),
        "state_accuracy_control": _stat(0.500, 0.026),
        "state_accuracy_bypassed": _stat(0.280, 0.022),
        "valid_mass_without_codebooks": _stat(0.482, 0.0),
        "valid_mass_control": _stat(0.501, 0.0),
        "valid_mass_with_codebooks": _stat(0.471, 0.0),
        "valid_mass_bypassed": _stat(0.281, 0.0),
        "teacher_forced_without_codebooks": _stat(0.821, 0.0),
        "teacher_forced_with_codebooks": _stat(0.812, 0.0),
        "state_code_recall_mean": _stat(0.201, 0.011),
        "states_with_own_code": _stat(4.7, 1.5),
        "states_with_precise_code": _stat(92.0, 3.0),
        "precise_codes_per_state_mean": _stat(4.86, 0.80),
        "prev_share_mean": _stat(0.596, 0.021),
        "prev_share_baseline_mean": _stat(0.174, 0.008),
        "mlp_neurons_precision_mean": _stat(0.736, 0.024),
        "state_digit_code_precision_mean": _stat(0.714, 0.032),
        "state_digit_code_recall_mean": _stat(0.737, 0.029),
        "state_digit_features_with_own_code": _stat(212, 31),
        "state_digit_precise_codes": _stat(627, 69),
    }
    return results, {"seeds": [0, 1, 2], "aggregate": aggregate}


def test_results_tables_match_the_benchmarks_readme(tool, default_run):
    results, seeds = default_run
    assert tool.check(BENCHMARKS_README.read_text(encoding="utf-8"), results, seeds) == []
    assert tool.check(BENCHMARKS_README.read_text(encoding="utf-8"), results) == []  # the seed-0 column alone


def test_results_tables_name_every_difference(tool, default_run):
    results, seeds = default_run
    changed = copy.deepcopy(results)
    changed["headline"]["state_accuracy_with_codebooks"] = 0.444
    changed["accuracy"]["bypassed"]["loss"] = 2.4
    problems = tool.check(BENCHMARKS_README.read_text(encoding="utf-8"), changed, seeds)
    assert len(problems) == 2
    assert "'state accuracy with codebooks', column 'seed 0': the run gives '0.444', the file '0.443'" in problems[0]
    assert "1.592 / 1.531 / 1.614 / 2.400" in problems[1]
    assert tool.check("no tables here", results) == [
        "no table with the header '| | seed 0 | seeds 0-2 | paper |'",
        "no table with the header '| | seed 0 | seeds 0-2 |'",
    ]


def test_results_tables_render_markdown(tool, default_run, tmp_path, capsys):
    results, seeds = default_run
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "seeds.json").write_text(json.dumps(seeds))
    assert tool.main([str(tmp_path / "results.json")]) == 0
    alone = capsys.readouterr().out
    assert "| | seed 0 | paper |\n|---|---|---|\n" in alone  # no seeds.json: no seeds column
    assert "| state accuracy with codebooks | 0.443 | 0.6365 |" in alone
    assert "| state-plus-digit features that occur | 690 |" in alone
    assert tool.main([str(tmp_path / "results.json"), "--seeds", str(tmp_path / "seeds.json")]) == 0
    both = capsys.readouterr().out
    (tmp_path / "tables.md").write_text(both)
    assert tool.main([str(tmp_path / "results.json"), "--check", str(tmp_path / "tables.md")]) == 0
    assert tool.main([str(tmp_path / "results.json"), "--check", str(BENCHMARKS_README)]) == 0
    (tmp_path / "tables.md").write_text(both.replace("| 0.945 |", "| 0.950 |"))
    assert tool.main([str(tmp_path / "results.json"), "--check", str(tmp_path / "tables.md")]) == 1


def test_results_tables_read_only_keys_fsm_precision_writes(default_run):
    """The headline keys the fixture (and so the tool) relies on are ones fsm_precision.py writes."""
    script = (ROOT / "benchmarks" / "fsm_precision.py").read_text(encoding="utf-8")
    written = set(re.findall(r'"([a-z_]+)"', script)) | {
        f"{prefix}_{m}"
        for prefix in ("state_accuracy", "valid_mass")
        for m in ("without_codebooks", "control", "with_codebooks", "bypassed")
    }
    results, _ = default_run
    assert set(results["headline"]) <= written


@pytest.mark.slow
def test_results_tables_render_a_quick_run(tool, fsm_quick_run):
    """The real layout of a run: both tables render from the quick model's results.json and read back equal."""
    out, _ = fsm_quick_run
    results = json.loads((out / "results.json").read_text())
    paper, ours = tool.paper_table(results), tool.ours_table(results)
    text = tool.markdown(tool.PAPER_HEADER, paper) + "\n\n" + tool.markdown(tool.OURS_HEADER, ours)
    assert tool.check(text, results) == []
    assert f"| {results['headline']['state_accuracy_with_codebooks']:.3f} |" in text
    assert len(ours) == 15 and "MLP layers 1 pooled" in paper[2][0]
