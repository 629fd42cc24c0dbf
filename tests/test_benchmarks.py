"""End-to-end runs of the benchmark scripts in their quick modes (marked slow)."""

from __future__ import annotations

import json

import pytest
import torch

import cbinterp
from cbinterp.tasks.fsm import FSM


@pytest.fixture(scope="module")
def fsm_run(tmp_path_factory, load_benchmark):
    out = tmp_path_factory.mktemp("fsm")
    results = load_benchmark("fsm_precision").main(["--quick", "--out", str(out), "--no-progress"])
    return out, results


@pytest.mark.slow
def test_fsm_precision_quick_meets_its_thresholds(fsm_run):
    out, results = fsm_run
    head = results["headline"]
    n_states = results["settings"]["n_states"]
    assert head["transition_accuracy"] >= 0.9
    assert head["states_with_own_code"] >= 0.8 * n_states
    assert head["best_mlp_state_code_precision_mean"] >= 0.9
    # The neuron baseline is measured for the same codes, and is a real number in [0, 1].
    for key in ("best_mlp_layer_mlp_neurons_precision_mean", "best_mlp_layer_site_outputs_precision_mean"):
        assert 0.0 < head[key] <= 1.0


@pytest.mark.slow
def test_fsm_precision_writes_its_files(fsm_run):
    out, results = fsm_run
    on_disk = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert on_disk["headline"] == pytest.approx(results["headline"])
    assert {"settings", "per_codebook", "codes", "eval", "timings_s"} <= set(on_disk)
    assert all(row["n_fires"] >= on_disk["settings"]["min_fires"] for row in on_disk["codes"])
    assert FSM.load(out / "fsm.json").n_states == on_disk["settings"]["n_states"]
    assert "plotly" in (out / "figure.html").read_text()
    model = cbinterp.load(out / "model")
    assert set(cbinterp.get_codebooks(model)) == {
        f"blocks.{l}.{site}" for l in range(model.cfg.n_layers) for site in ("attn.hook_z", "hook_mlp_out")
    }


@pytest.mark.slow
def test_fsm_precision_resumes_from_its_checkpoints(fsm_run, load_benchmark):
    """A second run with the same settings and --out trains nothing more and gives the same model."""
    out, results = fsm_run
    before = cbinterp.load(out / "model").state_dict()
    again = load_benchmark("fsm_precision").main(["--quick", "--out", str(out), "--no-progress", "--no-neurons"])
    after = cbinterp.load(out / "model").state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert again["eval"]["trained"]["loss"] == results["eval"]["trained"]["loss"]


def test_fsm_precision_refuses_checkpoints_of_other_settings(tmp_path, load_benchmark):
    script = load_benchmark("fsm_precision")
    args = script.parse_args(["--quick", "--out", str(tmp_path)])
    script.check_resumable(tmp_path, script.settings_of(args), fresh=False)
    changed = script.settings_of(script.parse_args(["--quick", "--out", str(tmp_path), "--n-codes", "64"]))
    with pytest.raises(SystemExit, match="n_codes"):
        script.check_resumable(tmp_path, changed, fresh=False)
    script.check_resumable(tmp_path, changed, fresh=True)  # --fresh starts over


def test_fsm_precision_rejects_bad_model_shape(load_benchmark):
    with pytest.raises(SystemExit):
        load_benchmark("fsm_precision").parse_args(["--d-model", "100", "--n-heads", "3"])


@pytest.mark.parametrize("script", ["codebook_speed", "train_speed"])
def test_speed_benchmarks_quick_write_their_tables(script, tmp_path, capsys, load_benchmark):
    out = tmp_path / f"{script}.json"
    report = load_benchmark(script).main(["--quick", "--no-reference", "--out", str(out)])
    assert json.loads(out.read_text())["quick"] is True
    printed = capsys.readouterr().out
    assert "reference" in printed and str(out) in printed
    rows = report["results"]
    assert rows and all(
        all(t > 0 for t in row["times_s"])
        if isinstance(row["times_s"], list)
        else all(t > 0 for ts in row["times_s"].values() for t in ts)
        for row in rows.values()
    )


def test_cache_speed_quick_writes_its_table(tmp_path, capsys, load_benchmark):
    out = tmp_path / "cache_speed.json"
    report = load_benchmark("cache_speed").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["ratios"] == pytest.approx(report["ratios"])
    assert set(report["seconds"]) == {"plain", "cached", "cached_to_disk"}
    assert all(t > 0 for t in report["seconds"].values())
    # 64 codes fit a byte: one byte per token per codebook slot.
    assert {s["per_codebook_slot_over_k"] for s in report["storage"].values()} == {1.0}
    assert "target cached/plain" in capsys.readouterr().out


def test_fsm_precision_quick_and_full_runs_default_to_separate_folders(load_benchmark):
    script = load_benchmark("fsm_precision")
    assert script.parse_args([]).out.name == "fsm"
    assert script.parse_args(["--quick"]).out.name == "fsm_quick"
