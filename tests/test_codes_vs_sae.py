"""benchmarks/codes_vs_sae.py in its quick mode: both sides measured by the same rules, everything written."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

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
    steering = results["steering"]
    assert set(steering["sides"]) == {"code", *bench.KINDS}
    sources = set(steering["sides"]["code"]["per_source"])
    assert len(sources) >= 3
    for record in steering["sides"].values():  # every side: the same sources, prompts, seeds and candidates
        assert set(record["per_source"]) == sources and math.isfinite(record["loss_cap"])
        for e in record["per_source"].values():
            assert e["unsteered"]["n"] == steering["samples_per_condition"]
            if e["steered"] is not None:
                assert e["steered"]["n"] == steering["samples_per_condition"]
                assert 0.0 <= e["steered"]["rate_readable"] <= e["steered"]["rate"] <= 1.0
                assert {k.split("/")[0].replace("-ratio", "") for k in e["dev_sweep"]} <= {"best", "top"}
                assert {int(k.split("/")[1]) for k in e["dev_sweep"]} <= set(steering["strengths_tried"])
                assert all(f in sites for f in e["forced"])
    assert any(e["steered"] for e in steering["sides"]["topk"]["per_source"].values())
    out = capsys.readouterr().out
    assert "TopK SAE" in out and "code vs topk" in out

    # --reuse --steering-only: the saved SAEs, only the steering rewritten, everything else kept
    again = bench.main(["--quick", "--out", str(tmp_path), "--no-progress", "--max-chars", "8000", "--reuse",
                        "--steering-only", "--steer-kinds", "topk"])  # fmt: skip
    rewritten = json.loads((tmp_path / "results.json").read_text())
    assert rewritten["probes"] == on_disk["probes"] and rewritten["training"] == on_disk["training"]
    assert set(rewritten["steering"]["sides"]) == {"code", "topk"}
    assert rewritten["steering"]["sides"]["topk"]["per_source"].keys() == sources
    # the same SAEs, seeds and rule: the same steering as the first run
    for source in sources:
        first, second = (
            steering["sides"]["topk"]["per_source"][source],
            again["steering"]["sides"]["topk"]["per_source"][source],
        )
        assert first.get("forced") == second.get("forced") and first["unsteered"] == second["unsteered"]
    assert on_disk["differences"] == bench.DIFFERENCES
    summary = results["probes"]["features"]["summary"]
    for side in bench.SIDES:
        v = summary[side]
        assert v["over_neuron"] == pytest.approx(v["precision_b"] / v["neuron_precision_b"] - 1)
    assert "plotly" in (tmp_path / "figure.html").read_text()


def test_forced_latents_scale_by_slots_from_the_last_position(load_benchmark):
    bench = load_benchmark("codes_vs_sae")
    typical = {"blocks.0.attn.hook_z": torch.arange(2 * 16, dtype=torch.float32).view(2, 16) + 1.0}
    site = "blocks.0.attn.hook_z"

    def apply(latents, n_slots):
        x = torch.zeros(1, 3, 2, 16)
        for name, fn in bench.forced_latents({site: latents}, n_slots, typical)["hooks"]:
            assert name == f"{site}.hook_latents"
            x = fn(x, SimpleNamespace(name=name))
        return x

    best = apply(torch.tensor([[3], [5]]), 2)  # one latent per head in 2 slots: twice its typical value
    assert best[0, -1, 0, 3] == 2 * typical[site][0, 3] and best[0, -1, 1, 5] == 2 * typical[site][1, 5]
    assert best[0, :-1].abs().sum() == 0 and best[0, -1].count_nonzero() == 2  # only the last position, those two
    top = apply(torch.tensor([[3, 4], [5, 6]]), 2)  # two latents per head, one slot each
    assert top[0, -1, 0, 4] == typical[site][0, 4] and top[0, -1, 1, 6] == typical[site][1, 6]


def test_steering_only_needs_reuse(load_benchmark):
    bench = load_benchmark("codes_vs_sae")
    with pytest.raises(SystemExit):
        bench.parse_args(["--steering-only", "--codebook-model", "x", "--baseline-model", "y"])
