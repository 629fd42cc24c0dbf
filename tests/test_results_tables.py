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


#: The default run that benchmarks/README.md reports: the keys of seed 0's results.json and of seeds.json that the
#: tool reads, copied from `fsm_precision.py --seeds 0 1 2` (tools/results_tables.py --snapshot writes them).
SNAPSHOT = ROOT / "tests" / "fixtures" / "fsm_default_run"


@pytest.fixture
def default_run() -> tuple[dict, dict]:
    """A results.json and seeds.json laid out as fsm_precision.py writes them, holding the figures that
    benchmarks/README.md reports for the default run (seed 0, and seeds 0-2)."""
    results = json.loads((SNAPSHOT / "results.json").read_text(encoding="utf-8"))
    seeds = json.loads((SNAPSHOT / "seeds.json").read_text(encoding="utf-8"))
    return results, seeds


def test_results_tables_match_the_benchmarks_readme(tool, default_run):
    results, seeds = default_run
    assert tool.check(BENCHMARKS_README.read_text(encoding="utf-8"), results, seeds) == []
    assert tool.check(BENCHMARKS_README.read_text(encoding="utf-8"), results) == []  # the seed-0 column alone


def test_results_tables_name_every_difference(tool, default_run):
    results, seeds = default_run
    changed = copy.deepcopy(results)
    before = changed["headline"]["state_accuracy_with_codebooks"]
    changed["headline"]["state_accuracy_with_codebooks"] = before + 0.1
    changed["accuracy"]["bypassed"]["loss"] += 1.0
    problems = tool.check(BENCHMARKS_README.read_text(encoding="utf-8"), changed, seeds)
    assert len(problems) == 2
    expected = f"the run gives '{before + 0.1:.3f}', the file '{before:.3f}'"
    assert "'state accuracy with codebooks', column 'seed 0'" in problems[0] and expected in problems[0]
    assert f"{changed['accuracy']['bypassed']['loss']:.3f}" in problems[1]
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
    head = results["headline"]
    assert f"| state accuracy with codebooks | {head['state_accuracy_with_codebooks']:.3f} | 0.6365 |" in alone
    n_features = results["code_search"]["state_digit_headline"]["n_features"]
    assert f"| state-plus-digit features that occur | {n_features} |" in alone
    assert tool.main([str(tmp_path / "results.json"), "--seeds", str(tmp_path / "seeds.json")]) == 0
    both = capsys.readouterr().out
    (tmp_path / "tables.md").write_text(both)
    assert tool.main([str(tmp_path / "results.json"), "--check", str(tmp_path / "tables.md")]) == 0
    assert tool.main([str(tmp_path / "results.json"), "--check", str(BENCHMARKS_README)]) == 0
    precision = f"| {head['state_code_precision_mean']:.3f} |"
    assert precision in both
    (tmp_path / "tables.md").write_text(both.replace(precision, f"| {head['state_code_precision_mean'] + 0.1:.3f} |"))
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
