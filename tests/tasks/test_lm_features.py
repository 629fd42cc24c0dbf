"""The regex features and steering topics of cbinterp.tasks.lm_features, on hand-written sentences."""

from __future__ import annotations

import re

import pytest

from cbinterp.tasks.lm_features import (
    FEATURE_DESCRIPTIONS,
    FEATURES,
    TOPIC_PROMPTS,
    TOPICS,
    is_repetitive,
    mentions_topic,
    topic_rate,
    topic_regex,
    word_list,
)


def matches(feature: str, text: str) -> list[str]:
    return [m.group() for m in re.finditer(FEATURES[feature], text)]


# feature -> (text, the matches expected in it)
CASES = {
    "year_1xxx": [
        ("In 1862 and again in 1914, not 2001.", ["1862", "1914"]),
        ("He paid 12345 dollars, or 1,500, or 3.1999.", []),
        ("(1066)", ["1066"]),
    ],
    "year_2xxx": [
        ("From 2004 to 2019; not 1999 or 20000.", ["2004", "2019"]),
        ("Version 2.2000 and 12000", []),
    ],
    "month": [
        ("Born 4 July 1776; died in December.", ["July", "December"]),
        ("May we go? in march, the Augustine", []),
    ],
    "capital_B": [("Bob went to Boston by bus. BBC B", ["Bob", "Boston"])],
    "number": [("3 men, 250,000 termites and 3.5 kg; B2B", ["3", "250,000", "3.5"])],
    "comma": [("a, b, c", [",", ","])],
    "period": [("It is 3.5 m. Then Mr. Smith left.", [".", ".", "."])],
    "open_quote": [
        ('He said "yes" and \u201cno\u201d.', ['"', "\u201c"]),
        ('"Start of a line', ['"']),
        ('the end." Then', []),
    ],
    "war": [("The Battle of Hastings: an army of soldiers fought.", ["Battle", "army", "soldiers", "fought"])],
    "sea": [("The ship sailed across the sea; warship, seaside", ["ship", "sailed", "sea"])],
    "royalty": [("King Harold and the queen; a kingfisher, Kings", ["King", "queen", "Kings"])],
    "music": [("She sang a song to the music of the band", ["sang", "song", "music", "band"])],
    "money": [("The price of silver: money paid, payment", ["price", "silver", "money", "paid"])],
    "religion": [("The Lord God in the church; godly, lordship", ["Lord", "God", "church"])],
    "ing_word": [("Running, he was singing a king's evening thing. sing", ["singing", "evening", "thing"])],
    "ly_word": [("She quickly and only fly; Italy", ["quickly", "only"])],
}


def test_every_feature_is_tested_and_described():
    assert set(CASES) == set(FEATURES) == set(FEATURE_DESCRIPTIONS)
    assert len(FEATURES) >= 12


@pytest.mark.parametrize("feature, text, expected", [(f, t, e) for f, cases in CASES.items() for t, e in cases])
def test_feature_regex(feature, text, expected):
    assert matches(feature, text) == expected


def test_topics():
    assert len(TOPICS) >= 6
    assert mentions_topic("The armies met at dawn.", "war")
    assert not mentions_topic("The warm sun and a wary hare.", "war")  # whole words only
    assert mentions_topic("A SHIP!", "sea")  # any case
    assert not mentions_topic("friendship and hardship", "sea")
    assert mentions_topic("They were married in June.", "marriage")
    assert mentions_topic("He prayed to God.", "religion")
    assert not mentions_topic("the godmother", "religion")
    assert topic_rate(["a war", "peace", "the battle", "calm"], "war") == 0.5
    assert topic_rate([], "war") == 0.0


def test_every_topic_has_a_prompt_that_mentions_it_more_than_once():
    assert set(TOPIC_PROMPTS) == set(TOPICS)
    for topic, prompt in TOPIC_PROMPTS.items():
        assert len(topic_regex(topic).findall(prompt)) >= 3, topic
    assert mentions_topic("a Boat", re.compile(r"(?i)\bboat\b"))
    assert "battle" in word_list("war")
    with pytest.raises(KeyError, match="known topics"):
        topic_regex("dragons")


def test_repetition_detector():
    assert is_repetitive("war war war war war")
    assert is_repetitive("War, war; WAR! war war and peace")  # one word is half of all words
    assert is_repetitive("the the king")  # fewer than three distinct words
    assert is_repetitive("  ...  ")  # no words at all
    assert not is_repetitive("The king rode to war with his army, and the war was long.")
    assert not is_repetitive("war war war and then peace came to the land at last", max_share=0.5)
    with pytest.raises(ValueError):
        is_repetitive("a b c", max_share=0)
