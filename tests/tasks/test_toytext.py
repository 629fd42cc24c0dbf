"""The generated corpus and the character tokenizer used by tutorials."""

from __future__ import annotations

import re

import torch

from cbinterp.tasks.toytext import MONTHS, CharTokenizer, generate_corpus


def test_corpus_is_seeded_and_carries_the_probed_features():
    docs = generate_corpus(50, seed=3)
    assert docs == generate_corpus(50, seed=3) and docs != generate_corpus(50, seed=4)
    text = " ".join(docs)
    assert any(month in text for month in MONTHS)
    assert re.search(r"\b2\d{3}\b", text) and re.search(r"\bB[a-z]+", text) and '"' in text


def test_char_tokenizer_round_trip_and_batch():
    tok = CharTokenizer()
    text = 'On 3 May 2024, Bob said: "Hi".'
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("\u00e9") == [1]  # unknown character
    batch = tok.batch([text, "x"], seq_len=12)
    assert batch.shape == (2, 12) and torch.all(batch[:, 0] == tok.bos)
    assert tok.decode(batch[0]) == text[:11] and tok.decode(batch[1]) == "x" + " " * 10
    assert len(tok.token_strings) == tok.vocab_size and tok.token_strings[tok.bos] == ""
