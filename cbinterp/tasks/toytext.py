"""A generated English-like corpus and a character tokenizer, for tutorials and tests that must not download data.

The sentences carry the kinds of features the paper probes with regular expressions: months, years (many
starting with "2"), capitalised names (some starting with "B"), numbers, punctuation and quotations.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["CharTokenizer", "generate_corpus"]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NAMES = ["Bob", "Bella", "Boris", "Bianca", "Alice", "Carlos", "Dana", "Emma", "Frank", "Grace", "Hugo", "Ivy"]
PLACES = ["the harbour", "the market", "the old mill", "the station", "the library", "the hills"]
VERBS = ["visited", "painted", "left", "found", "remembered", "sold", "described"]
THINGS = ["a red boat", "three letters", "the clock", "a small garden", "the long road", "an empty room"]
TEMPLATES = [
    "In {month} {year}, {name} {verb} {place}.",
    "{name} {verb} {thing} on {day} {month}.",
    '"{quote}", said {name}.',
    "By {year} the town had {count} houses and {count2} shops.",
    "{name} and {name2} {verb} {thing} in {month}.",
    'On {day} {month} {year}, {name} wrote: "{quote}"',
]
QUOTES = ["We will be back soon", "It is later than you think", "Bring the maps", "Nothing is lost"]


def generate_corpus(n_docs: int, sentences_per_doc: int = 4, seed: int = 0) -> list[str]:
    """`n_docs` documents of `sentences_per_doc` generated sentences each (seeded)."""
    rng = np.random.default_rng(seed)
    pick = lambda items: items[int(rng.integers(len(items)))]
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(sentences_per_doc):
            year = int(rng.integers(2000, 2030)) if rng.random() < 0.7 else int(rng.integers(1800, 2000))
            sentences.append(
                pick(TEMPLATES).format(
                    month=pick(MONTHS),
                    year=year,
                    name=pick(NAMES),
                    name2=pick(NAMES),
                    verb=pick(VERBS),
                    place=pick(PLACES),
                    thing=pick(THINGS),
                    day=int(rng.integers(1, 29)),
                    quote=pick(QUOTES),
                    count=int(rng.integers(2, 900)),
                    count2=int(rng.integers(2, 90)),
                )
            )
        docs.append(" ".join(sentences))
    return docs


class CharTokenizer:
    """One token per printable ASCII character, plus BOS (id 0) and an unknown-character token (id 1)."""

    def __init__(self, alphabet: str = string.printable[:95]):
        self.alphabet = alphabet
        self.token_strings: list[str] = ["", "?"] + list(alphabet)  # BOS decodes to nothing
        self._ids = {ch: i + 2 for i, ch in enumerate(alphabet)}
        self.bos = 0
        self.name = f"char-{len(self.token_strings)}"

    @property
    def vocab_size(self) -> int:
        """The number of token ids (BOS and the unknown-character token included)."""
        return len(self.token_strings)

    def encode(self, text: str) -> list[int]:
        """The token ids of `text`, one per character; characters outside the alphabet become id 1."""
        return [self._ids.get(ch, 1) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (BOS decodes to nothing)."""
        return "".join(self.token_strings[int(i)] for i in ids)

    def batch(self, texts: Sequence[str], seq_len: int) -> Tensor:
        """BOS then each text's first `seq_len - 1` characters, padded with spaces: `(len(texts), seq_len)`."""
        rows = [[self.bos] + (self.encode(t) + self.encode(" ") * seq_len)[: seq_len - 1] for t in texts]
        return torch.tensor(rows, dtype=torch.long)
