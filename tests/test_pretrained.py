"""Shipped language models: listed, loaded by name offline, their cards' numbers reproduce; bad names and paths."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cbinterp
from cbinterp import pretrained
from cbinterp.pretrained import BASELINE_MODEL, DEFAULT_MODEL, list_pretrained, load_pretrained, pretrained_card


def test_unknown_name_lists_the_known_ones(tmp_path, monkeypatch):
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(json.dumps({"name": name}))
    monkeypatch.setattr(pretrained, "MODELS_DIR", tmp_path)
    assert set(list_pretrained()) == {"alpha", "beta"}
    with pytest.raises(ValueError, match="Unknown pretrained model 'gamma'.*alpha, beta"):
        load_pretrained("gamma")


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load_pretrained(tmp_path)


def test_exported_from_the_package():
    assert cbinterp.load_pretrained is load_pretrained and cbinterp.list_pretrained is list_pretrained


def test_shipped_models_are_listed_with_their_cards():
    listed = list_pretrained()
    assert {DEFAULT_MODEL, BASELINE_MODEL} <= set(listed)
    assert listed[DEFAULT_MODEL]["has_codebooks"] and not listed[BASELINE_MODEL]["has_codebooks"]
    card = pretrained_card(DEFAULT_MODEL)
    assert card["name"] == DEFAULT_MODEL and card["corpus"]["name"] == "english" and len(card["corpus"]["sha256"]) == 64
    assert card["heldout"]["loss"] > 0 and card["heldout_bypassed"]["loss"] > 0 and card["command"]


@pytest.fixture(scope="module")
def model(one_thread):
    return load_pretrained(DEFAULT_MODEL, device="cpu")


def test_shipped_model_loads_by_name_offline(model):
    text = "In March 1805 the king's army crossed the river, said Mr. Darcy; naïve café."
    tokens = model.to_tokens(text)
    assert int(tokens[0, 0]) == model.tokenizer.bos_token_id
    assert model.to_string(tokens[0, 1:]) == text
    out = model.generate("The war", max_new_tokens=8, do_sample=False, verbose=False)
    assert out.startswith("The war") and len(out) > len("The war")
    codebooks = cbinterp.get_codebooks(model)
    assert codebooks and all(name.endswith("attn.hook_z") for name in codebooks)


def test_shipped_model_reproduces_its_cards_check(model):
    from cbinterp.pretrained import heldout_documents
    from cbinterp.recipes.lm import evaluate, heldout_sequences

    card = pretrained_card(DEFAULT_MODEL)
    docs = heldout_documents(DEFAULT_MODEL)
    assert [d.id for d in docs[:8]] == card["corpus"]["heldout_ids_first"]
    check = card["check"]
    rows = heldout_sequences([d.text for d in docs[: check["n_documents"]]], model.tokenizer, card["recipe"]["seq_len"])
    again = evaluate(model, rows, count_codes=False)
    assert again["loss"] == pytest.approx(check["loss"], abs=2e-3)
    assert again["accuracy"] == pytest.approx(check["accuracy"], abs=2e-3)


def test_baseline_loads_without_codebooks():
    baseline = load_pretrained(BASELINE_MODEL, device="cpu")
    assert not cbinterp.get_codebooks(baseline)
    assert baseline.cfg.d_vocab == load_pretrained(DEFAULT_MODEL, device="cpu").cfg.d_vocab


def _swap_two_ids(tokenizer_json, a: int, b: int) -> None:
    """Swap the ids of two vocabulary entries of a tokenizer.json (same size, another tokenizer)."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    ta, tb = (next(t for t, i in vocab.items() if i == n) for n in (a, b))
    vocab[ta], vocab[tb] = b, a
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_one_tokenizer_the_checked_one(model, tmp_path):
    import shutil

    import torch

    shipped = pretrained.pretrained_path(DEFAULT_MODEL)
    assert sorted(p.name for p in shipped.iterdir()) == ["card.json", "model"]  # no second, unchecked copy
    copy = tmp_path / "m"
    shutil.copytree(shipped, copy)
    text = "The king sat."
    a, b = (int(i) for i in model.to_tokens(text)[0, 1:3])
    (copy / "tokenizer").mkdir()  # a copy beside the model, as lm_train.py writes one, edited
    shutil.copy(copy / "model" / "tokenizer.json", copy / "tokenizer" / "tokenizer.json")
    shutil.copy(copy / "model" / "tokenizer_config.json", copy / "tokenizer" / "tokenizer_config.json")
    _swap_two_ids(copy / "tokenizer" / "tokenizer.json", a, b)
    assert torch.equal(load_pretrained(copy, device="cpu").to_tokens(text), model.to_tokens(text))
    _swap_two_ids(copy / "model" / "tokenizer.json", a, b)
    with pytest.raises(ValueError, match=r"tokenizer\.json does not match the checksum"):
        load_pretrained(copy, device="cpu")


def test_a_damaged_card_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "broken"
    (folder / "model").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "card.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"Damaged model card .*broken/card\.json"):
        pretrained_card(folder)
    monkeypatch.setattr(pretrained, "MODELS_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"Damaged model card .*broken/card\.json"):
        list_pretrained()
