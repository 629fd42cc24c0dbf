"""benchmarks/lm_train.py --quick end to end (marked slow), and its settings check."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

import cbinterp

CORPUS = "english" if importlib.util.find_spec("cbinterp.tasks.corpus") else "toytext"


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.slow
def test_lm_train_quick_writes_results_and_models(tmp_path, load_benchmark, one_thread):
    results = load_benchmark("lm_train").main(["--quick", "--out", str(tmp_path), "--no-progress", "--corpus", CORPUS])
    on_disk = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN
    assert {"recipe", "data", "phases", "eval", "timings_s", "comparison", "corpus", "command", "paper"} <= set(on_disk)
    for key in ("baseline", "codebook", "codebook_bypassed", "finetuned"):
        assert {"loss", "accuracy", "n_tokens"} <= set(on_disk["eval"][key])
    for phase in ("baseline", "codebook", "finetuned"):
        assert on_disk["phases"][phase]["tokens"] > 0 and on_disk["phases"][phase]["tokens_per_s"] > 0
    assert on_disk["phases"]["codebook"]["steps"] == on_disk["phases"]["finetuned"]["steps"]
    assert _finite(on_disk)
    assert on_disk["eval"]["codebook"]["loss"] == pytest.approx(results["eval"]["codebook"]["loss"])
    model = cbinterp.load_pretrained(tmp_path, device="cpu")
    assert cbinterp.get_codebooks(model)
    assert model.to_string(model.to_tokens("Hello there.", prepend_bos=False)[0]) == "Hello there."


def test_lm_train_refuses_checkpoints_of_other_settings(tmp_path, load_benchmark):
    script = load_benchmark("lm_train")
    args = script.parse_args(["--quick", "--out", str(tmp_path)])
    script.check_resumable(tmp_path, script.settings_of(args), fresh=False)
    changed = script.settings_of(script.parse_args(["--quick", "--out", str(tmp_path), "--n-codes", "32"]))
    with pytest.raises(SystemExit, match="n_codes"):
        script.check_resumable(tmp_path, changed, fresh=False)
    script.check_resumable(tmp_path, changed, fresh=True)


def test_lm_train_rejects_bad_settings(load_benchmark):
    script = load_benchmark("lm_train")
    with pytest.raises(SystemExit):
        script.parse_args(["--d-model", "100", "--n-heads", "3"])
    with pytest.raises(SystemExit):
        script.parse_args(["--quick", "--ship"])
