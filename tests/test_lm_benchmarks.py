"""Quick modes of the language-model analysis benchmarks (lm_probes, lm_steering) on a tiny codebook LM trained
here in seconds on corpus text (the shipped model is not needed)."""

from __future__ import annotations

import json

import pytest
from tiny_models import make_model

import cbinterp
from cbinterp.tasks.text import TextBatches, attach_tokenizer, save_tokenizer, train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A folder as `load_pretrained` reads it (model/ + tokenizer/), and a baseline folder without codebooks."""
    from cbinterp.tasks.corpus import load_corpus

    root = tmp_path_factory.mktemp("tiny_lm")
    texts = [d.text[:4000] for d in load_corpus(split="train")[::40]]
    tok = train_bpe_tokenizer(texts, vocab_size=512)
    model = attach_tokenizer(make_model(seed=0, n_layers=1, n_heads=2, d_vocab=len(tok), n_ctx=64), tok)
    batches = TextBatches.from_texts(texts, tok, seq_len=64, batch_size=8, seed=0)
    cbinterp.train(model, batches, cbinterp.TrainConfig(steps=30, lr=3e-3, progress=False))
    for name, with_codebooks in (("base", False), ("lm", True)):
        if with_codebooks:
            cbinterp.attach_codebooks(model, sites=("attn", "mlp"), n_codes=32, k=4)
            cbinterp.train(model, batches, cbinterp.TrainConfig(steps=10, lr=1e-3, progress=False))
        cbinterp.save(model, root / name / "model")
        save_tokenizer(tok, root / name / "tokenizer")
    return root / "lm", root / "base"


@pytest.mark.slow
def test_lm_probes_quick(tiny_lm, tmp_path, load_benchmark, capsys):
    lm, _ = tiny_lm
    results = load_benchmark("lm_probes").main(["--quick", "--model", str(lm), "--out", str(tmp_path), "--no-progress"])
    on_disk = json.loads((tmp_path / "results.json").read_text())  # strict JSON
    head = results["headline"]
    numbers = {key: v for key, v in head.items() if isinstance(v, float)}
    assert {key: on_disk["headline"][key] for key in numbers} == pytest.approx(numbers)
    assert on_disk["headline"]["features_excluded"] == head["features_excluded"]
    assert head["n_features"] >= 8
    for key in ("code_precision_b_mean", "neuron_precision_b_mean", "code_precision_a_mean"):
        assert 0.0 <= head[key] <= 1.0
    rows = results["features"]
    assert {r["feature_name"] for r in rows} <= set(results["settings"]["features"])
    for r in on_disk["features"]:  # MLP codebooks (and features without a code) have no head: null, not 0
        no_head = r["code"] < 0 or r["codebook"].endswith("hook_mlp_out")
        assert (r["head"] is None) == no_head and (no_head or isinstance(r["head"], int))
    hooks = set(results["settings"]["neuron_hooks"])
    assert {"blocks.0.mlp.hook_post", "blocks.0.attn.hook_z.hook_input", "blocks.0.hook_mlp_out.hook_input"} == hooks
    for r in rows:
        assert 0.0 <= r["precision_b"] <= 1.0 and 0.0 <= r["neuron_best_precision_b"] <= 1.0
        assert r["neuron_best_hook"] in hooks or r["code"] < 0
    assert "plotly" in (tmp_path / "figure.html").read_text()
    pages = list((tmp_path / "contexts").glob("*.html"))
    assert pages and len(pages) == sum(r["code"] >= 0 for r in rows)
    assert "Held-out half B" in capsys.readouterr().out


@pytest.mark.slow
def test_lm_steering_quick(tiny_lm, tmp_path, load_benchmark, capsys):
    lm, base = tiny_lm
    args = ["--quick", "--model", str(lm), "--baseline", str(base), "--out", str(tmp_path)]
    results = load_benchmark("lm_steering").main(args)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["headline"]["n_meeting_target"] == results["headline"]["n_meeting_target"]
    assert results["headline"]["samples_per_condition"] == 4  # 2 prompts x 1 seed x 2 rows
    for topic in ("war", "religion"):
        entry = results["topics"][topic]
        assert entry["unsteered"]["n"] == 4
        assert entry["prompted"]["n"] == 4  # as many samples continuing the topic sentence
        assert 0.0 <= entry["prompted"]["rate"] <= 1.0
        if entry["steered"] is not None:
            steered = entry["steered"]
            assert 0.0 <= steered["rate_readable"] <= steered["rate_excluding_repetitive"] <= steered["rate"] <= 1.0
            assert (
                entry["target"] in ("word", "before_word")
                and entry["n_slots"] in results["headline"]["strengths_tried"]
            )
            assert entry["steered"]["baseline_loss"] > 0
            assert len(entry["samples"]) == 4
        rule = entry["paper_rule"]  # the paper's window-level rule beside the token-level one
        assert set(rule["n_pass"]) == {"0.5", "0.3"} and rule["n_pass"]["0.5"] <= rule["n_pass"]["0.3"]
        assert rule["windows"]["topical"] + rule["windows"]["elsewhere"] <= rule["windows"]["windows"]
        if rule["steered"] is not None:
            assert rule["steered"]["n"] == 4 and rule["n_slots"] in results["headline"]["strengths_tried"]
    assert "plotly" in (tmp_path / "figure.html").read_text()
    check_sources(results, on_disk)
    out = capsys.readouterr().out
    assert "Share of samples mentioning the topic" in out
    assert "The paper's window-level rule" in out and "Source steering" in out


def check_sources(results, on_disk):
    """The source-steering part of a quick run: every source judged by the classifier, its codes and slots."""
    sources = results["sources"]
    assert on_disk["sources"]["sources_meeting_target"] == sources["sources_meeting_target"]
    acc = sources["classifier"]["heldout_accuracy"]
    assert 0.0 <= acc["overall"] <= 1.0 and acc["n_words"] >= 5
    assert set(acc["per_label"]) == {"austen", "bible", "brown", "lee", "wikipedia"}
    assert set(sources["per_source"]) <= set(acc["per_label"]) and len(sources["per_source"]) >= 4
    for entry in sources["per_source"].values():
        assert entry["unsteered"]["n"] == 4 and entry["windows"] > 0
        assert entry["prompted"]["n"] == 4 and 0.0 <= entry["prompted"]["rate"] <= 1.0  # the ceiling
        assert entry["best_ratio"] and all(row["active_in"] >= 0.02 for row in entry["best_ratio"])
        assert entry["best"] and all(row["active_in"] > 0 for row in entry["best"])
        if entry["steered"] is not None:
            s = entry["steered"]
            assert 0.0 <= s["rate_readable"] <= s["rate"] <= 1.0
            assert entry["n_slots"] in results["headline"]["strengths_tried"] and len(entry["samples"]) == 4
            assert entry["kind"] in ("best", "top", "best-ratio", "top-ratio") and entry["forced"]
            assert sum(entry["labels_of_steered"].values()) == 4


@pytest.mark.slow
def test_lm_steering_sources_only(tiny_lm, tmp_path, load_benchmark):
    lm, base = tiny_lm
    args = ["--quick", "--sources", "--model", str(lm), "--baseline", str(base), "--out", str(tmp_path)]
    results = load_benchmark("lm_steering").main(args)
    assert results["topics"] == {} and results["settings"]["topics"] == {}
    check_sources(results, json.loads((tmp_path / "results.json").read_text()))


def test_lm_steering_is_deterministic(tiny_lm, tmp_path, load_benchmark):
    """Same seeds, same samples: the unsteered texts of two runs agree."""
    lm, base = tiny_lm
    script = load_benchmark("lm_steering")
    args = ["--quick", "--topics", "war", "--model", str(lm), "--baseline", "bypass"]
    a = script.main([*args, "--out", str(tmp_path / "a")])
    b = script.main([*args, "--out", str(tmp_path / "b")])
    assert [s["text"] for s in a["unsteered_samples"]] == [s["text"] for s in b["unsteered_samples"]]
    assert a["topics"]["war"]["codes"] == b["topics"]["war"]["codes"]
    assert set(a["topics"]["war"]["codes"]) == {"n_topic_tokens", "word", "before_word"}
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())["topics"]["war"]["codes"]
    for row in on_disk["word"] + on_disk["before_word"]:  # the MLP codebook's rows: head null, not 0
        assert (row["head"] is None) == row["codebook"].endswith("hook_mlp_out")


def test_benchmark_json_writes_missing_heads_as_null(tmp_path):
    import pandas as pd

    from cbinterp.reporting import write_json

    table = pd.DataFrame({"codebook": ["mlp", "attn"], "head": pd.array([pd.NA, 2], dtype="Int64")})
    data = {"rows": table.to_dict(orient="records"), "head": pd.NA, "heads": list(table["head"])}
    write_json(tmp_path / "out.json", data)
    assert json.loads((tmp_path / "out.json").read_text()) == {
        "rows": [{"codebook": "mlp", "head": None}, {"codebook": "attn", "head": 2}],
        "head": None,
        "heads": [None, 2],
    }


def test_lm_steering_rejects_unknown_topic(load_benchmark):
    with pytest.raises(KeyError, match="known topics"):
        load_benchmark("lm_steering").parse_args(["--topics", "dragons", "--model", "x"])
