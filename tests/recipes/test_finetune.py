"""Fine-tuning codebooks into a pretrained model (`finetune_codebooks`): phases, control, evaluation, resume, and the
script on the shipped baseline exported as a Hugging Face folder."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from tiny_models import make_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cbinterp.core.codebooks.attach import get_codebooks
from cbinterp.core.storage.manifest import ResumeWarning
from cbinterp.core.training import loop
from cbinterp.recipes.finetune import FinetuneRecipe, finetune_codebooks
from cbinterp.tasks.text import attach_tokenizer, train_bpe_tokenizer
from cbinterp.tasks.toytext import generate_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = FinetuneRecipe.quick(n_codes=16, k=4, steps=6, batch_size=4, seq_len=16, eval_windows=6, kmeans_sequences=8)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return generate_corpus(120, seed=0)


@pytest.fixture(scope="module")
def pretrained(texts):
    """A tiny model with a tokenizer, standing in for a pretrained one."""
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    return attach_tokenizer(make_model(d_vocab=len(tok), n_ctx=32), tok)


def run(model, texts, recipe=QUICK, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("log", lambda message: None)
    return finetune_codebooks(model, texts, recipe, **kwargs)


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_checks_its_settings_and_round_trips():
    assert FinetuneRecipe.from_dict(QUICK.to_dict()) == QUICK
    phase = FinetuneRecipe(codebook_lr=2e-3, model_lr_factor=0.5).codebook_recipe(["blocks.0.hook_mlp_out"]).phases[0]
    assert (phase.lr, phase.codebook_lr) == (1e-3, 2e-3)  # the model learns at codebook_lr * model_lr_factor
    for bad, match in [
        (dict(model_lr_factor=0), "model_lr_factor must be a number > 0 .*freeze_model=True"),
        (dict(k=9, n_codes=8), "k=9 is larger than n_codes=8"),
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(warmup_steps=600), "warmup_steps=600 is more than steps=500"),
        (dict(sites=()), "sites is empty"),
        (dict(loss="l2"), "Unknown codebook loss"),
        (dict(prepend_bos="no"), "prepend_bos must be None"),
    ]:
        with pytest.raises(ValueError, match=match):
            FinetuneRecipe(**bad)
    with pytest.raises(ValueError, match="Unknown FinetuneRecipe settings"):
        FinetuneRecipe.from_dict({"lr": 1})


def test_finetune_trains_codebooks_and_a_control_on_the_same_steps(pretrained, texts, tmp_path):
    model = copy.deepcopy(pretrained)
    before = weights(model)
    result = run(model, texts, QUICK.replace(sites=("attn", "mlp"), layers=(1,)), out_dir=tmp_path)
    assert result.model is model
    assert list(get_codebooks(model)) == ["blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    assert not get_codebooks(result.control_model) and not get_codebooks(result.base_model)
    assert same(weights(result.base_model), before)  # the base model is the model as given
    assert not same(weights(result.control_model), before)  # the control was fine-tuned ...
    assert result.record["phases"]["control"]["steps"] == result.record["phases"]["codebook"]["steps"] == 6
    for key in ("base", "codebook_at_init", "codebook", "codebook_bypassed", "control"):
        assert math.isfinite(result.evals[key]["loss"]) and 0 <= result.evals[key]["accuracy"] <= 1
    assert result.evals["base"]["n_tokens"] == 6 * 15 and "dead_fraction" in result.evals["codebook"]
    gap = result.evals["codebook"]["loss"] - result.evals["control"]["loss"]
    assert result.gap == pytest.approx(gap) == result.comparison["codebook_minus_control_loss"]
    on_disk = json.loads((tmp_path / "results.json").read_text())  # strict JSON
    assert on_disk["comparison"]["codebook_minus_control_loss"] == pytest.approx(gap)
    assert on_disk["recipe"] == QUICK.replace(sites=("attn", "mlp"), layers=(1,)).to_dict()


def test_held_out_documents_are_never_trained_on(pretrained, texts):
    from cbinterp.recipes.finetune import _Split

    train = [d["text"] for d in _Split(texts, "text", 5, heldout=False)]
    heldout = [d["text"] for d in _Split(texts, "text", 5, heldout=True)]
    assert heldout == texts[::5] and train == [t for i, t in enumerate(texts) if i % 5]
    given = run(copy.deepcopy(pretrained), texts[:60], heldout=texts[60:])
    assert given.record["data"]["heldout_given"] and given.record["data"]["train_windows"] > 0
    with pytest.raises(TypeError, match="one-shot iterator"):
        run(copy.deepcopy(pretrained), iter(texts))


def test_held_out_windows_are_spread_over_the_held_out_text(pretrained, texts):
    from cbinterp.recipes.finetune import _heldout_windows
    from cbinterp.tasks.packing import pack_documents

    every = torch.stack(list(pack_documents(texts, pretrained.tokenizer, 16)))
    assert 60 * 16 > len(every) > 60  # the read cap (16 x eval_windows) holds them all
    rows = _heldout_windows(texts, pretrained.tokenizer, QUICK.replace(eval_windows=60), True, "text")
    assert torch.equal(rows, every[[i * len(every) // 60 for i in range(60)]])  # from the whole text, not its start
    few = _heldout_windows(texts[:3], pretrained.tokenizer, QUICK.replace(eval_windows=400), True, "text")
    assert torch.equal(few, torch.stack(list(pack_documents(texts[:3], pretrained.tokenizer, 16))))


def test_finetune_resumes_exactly_after_an_interruption(pretrained, texts, tmp_path, monkeypatch):
    whole = run(copy.deepcopy(pretrained), texts, out_dir=tmp_path / "whole")
    save = loop.save_checkpoint

    def interrupted(directory, *args, **kwargs):
        save(directory, *args, **kwargs)
        if "codebook" in str(directory) and args[2] == 3:  # (model, optimizer, step, ...)
            raise KeyboardInterrupt("stopped at step 3")

    monkeypatch.setattr(loop, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(pretrained), texts, out_dir=tmp_path / "resumed")
    monkeypatch.setattr(loop, "save_checkpoint", save)
    with pytest.warns(ResumeWarning):
        again = run(copy.deepcopy(pretrained), texts, out_dir=tmp_path / "resumed")
    assert again.record["resumed"] and again.record["phases"]["codebook"]["resumed_from"] == 3
    assert same(weights(again.model), weights(whole.model))
    assert same(weights(again.control_model), weights(whole.control_model))
    for key in ("codebook_at_init", "codebook", "control"):
        assert again.evals[key]["loss"] == pytest.approx(whole.evals[key]["loss"], abs=1e-6)
    # the codes' first evaluation is the first run's; on other held-out windows it is not reported
    other = run(copy.deepcopy(pretrained), texts, QUICK.replace(eval_windows=5), out_dir=tmp_path / "resumed")
    assert other.evals["codebook_at_init"] is None and other.evals["codebook"]["n_tokens"] == 5 * 15


def test_streaming_and_a_frozen_model_follow_the_models_bos_convention(pretrained, texts):
    model = copy.deepcopy(pretrained)
    model.cfg.default_prepend_bos = False  # as TransformerLens sets for Pythia
    before = weights(model)
    result = run(model, texts, QUICK.replace(streaming=True, freeze_model=True, sites=("mlp",)))
    assert result.record["prepend_bos"] is False and result.record["data"]["train_windows"] is None
    assert result.control_model is None and "control" not in result.evals
    assert result.gap == result.comparison["codebook_minus_base_loss"]
    trained = weights(model)
    assert same({n: trained[n] for n in before}, before)  # frozen: only the codebooks changed
    assert any(not torch.equal(cb.weight, torch.zeros_like(cb.weight)) for cb in get_codebooks(model).values())


def test_finetune_refuses_a_model_with_codebooks_or_without_a_tokenizer(pretrained, texts):
    import cbinterp

    with pytest.raises(ValueError, match="already has codebooks"):
        run(cbinterp.attach_codebooks(copy.deepcopy(pretrained), "mlp", n_codes=4), texts)
    with pytest.raises(ValueError, match="has no tokenizer"):
        run(make_model(d_vocab=300, n_ctx=32), texts)


@pytest.mark.slow
def test_finetune_script_on_the_exported_baseline(tmp_path, load_benchmark):
    """The shipped baseline, exported to a Hugging Face folder, fine-tuned from that folder; then resumed."""
    from cbinterp.models import to_hf
    from cbinterp.pretrained import BASELINE_MODEL, load_pretrained

    folder = to_hf(load_pretrained(BASELINE_MODEL, device="cpu"), tmp_path / "english-baseline-hf")
    script = load_benchmark("finetune_pretrained")
    args = ["--model", str(folder), "--data", "corpus", "--quick", "--out", str(tmp_path / "out"), "--no-progress"]
    results = script.main(args)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["comparison"] == pytest.approx(results["comparison"])
    # the sublayers that compute: the export's even layers hold attention, the odd ones the MLP (see to_hf)
    real = ["blocks.0.attn.hook_z", "blocks.2.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.3.hook_mlp_out"]
    assert on_disk["hook_names"] == real
    assert on_disk["prepend_bos"] is True  # the export records the baseline's convention
    for key in ("base", "codebook", "control"):
        assert math.isfinite(on_disk["eval"][key]["loss"])
    assert on_disk["eval"]["base"]["loss"] < 7  # the pretrained model, not a random one (ln 4096 = 8.3)
    with pytest.warns(ResumeWarning):
        again = script.main(args)  # every phase finished: resumed, nothing trained again
    assert again["resumed"] and again["phases"]["codebook"]["steps_this_run"] == 0
    assert again["eval"]["codebook"]["loss"] == pytest.approx(on_disk["eval"]["codebook"]["loss"], abs=1e-6)
