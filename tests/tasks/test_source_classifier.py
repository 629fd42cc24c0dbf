"""The source classifier that judges source steering (cbinterp.tasks.source_classifier)."""

from __future__ import annotations

import pytest

from cbinterp.tasks.source_classifier import SourceClassifier, features, word_windows, words

TRAIN = [
    ("And the Lord said unto Moses, go forth to the temple and pray.", "bible"),
    ("The Lord God spoke to the priests of the temple, and they prayed.", "bible"),
    ("Mr. Darcy bowed to Elizabeth, and Mrs. Bennet was delighted with the ball.", "austen"),
    ("Miss Bennet and Mr. Bingley danced at the ball; Elizabeth was amused.", "austen"),
]


def classifier() -> SourceClassifier:
    return SourceClassifier.fit([t for t, _ in TRAIN], [label for _, label in TRAIN], min_count=1)


def test_predicts_the_source_of_unseen_text():
    clf = classifier()
    assert clf.labels == ("austen", "bible")
    assert clf.predict(["the priests prayed to the Lord", "Elizabeth and Mr. Darcy at the ball"]) == [
        "bible",
        "austen",
    ]
    assert clf.predict([]) == []
    acc = clf.accuracy(["Lord temple", "Bennet ball", "Lord ball Bennet"], ["bible", "austen", "bible"])
    assert acc["per_label"] == {"austen": 1.0, "bible": 0.5} and acc["macro"] == 0.75
    assert acc["overall"] == pytest.approx(2 / 3)


def test_a_repeated_word_counts_once():
    """A generated text repeating one word must not outweigh its other words."""
    clf = classifier()
    text = "Lord " * 20 + "Elizabeth Bennet Darcy Bingley ball"
    assert clf.predict([text]) == ["austen"]


def test_priors_are_uniform():
    """No log prior is added: with five times more Bible text, a text without known words still scores 0 under both."""
    texts = [t for t, _ in TRAIN] + [TRAIN[0][0]] * 20
    labels = [label for _, label in TRAIN] + ["bible"] * 20
    clf = SourceClassifier.fit(texts, labels, min_count=1)
    assert (clf.scores(["zebra"]) == 0).all()


def test_words_and_windows():
    assert words("Mr. Darcy's 1,200 pounds!") == ["Mr", ".", "Darcy's", "1", ",", "200", "pounds", "!"]
    assert word_windows("a b c d e f g", 3) == ["a b c", "d e f"]
    with pytest.raises(ValueError, match="n_words"):
        word_windows("a b", 0)


def test_bad_training_input_is_refused():
    with pytest.raises(ValueError, match="at least two labels"):
        SourceClassifier.fit(["a b", "a c"], ["x", "x"])
    with pytest.raises(ValueError, match="alpha"):
        SourceClassifier.fit(["a", "b"], ["x", "y"], alpha=0)
    with pytest.raises(ValueError):
        SourceClassifier.fit(["a", "b"], ["x"])  # one label per text
    with pytest.raises(TypeError, match="list of texts"):
        classifier().predict("the Lord")


def test_bigrams_tell_word_order_apart():
    """Two sources with the same words in another order: only word pairs can tell them apart."""
    texts, labels = ["dog bites man", "dog bites man", "man bites dog", "man bites dog"], ["x", "x", "y", "y"]
    plain = SourceClassifier.fit(texts, labels, min_count=1)
    assert plain.scores(["man bites dog"])[0].tolist()[0] == pytest.approx(plain.scores(["man bites dog"])[0][1])
    pairs = SourceClassifier.fit(texts, labels, min_count=1, bigrams=True)
    assert pairs.predict(["the man bites a dog", "a dog bites the man"]) == ["y", "x"]
    assert features("a b c", bigrams=True) == ["a", "b", "c", "a b", "b c"] and features("a b") == ["a", "b"]
    with pytest.raises(TypeError, match="bigrams"):
        SourceClassifier.fit(texts, labels, bigrams="yes")
