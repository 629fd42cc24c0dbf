"""The FSM and language-model benchmarks on either class: a saved bridge is measured as a saved HookedTransformer is;
a script that trains from a config says, on transformer-lens 4, what to run instead."""

from __future__ import annotations

import json

import pytest
from bridge_models import make_any

import cbinterp
from cbinterp.core import tl_compat as tc
from cbinterp.tasks.fsm import FSM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(tc.HAS_HOOKED, reason="transformer-lens 3 builds the HookedTransformer these scripts train")
@pytest.mark.parametrize(
    "script, args, match",
    [
        (
            "lm_train",
            ["--quick"],
            r"lm_train\.py trains from a config.*transformer-lens>=3\.9,<4.*lm_probes\.py --model",
        ),
        (
            "fsm_precision",
            ["--quick"],
            r"fsm_precision\.py trains.*transformer-lens>=3\.9,<4.*fsm_intervention\.py --from",
        ),
        ("fsm_intervention", ["--quick"], r"No model in .*: training one.*transformer-lens>=3\.9,<4"),
    ],
)
def test_a_script_that_trains_from_a_config_names_the_fix(script, args, match, load_benchmark, tmp_path):
    args = [*args, "--out", str(tmp_path / "out")] + (
        ["--from", str(tmp_path / "none")] if script == "fsm_intervention" else []
    )
    with pytest.raises(SystemExit, match=match):
        load_benchmark(script).main(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["hooked", "bridge_neox", "bridge_gpt2"])
def test_fsm_intervention_measures_a_saved_model_of_either_class(kind, load_benchmark, tmp_path):
    """A model of the tests' shape (11 tokens, 16 positions), untrained: the run's mechanics, not its numbers."""
    model = cbinterp.attach_codebooks(make_any(kind, tmp_path / "hf"), ["attn", "mlp"], n_codes=8)
    source = tmp_path / "source"
    cbinterp.save(model, source / "model")
    FSM.random(12, 2, 10, seed=0).save(
        source / "fsm.json"
    )  # two digits a state: the state+digit swap has one to decode
    args = ["--from", str(source), "--out", str(tmp_path / "out"), "--pairs", "8", "--device", "cpu"]
    results = load_benchmark("fsm_intervention").main(args)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(on_disk) >= {"settings"} and results["settings"]["pairs"] == 8


@pytest.mark.slow
@pytest.mark.skipif(not tc.BRIDGE_SUPPORTED, reason=f"no TransformerBridge support on transformer-lens {tc.TL_VERSION}")
def test_lm_probes_measures_a_saved_bridge(load_benchmark, tmp_path, capsys):
    """A bridge of a tiny GPT-NeoX on a corpus tokenizer, codebooks trained a few steps, saved as `load_pretrained`
    reads a folder (model/ + tokenizer/): lm_probes --model runs on it as on a HookedTransformer."""
    import torch
    import transformers
    from bridge_models import boot

    from cbinterp.tasks.corpus import load_corpus
    from cbinterp.tasks.text import TextBatches, save_tokenizer, train_bpe_tokenizer

    texts = [d.text[:4000] for d in load_corpus(split="train")[::40]]
    tok = train_bpe_tokenizer(texts, vocab_size=512)
    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    model = cbinterp.attach_codebooks(boot(tmp_path / "hf"), sites=("attn", "mlp"), n_codes=32, k=4)
    batches = TextBatches.from_texts(texts, tok, seq_len=64, batch_size=8, seed=0)
    cbinterp.train(model, batches, cbinterp.TrainConfig(steps=10, lr=1e-3, progress=False))
    cbinterp.save(model, tmp_path / "lm" / "model")
    save_tokenizer(tok, tmp_path / "lm" / "tokenizer")
    args = ["--quick", "--model", str(tmp_path / "lm"), "--out", str(tmp_path / "out"), "--no-progress"]
    results = load_benchmark("lm_probes").main(args)
    head = results["headline"]
    assert head["n_features"] >= 1
    for key in ("code_precision_b_mean", "neuron_precision_b_mean"):
        assert 0.0 <= head[key] <= 1.0
    assert {"blocks.0.attn.hook_z.hook_input", "blocks.0.hook_mlp_out.hook_input"} <= set(
        results["settings"]["neuron_hooks"]
    )
    assert "Held-out half B" in capsys.readouterr().out


def test_tl_bridge_speed_times_this_environments_class_and_merges_the_other(load_benchmark, tmp_path, capsys):
    speed = load_benchmark("tl_bridge_speed")
    mine, other = f"tl{tc.TL_MAJOR}", f"tl{3 if tc.TL_MAJOR >= 4 else 4}"
    first = speed.main(["--quick", "--out", str(tmp_path)])
    part = first["runs"][mine]
    kind = "hooked" if tc.HAS_HOOKED else "bridge"
    assert part["class"] == ("HookedTransformer" if tc.HAS_HOOKED else "TransformerBridge")
    assert {kind, f"{kind}_no_codebooks"} <= set(part["rows"]) and (part["fast_kernel_layers"] > 0) == tc.HAS_HOOKED
    assert all(row["median_s"] > 0 and len(row["times_s"]) == 2 for row in part["rows"].values())
    assert "merged.json" not in {p.name for p in tmp_path.iterdir()}  # nothing to merge yet
    theirs = json.loads((tmp_path / f"{mine}.json").read_text())  # stand-in for the other environment's run
    theirs["rows"] = {("bridge" if tc.HAS_HOOKED else "hooked"): {**part["rows"][kind], "median_s": 1.0}}
    (tmp_path / f"{other}.json").write_text(json.dumps(theirs))
    merged = speed.main(["--quick", "--out", str(tmp_path)])
    assert set(merged["runs"]) == {"tl3", "tl4"} and merged["bridge_over_hooked"] > 0
    assert json.loads((tmp_path / "merged.json").read_text())["bridge_over_hooked"] == merged["bridge_over_hooked"]
    assert "bridge step time / HookedTransformer step time" in capsys.readouterr().out
