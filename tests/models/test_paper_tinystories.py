"""benchmarks/paper_tinystories.py, offline: the paper's TinyStories steering mechanics on a model of its shape.

The fixture (benchmarks/reference/make_tinystories_fixture.py) is a random GPT-Neo saved by codebook-features 0.1.2
with the TinyStories codebook's layout (1 layer, 16 heads, a grouped codebook per head, k = 8), a word-level
tokenizer, and the code ids and logits the authors' own tutorial forcing gave on it for a small topic table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from bridge_models import skip_without_hooked
from safetensors.torch import load_file

from cbinterp.core.codebooks.interventions import intervene
from cbinterp.models.codebook_features import from_codebook_features

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "codebook_features"
FOLDER, BASE = FIXTURES / "neo1-tinystories", FIXTURES / "base-neo1"
EXPECTED = load_file(FIXTURES / "expected" / "neo1-tinystories.safetensors")
TABLE = json.loads((FIXTURES / "expected" / "neo1-tinystories.topics.json").read_text())
TOPICS = {topic: [(0, head, code) for head, code in pairs] for topic, pairs in TABLE.items()}
HOOK = "blocks.0.attn.hook_z.hook_codes"


@pytest.fixture
def pt(load_benchmark):
    skip_without_hooked()  # the script builds HookedTransformers
    return load_benchmark("paper_tinystories")


@pytest.fixture(scope="module")
def model():
    skip_without_hooked()
    return from_codebook_features(FOLDER, BASE, device="cpu")


# -- the forcing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("topic", ["", *TOPICS])
def test_forcing_gives_the_authors_codes_and_logits(pt, model, topic):
    """Their tutorial forcing on the same model: every head's ids slot by slot, at every position, prompt included."""
    with intervene(model, pt.forcing_hooks(model, TOPICS.get(topic, []))):
        logits, cache = model.run_with_cache(EXPECTED["tokens"], names_filter=HOOK)
    assert torch.equal(cache[HOOK], EXPECTED[f"codes.{topic}"])
    assert (logits - EXPECTED[f"logits.{topic}"]).abs().max().item() <= 1e-5


def test_the_nth_code_of_a_head_takes_slot_minus_n(pt):
    assert pt.slot_assignments([(0, 13, 5), (0, 13, 6), (0, 13, 7), (0, 2, 9)]) == {
        (0, 13): {-1: 5, -2: 6, -3: 7},
        (0, 2): {-1: 9},
    }
    # a head listed again after another starts over at -1 and overwrites, as their parser numbers the slots
    assert pt.slot_assignments([(0, 5, 6), (0, 5, 6), (0, 9, 1), (0, 5, 30)])[(0, 5)] == {-1: 30, -2: 6}
    for topic, codes in pt.TOPIC_CODES.items():  # the paper's table: one run per head, at most k = 8 codes
        for (layer, head), slots in pt.slot_assignments(codes).items():
            listed = [c for lay, h, c in codes if (lay, h) == (layer, head)]
            assert slots == {-(n + 1): code for n, code in enumerate(listed)} and len(listed) <= 8, (topic, head)


def test_every_position_is_forced_while_generating(pt, model, monkeypatch):
    """Cached generation runs the prompt once, then one position a step: each sees the forced slots."""
    seen = []
    forcing = pt.forcing_hooks

    def observed(model, codes):  # appended after the forcing, so it sees what the codebook sums
        return [*forcing(model, codes), (HOOK, lambda codes, hook: seen.append(codes.clone()))]

    monkeypatch.setattr(pt, "forcing_hooks", observed)
    out = pt.sample(model, "Once upon a time,", TOPICS["fire"], n=2, new_tokens=4, temperature=1.0, seed=0)
    prompt_len = 6  # BOS + "once upon a time ,"
    assert out.shape == (2, prompt_len + 4)
    assert sum(c.shape[1] for c in seen) == prompt_len + 3  # the last new token is never run
    codes = torch.cat(seen, dim=1)
    assert (codes[:, :, 2, -3:] == torch.tensor([11, 40, 9])).all() and (codes[:, :, 13, -1] == 7).all()


def test_check_codes_refuses_ids_the_model_lacks(pt, model):
    with pytest.raises(ValueError, match=r"code 4670 of head 13 .* 16 heads x 48 codes.*TinyStories codebook model"):
        pt.check_codes(model, pt.TOPIC_CODES)
    with pytest.raises(ValueError, match="9 codes for head 3 of layer 0, k = 8"):
        pt.check_codes(model, {"x": [(0, 3, c) for c in range(9)]})
    with pytest.raises(ValueError, match="layer 1 has no per-head codebook"):
        pt.check_codes(model, {"x": [(1, 3, 0)]})


# -- prompts, rule, averaging ---------------------------------------------------------------------------------
def test_prompts_start_with_bos(pt, model):
    bos = model.tokenizer.bos_token_id
    assert pt.prompt_tokens(model, "", 3).tolist() == [[bos]] * 3  # the empty prompt is BOS alone
    tokens = pt.prompt_tokens(model, "Once upon a time,", 2)
    assert tokens[:, 0].tolist() == [bos, bos] and model.tokenizer.decode(tokens[0, 1:]) == "once upon a time,"
    assert pt.PROMPTS == ["", "Once upon a time,", "Once there was a", "A long time ago,"]


def test_the_success_rule_is_their_regex(pt):
    assert pt.mentions("prince|crown|king|castle", "The KING slept.")
    assert pt.mentions("dragon", "a dragonfly")  # a substring counts, as in the tutorial
    assert pt.mentions("Baby", "the baby cried") and not pt.mentions("fire", "a fir tree")


def test_the_rate_averages_the_prompts_rates(pt):
    texts = {"": ["a fire", "none"], "Once": ["fire", "fire!", "fire.", "no"]}
    assert pt.topic_rate("fire", texts) == pytest.approx((1 / 2 + 3 / 4) / 2)  # not the pooled 4 / 6
    with pytest.raises(ValueError, match="every prompt"):
        pt.topic_rate("fire", {"": []})


def test_continuation_loss_stops_at_the_first_end_of_text(pt, model):
    eos = model.tokenizer.eos_token_id
    ids = torch.tensor([[eos, 2, 3, 16, eos, eos], [eos, 2, 3, 16, 17, 18]])
    losses = pt.continuation_loss(model, ids, prompt_len=3, eos=eos, bypass=True)
    from cbinterp.core.codebooks.attach import codebooks_bypassed

    with codebooks_bypassed(model):
        logp = torch.log_softmax(model(ids), dim=-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert losses == pytest.approx([nll[0, 2:4].mean().item(), nll[1, 2:5].mean().item()], rel=1e-5)


# -- the run and the table ------------------------------------------------------------------------------------
def test_run_scores_topics_and_prints_the_table(pt, model):
    report = pt.run(
        model, topics={"dragon": TOPICS["dragon"]}, prompts=["", "Once there was a"], samples=3, new_tokens=5, seed=1
    )
    entry = report["topics"]["dragon"]
    assert [len(texts) for texts in entry["samples"]["texts"].values()] == [3, 3]
    # the text after the BOS, prompt included (a leading BOS would decode as "<|endoftext|>")
    assert all(t.startswith("once there was a") for t in entry["samples"]["texts"]["Once there was a"]), entry[
        "samples"
    ]["texts"]
    assert entry["steered"] == pt.topic_rate("dragon", entry["samples"]["texts"])
    assert entry["baseline"] == pt.topic_rate("dragon", report["unsteered"]["samples"]["texts"])
    assert 0.0 <= entry["steered_readable"] <= entry["steered"] and (
        entry["paper_baseline"],
        entry["paper_steered"],
    ) == (0.025, 0.65)
    losses = [x for row in report["unsteered"]["samples"]["loss"].values() for x in row]
    assert report["unsteered"]["loss_cap"] == pytest.approx(float(np.nanquantile(losses, 0.95)))
    again = pt.run(
        model, topics={"dragon": TOPICS["dragon"]}, prompts=["", "Once there was a"], samples=3, new_tokens=5, seed=1
    )
    assert again["topics"]["dragon"]["samples"]["texts"] == entry["samples"]["texts"]  # seeded
    lines = pt.table(report).splitlines()
    assert (
        lines[0].split("  ")[0] == "topic" and "paper baseline" in lines[0] and lines[0].rstrip().endswith("readable")
    )
    assert lines[2].split()[:3] == ["dragon", "2.5", "65.0"] and len(lines) == 3


def test_table_marks_topics_the_paper_lacks(pt):
    entry = dict(paper_baseline=None, paper_steered=None, baseline=0.1, steered=0.5, steered_readable=0.25)
    assert pt.table({"topics": {"war": entry}}).splitlines()[2].split() == ["war", "-", "-", "10.0", "50.0", "25.0"]


# -- finding the model ----------------------------------------------------------------------------------------
def test_hub_names_offline_name_the_fix(pt, tmp_path, no_network):
    with pytest.raises(
        FileNotFoundError, match=r"neither a local folder nor in the Hugging Face cache.*--codebook.*--download"
    ):
        pt.resolve(pt.CODEBOOK, "codebook model", cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"Could not download .*pass their folders as --base and --codebook"):
        pt.resolve(pt.BASE, "base model", download=True, cache_dir=tmp_path)
    assert pt.resolve(str(FOLDER), "codebook model") == FOLDER


def test_main_on_local_folders_refuses_a_model_without_the_papers_codes(pt, tmp_path, no_network):
    with pytest.raises(ValueError, match="TinyStories codebook model"):
        pt.main(["--base", str(BASE), "--codebook", str(FOLDER), "--samples", "1", "--out", str(tmp_path)])


def test_main_exits_with_the_fix_for_a_missing_folder(pt, tmp_path, no_network):
    with pytest.raises(SystemExit, match="--download"):
        pt.main(["--base", str(tmp_path / "absent"), "--out", str(tmp_path)])


def test_main_on_local_folders_prints_and_writes_the_report(pt, tmp_path, no_network, monkeypatch, capsys):
    monkeypatch.setattr(pt, "TOPIC_CODES", TOPICS)  # ids the fixture holds, in place of the paper's
    argv = ["--base", str(BASE), "--codebook", str(FOLDER), "--samples", "2", "--new-tokens", "3", "--out"]
    report = pt.main([*argv, str(tmp_path), "--topics", "dragon", "fire"])
    printed = capsys.readouterr().out
    assert "paper baseline" in printed and f"wrote {tmp_path / 'results.json'}" in printed
    written = json.loads((tmp_path / "results.json").read_text())
    assert list(written["topics"]) == ["dragon", "fire"] == list(report["topics"])
    assert written["settings"]["prompts"] == pt.PROMPTS and written["settings"]["samples_per_prompt"] == 2
    assert written["settings"]["loss_scored_by"] == "codebook model, codebooks bypassed"  # base-neo1 has no weights


@pytest.mark.needs_hooked  # lm_steering and the paper's script build HookedTransformers
def test_lm_steering_forwards_paper_tinystories(load_benchmark, tmp_path, no_network):
    steering = load_benchmark("lm_steering")
    with pytest.raises(SystemExit, match="--download"):  # paper_tinystories' own check, reached through lm_steering
        steering.main(["--paper-tinystories", "--base", str(tmp_path / "absent"), "--out", str(tmp_path)])
