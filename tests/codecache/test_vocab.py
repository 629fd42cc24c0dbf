"""Vocabulary: token ids as text, exact for byte-level BPE where characters are split over tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cbinterp.codecache.features import token_positions
from cbinterp.codecache.vocab import Vocabulary, byte_level_alphabet

TEXT = "Café naïve — 東京 🎉 in 2024, said Bob."


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained on ASCII only, so every non-ASCII character is split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["in 2024, said Bob. Cafe naive"] * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>")


def test_byte_level_alphabet_is_a_bijection():
    alphabet = byte_level_alphabet()
    assert len(alphabet) == 256 and sorted(alphabet.values()) == list(range(256))
    assert alphabet["A"] == ord("A") and alphabet["Ġ"] == ord(" ")


def test_spans_are_exact_on_split_characters(tokenizer):
    ids = tokenizer(TEXT)["input_ids"]
    vocab = Vocabulary(tokenizer)
    text, starts, ends = vocab.spans(ids)
    assert text == TEXT == tokenizer.decode(ids)
    assert len(ids) > len(TEXT.split())  # the non-ASCII characters really are split over byte tokens
    # every character is covered, in order, and each token's span re-encodes to (part of) its bytes
    assert starts[0] == 0 and ends[-1] == len(TEXT)
    assert np.all(starts[1:] >= starts[:-1]) and np.all(ends >= starts)
    for i, (a, b) in enumerate(zip(starts, ends)):
        assert vocab.pieces[ids[i]] in TEXT[a:b].encode("utf-8") or TEXT[a:b].encode("utf-8") in vocab.pieces[ids[i]]


def test_regex_after_non_ascii_maps_to_the_right_tokens(tokenizer):
    ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    exact = token_positions(ids, tokenizer, r"2024")
    covered = "".join(tokenizer.decode([int(i)]) for i in ids[0][exact])
    assert covered.strip() == "2024"
    tokyo = token_positions(ids, tokenizer, r"東京")
    assert tokenizer.decode(ids[0][tokyo].tolist()).strip() == "東京"
    # concatenated per-id decodes turn each split byte into "\ufffd": the characters cannot be found at all
    naive = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    assert not token_positions(ids, naive, r"東京").any()
    assert torch.equal(token_positions(ids, naive, r"2024"), exact)


def test_special_tokens_are_not_text(tokenizer):
    vocab = Vocabulary(tokenizer)
    bos = tokenizer.bos_token_id
    ids = [bos, *tokenizer("Bob")["input_ids"]]
    text, starts, ends = vocab.spans(ids)
    assert text == "Bob" and starts[0] == ends[0] == 0


def test_strings_bytes_and_bad_input():
    assert Vocabulary(["a", "bc"]).text([1, 0]) == "bca"
    assert Vocabulary([b"\xc3", b"\xa9"]).text([0, 1]) == "é"
    text, starts, ends = Vocabulary([b"\xc3", b"\xa9", b"x"]).spans([0, 1, 2])
    assert text == "éx" and list(starts) == [0, 0, 1] and list(ends) == [1, 1, 2]
    assert Vocabulary([b"\xff", b"a"]).text([0, 1]) == "\ufffda"  # invalid bytes are replaced, not dropped
    with pytest.raises(ValueError, match="token id 5 has no text"):
        Vocabulary(["a"]).spans([5])
    with pytest.raises(TypeError, match="tokenizer"):
        Vocabulary("abc")
