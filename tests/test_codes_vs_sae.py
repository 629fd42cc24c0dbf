"""benchmarks/codes_vs_sae.py in its quick mode: both sides measured by the same rules, everything written."""

from __future__ import annotations

import json
import math

import pytest

from cbinterp.dictionaries.sae import load_sae, read_sae_record

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_codes_vs_sae_quick(tmp_path, load_benchmark, capsys):
    bench = load_benchmark("codes_vs_sae")
    results = bench.main(["--quick", "--out", str(tmp_path), "--no-progress", "--steps", "8", "--max-chars", "8000"])
    on_disk = json.loads((tmp_path / "results.json").read_text())  # strict JSON
    assert on_disk["settings"] == json.loads(json.dumps(results["settings"]))
    sites = results["settings"]["sites"]
    assert sites == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    for group, features in (("features", bench.FEATURES), ("hidden_features", bench.HIDDEN_FEATURES)):
        rows = results["probes"][group]["rows"]
        names = [r["feature_name"] for r in rows["code"]]
        assert set(names) <= set(features) and len(names) >= len(features) // 2
        for side in bench.SIDES:  # the same features, chosen and scored by the same rule on every side
            assert [r["feature_name"] for r in rows[side]] == names
            for r in rows[side]:
                assert 0.0 <= r["precision_b"] <= 1.0 and 0.0 <= r["neuron_best_precision_b"] <= 1.0
                assert r["code"] < 0 or (r["codebook"] in sites and 0 <= r["head"] < 4 and r["code"] < 1024)
                hook = r["neuron_best_hook"]
                assert r["code"] < 0 or hook.endswith(("mlp.hook_post", "attn.hook_z.hook_input"))
    metrics = results["metrics"]
    assert metrics["code"]["active_per_token_head"] == 8.0  # a codebook always picks k codes
    assert 0 < metrics["topk"]["active_per_token_head"] <= 8.0  # TopK: at most k, ReLU may zero some
    assert metrics["l1"]["active_per_token_head"] <= 64.0
    for side in bench.SIDES:
        assert math.isfinite(metrics[side]["loss"]) and math.isfinite(metrics[side]["fvu_mean"])
        assert len(metrics[side]["fvu"]) == 2 and all(len(v) == 4 for v in metrics[side]["fvu"].values())
        assert 0.0 <= metrics[side]["dead"]["fraction"] <= 1.0
    assert results["cost"]["topk"]["parameters_per_site"] == 2 * 4 * 1024 * 32 + 4 * 1024 + 4 * 32
    for kind in bench.KINDS:
        for site in sites:
            path = tmp_path / "saes" / kind / site
            sae = load_sae(path)
            assert sae.cfg.architecture == kind and sae.cfg.n_latents == 1024 and sae.cfg.groups == 4
            assert read_sae_record(path)["extra"]["site"] == site
    assert results["steering"]["status"].startswith("not run")
    assert on_disk["differences"] == bench.DIFFERENCES
    summary = results["probes"]["features"]["summary"]
    for side in bench.SIDES:
        v = summary[side]
        assert v["over_neuron"] == pytest.approx(v["precision_b"] / v["neuron_precision_b"] - 1)
    assert "plotly" in (tmp_path / "figure.html").read_text()
    assert "code vs topk" in capsys.readouterr().out
