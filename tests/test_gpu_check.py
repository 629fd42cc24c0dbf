"""benchmarks/gpu_check.py: its skip path without CUDA, its plumbing as a CPU dry run, its checks; on CUDA, a run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.needs_hooked  # the script measures HookedTransformers

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_skips_with_a_clear_message_without_cuda(gpu_check, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    assert "SKIPPED: no CUDA device" in capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert "no CUDA device" in results["skipped"] and "sections" not in results


def test_dry_run_on_cpu_runs_the_sections_and_says_it_measures_nothing(gpu_check, tmp_path, capsys, one_thread):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--sections", "a,d,f", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "DRY RUN on cpu" in out and "NOT a GPU measurement" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] and results["quick"] and results["failed"] == []
    assert set(results["sections"]) == {"a_fsm", "a_lm", "d_fsm", "d_lm", "f"}
    assert all(row["status"] == "ok" for row in results["sections"].values())
    assert results["sections"]["a_lm"]["positions"] > 0 and results["sections"]["f"]["backend"] == "gloo"


@pytest.mark.slow
def test_dry_run_of_every_section(gpu_check, tmp_path, one_thread):
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--no-compile"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert {row["status"] for row in results["sections"].values()} == {"ok"}
    assert set(results["sections"]) >= {"b_fsm", "c_lm", "e", "f"}


def test_a_failed_check_or_a_broken_section_exits_non_zero(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "section_a", lambda shape, device, clock: ({}, [f"{shape.name}: wide flip"]))

    def broken(shape, device, clock, compile_):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(gpu_check, "section_d", broken)
    assert gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--sections", "a,d"]) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["sections"]["a_fsm"]["status"] == "fail"
    assert results["sections"]["d_lm"]["status"] == "error" and "out of memory" in results["sections"]["d_lm"]["error"]
    assert "fsm: wide flip" in results["failed"]


def test_unknown_section_is_refused(gpu_check, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--out", str(tmp_path), "--sections", "a,z"])


def test_flips_are_counted_with_their_score_gap(gpu_check):
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    other = torch.tensor([[1, 0], [2, 4], [4, 6]])  # same set; a near tie; a wide gap
    scores = torch.tensor([[0.0] * 7, [0.0, 0.0, 9.0, 5.0, 5.0 - 1e-7, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 9.0, 8.0, 2.0]])
    diff = gpu_check.compare_codes(ids, other, lambda row: scores[row])
    assert diff["positions"] == 3 and diff["flips"] == 2
    assert diff["gaps"][0] == pytest.approx(6.0 / 9.0) and diff["gaps"][1] < gpu_check.NEAR_TIE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_run_on_cuda(gpu_check, tmp_path):
    assert gpu_check.main(["--quick", "--out", str(tmp_path), "--budget-s", "240"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert not results["dry_run"] and results["failed"] == []
