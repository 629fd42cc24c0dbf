"""The codebook LM recipe on a tiny model and the generated corpus: phases, evaluation, resume, loading by path."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from bridge_models import skip_without_hooked

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cbinterp
from cbinterp.core.storage.manifest import ResumeWarning
from cbinterp.core.training.train import TrainConfig
from cbinterp.pretrained import load_pretrained, pretrained_card
from cbinterp.recipes.lm import (
    LMRecipe,
    build_model,
    evaluate,
    finetune_baseline,
    heldout_sequences,
    run_lm,
    train_baseline,
    train_batches,
    train_codebook_model,
    train_config,
)
from cbinterp.tasks.text import load_tokenizer
from cbinterp.tasks.toytext import generate_corpus

TINY = LMRecipe.quick(
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_mlp=64,
    vocab_size=300,
    seq_len=32,
    batch_size=8,
    base_steps=40,
    codebook_steps=12,
    n_codes=16,
    k=2,
    kmeans_sequences=16,
    checkpoint_every=10,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    skip_without_hooked()  # the recipe builds its HookedTransformer from a config
    docs = generate_corpus(300, seed=0)
    out = tmp_path_factory.mktemp("lm")
    results = run_lm(TINY, docs[:280], docs[280:], out, device="cpu", progress=False, log=lambda _: None)
    return out, results, docs


def test_baseline_loss_decreases(tiny_run):
    _, results, _ = tiny_run
    losses = results["phases"]["baseline"]["train_losses_every_10"]
    assert losses[-1] < losses[0] - 1.0
    assert results["eval"]["baseline"]["loss"] < math.log(results["data"]["vocab_size"])


def test_codebook_model_has_a_codebook_per_attention_layer(tiny_run):
    out, results, _ = tiny_run
    model = load_pretrained(out / "codebook", device="cpu")
    codebooks = cbinterp.get_codebooks(model)
    assert set(codebooks) == {f"blocks.{l}.attn.hook_z" for l in range(TINY.n_layers)}
    for codebook in codebooks.values():
        assert (codebook.cfg.groups, codebook.n_codes, codebook.k, codebook.cfg.loss) == (TINY.n_heads, 16, 2, "aeloss")
    for phase in ("baseline", "finetuned"):
        assert not cbinterp.get_codebooks(load_pretrained(out / phase, device="cpu"))


def test_finetuned_baseline_trains_as_many_steps_as_the_codebook_model(tiny_run):
    _, results, _ = tiny_run
    phases = results["phases"]
    assert phases["finetuned"]["steps"] == phases["codebook"]["steps"] == TINY.codebook_steps
    assert phases["finetuned"]["tokens"] == phases["codebook"]["tokens"]
    b, c = train_config(TINY, "codebook"), train_config(TINY, "finetuned")
    assert (b.steps, b.lr, b.warmup_steps, b.schedule) == (c.steps, c.lr, c.warmup_steps, c.schedule)


def test_train_config_is_each_phases_own():
    """Warmup as set (not capped at a tenth of the steps), the recipe's weight decay and checkpoint interval, and
    a seed per phase: the settings the LM trained with before its phases ran through `run_recipe`."""
    saved = dict(checkpoint_every=10, checkpoint_dir="ckpt", progress=False)
    expected = {
        "baseline": TrainConfig(steps=40, lr=TINY.base_lr, warmup_steps=10, seed=0, **saved),
        "codebook": TrainConfig(steps=12, lr=TINY.codebook_lr, warmup_steps=5, seed=1, **saved),
        "finetuned": TrainConfig(steps=12, lr=TINY.codebook_lr, warmup_steps=5, seed=2, **saved),
    }
    for phase, cfg in expected.items():
        assert train_config(TINY, phase, "ckpt", progress=False) == cfg
        assert train_config(TINY, phase).checkpoint_every == 0 and train_config(TINY, phase).checkpoint_dir is None
    training = TINY.codebook_recipe()
    assert [p.name for p in training.all_phases()] == ["baseline", "codebook", "finetuned"]
    assert training.phases[0].stream == training.controls[0].stream != training.warm.stream
    with pytest.raises(ValueError, match="Unknown phase"):
        train_config(TINY, "control_codebook")


def test_the_phase_functions_train_what_run_lm_trains(tiny_run):
    out, _, docs = tiny_run
    tokenizer = load_tokenizer(out / "tokenizer")
    model = build_model(TINY, tokenizer, "cpu")
    batches = train_batches(TINY, docs[:280], tokenizer, model)
    train_baseline(model, batches, TINY, progress=False)
    finetuned = copy.deepcopy(model)
    finetune_baseline(finetuned, batches, TINY, progress=False)
    train_codebook_model(model, batches, TINY, progress=False)
    for phase, trained in (("codebook", model), ("finetuned", finetuned)):
        saved = load_pretrained(out / phase, device="cpu").state_dict()
        here = trained.state_dict()
        assert saved.keys() == here.keys()
        assert all(torch.equal(saved[k], here[k]) for k in saved), phase


def test_results_hold_every_evaluation(tiny_run):
    _, results, _ = tiny_run
    ev = results["eval"]
    for key in ("baseline", "codebook", "codebook_bypassed", "finetuned"):
        assert math.isfinite(ev[key]["loss"]) and 0 <= ev[key]["accuracy"] <= 1
        assert ev[key]["n_tokens"] == results["data"]["heldout_predicted_tokens"]
    dead = ev["codebook"]["codebooks"]["blocks.0.attn.hook_z"]
    assert dead["n_codes_total"] == TINY.n_heads * 16 and len(dead["dead_fraction_per_head"]) == TINY.n_heads
    assert "codebooks" not in ev["codebook_bypassed"]  # bypassed codebooks pick no codes
    assert ev["codebook_at_init"]["loss"] > 0
    json.dumps(results, allow_nan=False)


def test_card_check_matches_a_recomputation(tiny_run):
    out, results, docs = tiny_run
    card = pretrained_card(out / "codebook")
    model = load_pretrained(out, device="cpu")  # the run folder opens its codebook model
    texts = docs[280:][: card["check"]["n_documents"]]
    again = evaluate(model, heldout_sequences(texts, model.tokenizer, card["recipe"]["seq_len"]), count_codes=False)
    assert again["loss"] == pytest.approx(card["check"]["loss"], abs=1e-4)
    assert card["heldout"]["loss"] == pytest.approx(results["eval"]["codebook"]["loss"])
    assert card["training_steps"] == {"baseline": TINY.base_steps, "codebook": TINY.codebook_steps}


def test_a_second_run_resumes_without_training(tiny_run):
    out, results, docs = tiny_run
    with pytest.warns(ResumeWarning):
        again = run_lm(TINY, docs[:280], docs[280:], out, device="cpu", progress=False, log=lambda _: None)
    assert all(again["phases"][p]["trained_by_earlier_run"] for p in ("baseline", "codebook", "finetuned"))
    assert again["phases"] == {p: r | {"trained_by_earlier_run": True} for p, r in results["phases"].items()}
    for key in ("baseline", "codebook", "finetuned"):
        assert again["eval"][key]["loss"] == pytest.approx(results["eval"][key]["loss"], abs=1e-6)


def test_evaluate_counts_dead_codes(tiny_run):
    out, _, docs = tiny_run
    model = load_pretrained(out / "codebook", device="cpu")
    rows = heldout_sequences(docs[280:], model.tokenizer, TINY.seq_len)
    result = evaluate(model, rows[:1])
    fired = {}

    def grab(codes, hook):
        fired[hook.name] = codes

    model.run_with_hooks(rows[:1], fwd_hooks=[("blocks.0.attn.hook_z.hook_codes", grab)])
    codes = fired["blocks.0.attn.hook_z.hook_codes"]  # (1, pos, heads, k): every position of the row counts
    alive = TINY.n_heads * 16 - result["codebooks"]["blocks.0.attn.hook_z"]["n_dead"]
    assert alive == sum(len(torch.unique(codes[0, :, h])) for h in range(TINY.n_heads))


def test_recipe_checks_its_settings():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        LMRecipe(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="aeloss"):
        LMRecipe(loss="l2")
    with pytest.raises(ValueError, match="k=9"):
        LMRecipe(n_codes=8, k=9)
    with pytest.raises(ValueError, match="LMRecipe.sites is empty"):
        LMRecipe(sites=())
    with pytest.raises(ValueError, match="LMRecipe.base_steps must be an int >= 0"):
        LMRecipe(base_steps=-1)
    with pytest.raises(ValueError, match="LMRecipe.k must be an int >= 1, got True"):
        LMRecipe(k=True)  # a bool is not a count (FinetuneRecipe refused it already; the two share their checks)
    assert LMRecipe.from_dict(TINY.to_dict()) == TINY
    assert LMRecipe.paper().loss == "aeloss" and LMRecipe.paper().k > 1
