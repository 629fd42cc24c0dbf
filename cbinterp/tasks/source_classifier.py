"""Which corpus source a text reads as: a naive Bayes over word counts (numpy only, deterministic: no seed).

It judges steered text without looking at the codes: trained on the training split's documents, it labels a
continuation by its words alone. Words are case-kept letter runs, digit runs and single punctuation marks (capitals,
numbers and quotes tell news, encyclopedia and fiction apart). Training counts every occurrence (add-`alpha`
smoothing); a text is scored on its distinct words, each once, because a short generated text repeats words far
more than the training prose does and one repeated word must not decide its source. Priors are uniform, so a source
with more training text is not favoured; words seen fewer than `min_count` times in training are ignored. With
`bigrams=True`, pairs of adjacent words ("of the", "Mr Darcy") count as words too: word order tells news from
encyclopedia prose that shares its vocabulary.

    clf = SourceClassifier.fit([d.text for d in train], [d.source for d in train])
    clf.predict(["And God said, Let there be light."])     # ["bible"]
    pieces = word_windows(doc.text, 60)                     # held-out text, as long as the texts it will judge
    clf.accuracy(pieces, [doc.source] * len(pieces))
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from cbinterp.core.checks import is_int, is_real

__all__ = ["SourceClassifier", "features", "words", "word_windows"]

_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+|[^\w\s]")


def words(text: str) -> list[str]:
    """The classifier's words of `text`.

    Letter runs (case kept, with an inner apostrophe), digit runs, and single punctuation marks."""
    return _WORD.findall(text)


def features(text: str, bigrams: bool = False) -> list[str]:
    """The classifier's features of `text`: its `words`, then (with `bigrams`) each adjacent pair as "a b"."""
    w = words(text)
    return w + [f"{a} {b}" for a, b in zip(w, w[1:])] if bigrams else w


def word_windows(text: str, n_words: int) -> list[str]:
    """`text` cut into consecutive, non-overlapping pieces of `n_words` words (split on whitespace).

    The short rest is dropped."""
    if not is_int(n_words) or n_words < 1:
        raise ValueError(f"n_words must be a positive int, got {n_words!r}.")
    w = text.split()
    return [" ".join(w[i : i + n_words]) for i in range(0, len(w) - n_words + 1, n_words)]


@dataclass(frozen=True)
class SourceClassifier:
    """Naive Bayes over word counts, trained with `fit`.

    `labels`, `vocabulary` (word -> column), `log_prob` (labels x words: log P(word | label), add-`alpha` smoothed),
    `bigrams` (whether word pairs are features too).
    """

    labels: tuple[str, ...]
    vocabulary: dict[str, int]
    log_prob: np.ndarray
    bigrams: bool = False

    @classmethod
    def fit(
        cls,
        texts: Iterable[str],
        labels: Iterable[str],
        min_count: int = 2,
        alpha: float = 0.1,
        bigrams: bool = False,
    ) -> SourceClassifier:
        """Train on `texts` and their `labels` (one label per text; at least two distinct labels).

        Args:
            bigrams: count pairs of adjacent words as features too (`features`)."""
        if not is_int(min_count) or min_count < 1:
            raise ValueError(f"min_count must be a positive int, got {min_count!r}.")
        if not is_real(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive number (the add-alpha smoothing), got {alpha!r}.")
        if not isinstance(bigrams, bool):
            raise TypeError(f"bigrams must be True or False, got {bigrams!r}.")
        counts: dict[str, Counter] = {}
        n_texts = 0
        for text, label in zip(texts, labels, strict=True):
            counts.setdefault(str(label), Counter()).update(features(text, bigrams))
            n_texts += 1
        if len(counts) < 2:
            raise ValueError(f"fit needs texts of at least two labels, got {sorted(counts)} from {n_texts} texts.")
        total = Counter()
        for c in counts.values():
            total.update(c)
        vocab = sorted(w for w, n in total.items() if n >= min_count)
        if not vocab:
            raise ValueError(f"No word occurs {min_count}+ times in the training texts; give more text.")
        index = {w: i for i, w in enumerate(vocab)}
        ordered = tuple(sorted(counts))
        table = np.full((len(ordered), len(vocab)), float(alpha))
        for row, label in enumerate(ordered):
            for w, n in counts[label].items():
                if w in index:
                    table[row, index[w]] += n
        log_prob = np.log(table) - np.log(table.sum(axis=1, keepdims=True))
        return cls(labels=ordered, vocabulary=index, log_prob=log_prob, bigrams=bigrams)

    def scores(self, texts: Sequence[str]) -> np.ndarray:
        """`(len(texts), len(labels))` log-likelihoods of each text's distinct known features under each label."""
        out = np.zeros((len(texts), len(self.labels)))
        for i, text in enumerate(texts):
            ids = sorted({self.vocabulary[w] for w in features(text, self.bigrams) if w in self.vocabulary})
            out[i] = self.log_prob[:, ids].sum(axis=1)
        return out

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most likely label of each text (the first label, alphabetically, on a tie such as no known word)."""
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; wrap one text as [text].")
        if not len(texts):
            return []
        return [self.labels[i] for i in self.scores(texts).argmax(axis=1)]

    def accuracy(self, texts: Sequence[str], labels: Sequence[str]) -> dict:
        """Accuracy on labelled texts: {"overall", "macro" (mean of per-label), "per_label", "n_per_label"}."""
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels; give one label per text.")
        if not len(texts):
            raise ValueError("accuracy needs at least one labelled text.")
        right = np.array(self.predict(texts)) == np.array(labels)
        per_label = {lab: float(right[np.array(labels) == lab].mean()) for lab in sorted(set(labels))}
        n_per = {lab: int((np.array(labels) == lab).sum()) for lab in per_label}
        return {
            "overall": float(right.mean()),
            "macro": float(np.mean(list(per_label.values()))),
            "per_label": per_label,
            "n_per_label": n_per,
        }
