"""The benchmark scripts in their quick modes. The FSM ones share one trained quick model (`fsm_quick_run`, in
conftest.py, marked slow); the checks are on the computations and their consistency, not on the findings, which
the benchmarks report."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cbinterp
from cbinterp.tasks.fsm import FSM

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py") if p.stem not in ("__init__", "common"))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# -- the package: run as files and as modules, no import-path tricks ------------------------------------------------
def test_benchmarks_leave_the_import_path_alone():
    """No script changes sys.path (a file run puts benchmarks/ first; the package finds `common` itself)."""
    touching = re.compile(r"sys\.path\.(insert|append|extend|remove)|sys\.path\s*\+?=|PYTHONPATH")
    offenders = [str(p.relative_to(ROOT)) for p in BENCHMARKS.rglob("*.py") if touching.search(p.read_text())]
    offenders += [name for name in ("conftest.py",) if touching.search((ROOT / "tests" / name).read_text())]
    assert offenders == []
    assert [p.name for p in BENCHMARKS.glob("_*.py")] == ["__init__.py"], "shared code belongs in common.py"
    assert sorted(p.name for p in (BENCHMARKS / "reference").glob("*.py")) == [
        "make_codebook_features_fixtures.py",
        "make_tinystories_fixture.py",
        "serve_loop.py",
        "time_codebook.py",
        "time_train.py",
    ]


def _run_script(args: list[str]) -> subprocess.CompletedProcess:
    # the child imports the cbinterp this test imported (an editable install may point at another checkout)
    env = {**os.environ, "PYTHONPATH": str(Path(cbinterp.__file__).parents[1])}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["file", "module"])
def test_a_script_with_shared_code_runs_as_a_file_and_as_a_module(mode, tmp_path):
    out = tmp_path / "codebook_speed.json"
    script = ["benchmarks/codebook_speed.py"] if mode == "file" else ["-m", "benchmarks.codebook_speed"]
    args = ["--quick", "--no-reference", "--shapes", "mlp", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    result = _run_script([*script, *args])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout and json.loads(out.read_text())["results"].keys() == {"mlp"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["file", "module"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_starts_as_a_file_and_as_a_module(name, mode):
    script = [f"benchmarks/{name}.py"] if mode == "file" else ["-m", f"benchmarks.{name}"]
    result = _run_script([*script, "--help"])
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-3000:]


# -- fsm_precision ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fsm_precision_quick_beats_a_uniform_model_and_is_consistent(fsm_quick_run):
    out, results = fsm_quick_run
    head, recipe = results["headline"], results["recipe"]
    fsm = FSM.load(out / "fsm.json")
    # A model uniform over the vocabulary writes a valid transition with chance
    # P(group is a state) * P(next group is a successor) = (n_states / V^2) * (n_edges / V^2), V = vocab size.
    v2 = fsm.vocab_size**fsm.digits
    uniform = fsm.n_states / v2 * fsm.n_edges / v2
    for key in ("state_accuracy_without_codebooks", "state_accuracy_with_codebooks", "state_accuracy_control"):
        assert head[key] > 10 * uniform, key
    for name, row in results["accuracy"].items():
        assert 0.0 <= row["state_accuracy"] <= row["valid_state_share"] <= 1.0, name
        assert row["loss"] >= row["optimal_loss"] - 0.05, name  # nobody beats the Bayes-optimal loss by much
        assert row["sampled_transitions"] == 500 * ((recipe["seq_len"] - 1) // fsm.digits - 1)
    # Phases: tokens are steps x batch x sequence length; the control mirrors the codebook phase.
    per_step = recipe["batch"] * recipe["seq_len"]
    for phase in results["phases"]:
        assert phase["tokens"] == phase["steps"] * per_step
        assert results["tokens"][phase["phase"]] == phase["tokens"]
    assert results["tokens"]["control_codebooks"] == results["tokens"]["codebooks"]


@pytest.mark.slow
def test_fsm_precision_state_tables_have_one_row_per_state(fsm_quick_run):
    out, results = fsm_quick_run
    search, head = results["code_search"], results["headline"]
    n_states = results["recipe"]["n_states"]
    states = search["states"]
    assert [row["feature"] for row in states] == list(range(n_states))
    assert search["pooled_mlp_layers"] == [1]  # the quick model has two layers: MLP layer 1 alone
    # The headline is the table's means and counts.
    assert head["state_code_precision_mean"] == pytest.approx(np.mean([r["best_precision"] for r in states]))
    assert head["state_code_recall_mean"] == pytest.approx(np.mean([r["best_recall"] for r in states]))
    own = sum(r["precise_precision"] >= 0.9 and r["precise_recall"] >= 0.5 for r in states)
    assert head["states_with_own_code"] == own <= head["states_with_precise_code"] <= n_states
    for row in states:
        assert row["n_select"] > 0 and row["n_score"] > 0  # both halves hold every state
        assert row["n_precise_codes"] <= row["n_codes_covering"]
        if row["best_code"] >= 0:
            assert 0.0 <= row["best_precision"] <= 1.0 and 0.0 <= row["best_recall"] <= 1.0
            assert _finite(row["site_outputs_precision"]) and _finite(row["mlp_neurons_precision"])
        if row["prev_share"] is not None:
            assert 1.0 / row["n_previous_states"] - 1e-9 <= row["prev_share"] <= 1.0
    assert set(search["per_mlp_layer"]) == {"mlp_layer_0", "mlp_layer_1"}
    assert search["state_digit_headline"]["n_features"] == head["state_digit_features"] > n_states


@pytest.mark.slow
def test_fsm_precision_writes_its_files(fsm_quick_run):
    out, results = fsm_quick_run
    on_disk = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert on_disk["headline"] == pytest.approx(results["headline"])
    assert "plotly" in (out / "figure.html").read_text()
    model = cbinterp.load(out / "model")
    assert set(cbinterp.get_codebooks(model)) == {
        f"blocks.{l}.{site}" for l in range(model.cfg.n_layers) for site in ("attn.hook_z", "hook_mlp_out")
    }
    assert not cbinterp.get_codebooks(cbinterp.load(out / "model_warm"))
    assert not cbinterp.get_codebooks(cbinterp.load(out / "model_control"))


@pytest.mark.slow
def test_fsm_precision_resumes_from_its_checkpoints(fsm_quick_run, load_benchmark):
    """A second run with the same recipe and --out trains nothing more and gives the same model."""
    out, results = fsm_quick_run
    before = cbinterp.load(out / "model").state_dict()
    again = load_benchmark("fsm_precision").main(
        ["--quick", "--out", str(out), "--no-progress", "--no-neurons", "--eval-positions", "3000"]
    )
    after = cbinterp.load(out / "model").state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert again["accuracy"]["with_codebooks"]["loss"] == results["accuracy"]["with_codebooks"]["loss"]
    assert again["kmeans_initialised_this_run"] is False


def test_fsm_precision_refuses_checkpoints_of_another_recipe(tmp_path, load_benchmark):
    script = load_benchmark("fsm_precision")
    args = script.parse_args(["--quick", "--out", str(tmp_path)])
    script.check_resumable(tmp_path, script.recipe_of(args, 0).to_dict(), fresh=False)
    script.check_resumable(tmp_path, script.recipe_of(args, 0).to_dict(), fresh=False)  # the same: fine
    changed = script.recipe_of(script.parse_args(["--quick", "--n-codes", "64"]), 0).to_dict()
    with pytest.raises(SystemExit, match="training"):
        script.check_resumable(tmp_path, changed, fresh=False)
    script.check_resumable(tmp_path, changed, fresh=True)  # --fresh starts over


def test_fsm_precision_overrides_and_folders(load_benchmark):
    script = load_benchmark("fsm_precision")
    assert script.parse_args([]).out.name == "fsm"
    assert script.parse_args(["--quick"]).out.name == "fsm_quick"
    recipe = script.recipe_of(script.parse_args(["--codebook-loss", "vqvae", "--warm-steps", "7"]), 2)
    assert recipe.training.codebooks.loss == "vqvae" and recipe.training.warm.steps == 7 and recipe.seed == 2
    assert script.recipe_of(script.parse_args([]), 0).training.codebooks.loss == "aeloss"  # the paper's default
    with pytest.raises(SystemExit):
        script.parse_args(["--seeds", "1", "1"])


def test_fsm_precision_machine_shape_overrides_are_recorded(tmp_path, load_benchmark):
    script = load_benchmark("fsm_precision")
    args = script.parse_args(["--quick", "--n-states", "30", "--n-edges", "3", "--base", "4"])
    recipe = script.recipe_of(args, 1)
    fsm = recipe.fsm()
    assert (fsm.n_states, fsm.n_edges, fsm.base, fsm.digits) == (30, 3, 4, 3)
    assert recipe.to_dict()["n_states"] == 30  # recorded with the recipe, so a resume must match
    script.check_resumable(tmp_path, recipe.to_dict(), fresh=False)
    default = script.recipe_of(script.parse_args(["--quick"]), 1).to_dict()
    with pytest.raises(SystemExit, match="n_states"):
        script.check_resumable(tmp_path, default, fresh=False)


def test_fsm_table1_rows_differ_only_in_their_codebooks(load_benchmark):
    table1 = load_benchmark("fsm_table1")
    base = load_benchmark("fsm_precision").recipe_of(load_benchmark("fsm_precision").parse_args(["--quick"]), 0)
    training = base.training
    # The rows the default run trains already are the default recipe itself (resumed from its checkpoints).
    assert (
        table1.row_training(training, "none") is training and table1.row_training(training, "attn_mlp_k1") is training
    )
    k16 = table1.row_training(training, "attn_mlp_k16")
    assert (k16.codebooks.k, k16.codebooks.sites, k16.codebooks.kmeans_mean_of_k) == (16, ("attn", "mlp"), True)
    assert [p.name for p in k16.phases] == [p.name + "_attn_mlp_k16" for p in training.phases] and not k16.control
    assert [(p.steps, p.lr, p.stream) for p in k16.phases] == [(p.steps, p.lr, p.stream) for p in training.phases]
    assert k16.warm_phases() == training.warm_phases()  # the same warm start, resumed
    attn = table1.row_training(training, "attn_k1")
    assert attn.codebooks.sites == ("attn",) and attn.codebooks.k == 1


def test_fsm_precision_aggregates_seeds(load_benchmark):
    script = load_benchmark("fsm_precision")
    runs = [{"headline": {"state_code_precision_mean": v, "states_with_own_code": n}} for v, n in ((0.5, 3), (0.7, 5))]
    agg = script.aggregate(runs)
    assert agg["state_code_precision_mean"]["mean"] == pytest.approx(0.6)
    assert agg["state_code_precision_mean"]["std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert agg["states_with_own_code"] == {
        "mean": 4.0,
        "std": pytest.approx(math.sqrt(2)),
        "min": 3.0,
        "max": 5.0,
        "n": 2,
    }


# -- fsm_intervention ---------------------------------------------------------------------------------------
def test_normalised_jsd_on_hand_made_distributions(load_benchmark):
    script = load_benchmark("fsm_intervention")
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    assert script.jsd_bits(p, q).tolist() == pytest.approx([1.0, 0.0])  # disjoint: 1 bit; equal: 0
    r = torch.tensor([[0.5, 0.5]])
    assert float(script.jsd_bits(torch.tensor([[1.0, 0.0]]), r)) == pytest.approx(0.311278, abs=1e-5)
    norm = script.normalised_jsd({"none": np.array([0.4, 0.2]), "half": np.array([0.1, 0.2]), "all": np.zeros(2)})
    assert norm == {"none": 1.0, "half": pytest.approx(0.5), "all": 0.0}
    with pytest.raises(ValueError, match="zero"):
        script.normalised_jsd({"none": np.zeros(3)})


@pytest.mark.slow
def test_fsm_intervention_quick_on_the_shared_model(fsm_quick_run, tmp_path, load_benchmark):
    source, _ = fsm_quick_run
    out = tmp_path / "intervention"
    results = load_benchmark("fsm_intervention").main(
        ["--quick", "--from", str(source), "--out", str(out), "--pairs", "200", "--no-progress"]
    )
    n_layers = cbinterp.load(source / "model").cfg.n_layers
    expected = {"none", "all_attn", "all_mlp", "all"} | {
        f"{site}_layer_{l}" for l in range(n_layers) for site in ("attn", "mlp")
    }
    for kind in ("state_swap", "state_digit_swap"):
        rows = results[kind]
        assert set(rows) == expected
        assert rows["none"]["jsd_norm"] == 1.0  # the normalisation, exactly
        assert all(0.0 <= r["jsd_norm"] and 0.0 <= r["success_b"] <= 1.0 for r in rows.values())
        # Swapping every codebook at the position moves the distribution towards b's more than no swap does.
        assert rows["all"]["jsd_norm"] < rows["none"]["jsd_norm"]
    assert results["state_swap"]["none"]["success_a"] > results["state_swap"]["none"]["success_b"]
    assert json.loads((out / "results.json").read_text())["state_swap"] == json.loads(json.dumps(results["state_swap"]))
    assert "plotly" in (out / "figure.html").read_text()


@pytest.mark.slow
def test_fsm_intervention_on_a_machine_of_one_digit_per_state(tmp_path, load_benchmark):
    """With one digit per state there is no state-plus-digit feature: the state search and swap run, the others are
    None."""
    source = tmp_path / "one_digit"
    args = ["--quick", "--base", "20", "--warm-steps", "40", "--codebook-steps", "10", "--eval-positions", "2000"]
    trained = load_benchmark("fsm_precision").main(
        [*args, "--sample-sequences", "20", "--out", str(source), "--no-progress"]
    )
    assert FSM.load(source / "fsm.json").digits == 1
    assert trained["headline"]["state_digit_features"] is None and trained["headline"]["state_code_precision_mean"]
    results = load_benchmark("fsm_intervention").main(
        ["--quick", "--from", str(source), "--out", str(tmp_path / "swap"), "--pairs", "40", "--no-progress"]
    )
    assert results["state_digit_swap"] is None
    assert results["state_swap"]["none"]["jsd_norm"] == 1.0 and "all_mlp" in results["state_swap"]


# -- speed benchmarks: the report is what was timed ------------------------------------------------------------
def test_codebook_speed_quick_report_is_consistent(tmp_path, capsys, load_benchmark):
    out = tmp_path / "codebook_speed.json"
    report = load_benchmark("codebook_speed").main(["--quick", "--no-reference", "--out", str(out)])
    assert json.loads(out.read_text())["quick"] is True and "reference" in capsys.readouterr().out
    assert report["results"]
    for row in report["results"].values():
        for key, times in row["times_s"].items():
            assert times and all(_finite(t) and t > 0 for t in times)
            assert row[f"{key}_s"] == statistics.median(times) and row[f"{key}_min_s"] == min(times)
        assert row["ours_over_floor"] == pytest.approx(row["ours_s"] / row["floor_s"])
        assert row["ours_over_reference"] is None  # --no-reference


@pytest.mark.needs_hooked  # the script builds HookedTransformers
def test_train_speed_quick_report_is_consistent(tmp_path, load_benchmark):
    out = tmp_path / "train_speed.json"
    report = load_benchmark("train_speed").main(["--quick", "--no-reference", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == report["results"].keys()
    n_tokens = report["batch"] * report["seq_len"]
    for row in report["results"].values():
        assert row["median_s"] == statistics.median(row["times_s"]) and row["min_s"] <= row["median_s"]
        assert row["tokens_per_s"] == pytest.approx(n_tokens / row["median_s"])
        assert row["over_reference"] is None
        assert row["roofline_fraction"] == pytest.approx(row["tokens_per_s"] / row["roofline_tokens_per_s"])
    results = report["results"]
    assert {"ours", "ours_tl_kernels", "ours_tl_kernels_fused_adamw", "no_codebooks"} <= results.keys()
    ratio = results["ours"]["tokens_per_s"] / results["no_codebooks"]["tokens_per_s"]
    assert results["ours"]["over_no_codebooks"] == pytest.approx(ratio)
    # the codebooks add their similarity search to the step's work, so their roofline is lower
    assert results["ours"]["roofline_tokens_per_s"] < results["no_codebooks"]["roofline_tokens_per_s"]


@pytest.mark.needs_hooked  # the script builds HookedTransformers
def test_train_profile_quick_accounts_for_the_whole_step(tmp_path, load_benchmark):
    out = tmp_path / "train_profile.json"
    report = load_benchmark("train_profile").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["variants"].keys() == report["variants"].keys()
    assert len(report["variants"]) == 4
    for row in report["variants"].values():
        assert sum(row["family_s"].values()) == pytest.approx(row["profiled_step_s"], rel=1e-6)
        assert (row["family_s"]["codebook search"] > 0) == row["codebooks"]
        assert row["family_s"]["matmuls"] > 0 and row["family_s"]["optimizer"] > 0


@pytest.mark.needs_hooked  # the script builds HookedTransformers
def test_cache_speed_quick_report_is_consistent(tmp_path, capsys, load_benchmark):
    out = tmp_path / "cache_speed.json"
    report = load_benchmark("cache_speed").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["ratios"] == pytest.approx(report["ratios"])
    seconds = report["seconds"]
    assert set(seconds) == {"plain", "cached", "cached_to_disk"}
    assert report["ratios"]["cached_over_plain"] == pytest.approx(seconds["cached"] / seconds["plain"])
    # 64 codes fit a byte: one byte per token per codebook slot.
    assert {s["per_codebook_slot_over_k"] for s in report["storage"].values()} == {1.0}
    assert "target cached/plain" in capsys.readouterr().out


@pytest.mark.slow  # four fresh interpreters importing torch: well over 10 s on a loaded machine
def test_cache_memory_quick_report_is_consistent(tmp_path, capsys, load_benchmark):
    out = tmp_path / "cache_memory.json"
    report = load_benchmark("cache_memory").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == report["results"].keys()
    assert "now" in report["results"]  # and "before" where git can export the baseline
    assert report["same_answers"] is True  # the old and the new cache answer the query alike
    for row in report["results"].values():
        for step in ("cache", "query"):
            r = row[step]
            assert r["peak_mb"] >= r["imports_mb"] > 0
            assert r["over_imports_mb"] == pytest.approx(r["peak_mb"] - r["imports_mb"])
        assert row["disk_mb"] > 0
    assert "open+query" in capsys.readouterr().out


@pytest.mark.needs_hooked  # the script builds HookedTransformers
def test_ddp_speed_quick_report_is_consistent(tmp_path, capsys, load_benchmark):
    out = tmp_path / "ddp_speed.json"
    report = load_benchmark("ddp_speed").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["results"].keys() == report["results"].keys() == {"1", "2"}
    for world, row in report["results"].items():
        assert row["world_size"] == int(world) and len(row["tokens_per_s_per_step"]) == report["steps"]
        assert row["tokens_per_s"] == pytest.approx(statistics.median(row["tokens_per_s_per_step"]))
    one, two = report["results"]["1"], report["results"]["2"]
    assert two["speedup_over_1_rank"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert "x 1 rank" in capsys.readouterr().out


@pytest.mark.needs_hooked  # the script builds HookedTransformers
def test_autocast_codes_quick_report_is_consistent(tmp_path, load_benchmark):
    out = tmp_path / "autocast_codes.json"
    report = load_benchmark("autocast_codes").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["overall"] == pytest.approx(report["overall"])
    for row in report["per_codebook"].values():
        for key in ("fp32_search", "bf16_search", "bf16_search_fp32_input"):
            assert 0.0 <= row[key] <= 1.0
    # the search in float32 changes fewer codes than the same forward with the search in bf16
    assert report["overall"]["fp32_search"] < report["overall"]["bf16_search"]


def test_fsm_warm_sweep_reads_stages_and_names_a_bad_one(load_benchmark):
    sweep = load_benchmark("fsm_warm_sweep")
    args = sweep.parse_args(["--name", "x", "--stages", "1000:64:16:3e-3,600:32:128:1e-3"])
    assert args.stages == [(1000, 64, 16, 3e-3), (600, 32, 128, 1e-3)]
    with pytest.raises(SystemExit):
        sweep.parse_args(["--name", "x", "--stages", "1000:64:16"])
