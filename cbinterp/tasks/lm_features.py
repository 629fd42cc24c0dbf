"""Regex features and steering topics for codebook language models on English text (plain data, small functions).

`FEATURES` are the regex-defined token features of the paper's Fig. 6 ("codes versus neurons"): each is a regular
expression over decoded text, turned into a token mask by `cbinterp.codecache.features.token_positions` (a token
holds the feature when its characters overlap a match). They are written for the shipped English corpus
(Wikipedia, news, the Brown corpus, the World English Bible, Jane Austen): years, months, numbers, punctuation,
capitalised words starting with "B", word sets of a few topics, and "-ing" words.

`TOPICS` are the topics of the steering benchmark: each is a case-insensitive regex over whole words that decides
"this sample mentions the topic" (`mentions_topic`), and whose matches are also the topic-word tokens from which
topic codes are found. `is_repetitive` flags a sample that is one word repeated, which a steering that only
forces the topic word produces and which must not count as steering.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping

__all__ = [
    "FEATURES",
    "FEATURE_DESCRIPTIONS",
    "TOPICS",
    "TOPIC_PROMPTS",
    "TOPIC_WORDS",
    "compile_feature",
    "is_repetitive",
    "mentions_topic",
    "topic_rate",
    "topic_regex",
    "word_list",
]

_MONTHS = "January|February|March|April|June|July|August|September|October|November|December"


def _words(words: str) -> str:
    """A regex for any of the `|`-separated words, as whole words (case-sensitive as written)."""
    return rf"\b(?:{words})\b"


#: Topic word sets, shared by the probe features (`FEATURES["war"]` ...) and the steering topics (`TOPICS`).
TOPIC_WORDS: dict[str, str] = {
    "war": "war|wars|battle|battles|army|armies|soldier|soldiers|troops|fought|fighting",
    "sea": "sea|seas|ship|ships|boat|boats|sail|sailed|sailing|sailor|sailors|ocean|navy|harbour|harbor",
    "royalty": "king|kings|queen|queens|prince|princes|princess|throne|kingdom|crown",
    "music": "music|musical|musician|musicians|song|songs|sing|sang|sung|singing|singer|band|concert|piano",
    "money": "money|price|prices|dollar|dollars|pound|pounds|cost|costs|paid|pay|silver|gold|wealth|rich",
    "marriage": "marry|married|marriage|wedding|husband|husbands|wife|wives|bride|engaged",
    "religion": "god|gods|lord|church|prayer|pray|prayed|priest|priests|temple|holy|faith|worship",
    "food": "food|bread|eat|eating|ate|meat|dinner|supper|meal|wine|fruit|cook|cooked",
}

#: Name -> regex over decoded text. Case-sensitive unless the pattern says `(?i)`.
FEATURES: dict[str, str] = {
    # Four-digit years (the paper's "years starting with 1 / 2"); a digit or letter on either side excludes longer
    # numbers and ids, a comma or point before the digits excludes "1,2000" and "3.1999".
    "year_1xxx": r"(?<![\w.,])1\d{3}(?![\w]|[.,]\d)",
    "year_2xxx": r"(?<![\w.,])2\d{3}(?![\w]|[.,]\d)",
    # Month names ("May" is left out: it is more often the verb at the start of a sentence).
    "month": _words(_MONTHS),
    # Capitalised words starting with B: a capital B and at least one lower-case letter.
    "capital_B": r"\bB[a-z]+\b",
    # Numbers written with digits, with thousands separators or decimals ("250,000", "3.5").
    "number": r"\b\d+(?:[.,]\d+)*\b",
    "comma": r",",
    # A full stop ending a sentence or an abbreviation: a period not between two digits ("3.5").
    "period": r"(?<!\d)\.|\.(?!\d)",
    # An opening double quote: curly, or straight at the start of a line or after a space or an opening bracket.
    "open_quote": r"(?m)\u201c|(?:^|(?<=[\s(\[]))\"(?=\S)",
    # Topic word sets (any case: "Battle", "KING").
    "war": "(?i)" + _words(TOPIC_WORDS["war"]),
    "sea": "(?i)" + _words(TOPIC_WORDS["sea"]),
    "royalty": "(?i)" + _words(TOPIC_WORDS["royalty"]),
    "music": "(?i)" + _words(TOPIC_WORDS["music"]),
    "money": "(?i)" + _words(TOPIC_WORDS["money"]),
    "religion": "(?i)" + _words(TOPIC_WORDS["religion"]),
    # Lower-case words of at least five letters ending in "-ing" ("running", "evening"; not "king", "sing").
    "ing_word": r"\b[a-z]{2,}ing\b",
    # Lower-case words of at least four letters ending in "-ly" ("quickly", "only").
    "ly_word": r"\b[a-z]{2,}ly\b",
}

FEATURE_DESCRIPTIONS: dict[str, str] = {
    "year_1xxx": 'four-digit numbers starting with "1" (years 1000-1999)',
    "year_2xxx": 'four-digit numbers starting with "2" (years 2000-2999)',
    "month": "month names (January ... December, May excluded)",
    "capital_B": 'capitalised words starting with "B"',
    "number": "numbers written with digits",
    "comma": "commas",
    "period": "full stops (not decimal points)",
    "open_quote": "opening double quotes",
    "war": "war / battle / army words",
    "sea": "sea / ship / sailing words",
    "royalty": "king / queen / prince words",
    "music": "music / song / singing words",
    "money": "money / price / payment words",
    "religion": "god / lord / church / prayer words",
    "ing_word": '"-ing" words',
    "ly_word": '"-ly" words',
}

#: Steering topics: name -> case-insensitive whole-word regex deciding "the sample mentions the topic".
TOPICS: dict[str, str] = {name: "(?i)" + _words(words) for name, words in TOPIC_WORDS.items()}


#: One sentence per steering topic, dense in its words: a prompt that puts the topic in the model's context. How often
#: the model's continuation of it mentions the topic is what the model itself does with the topic in context, the
#: ceiling that steering is read against (a model that does not continue a topic it was given cannot be steered into
#: one by its own features).
TOPIC_PROMPTS: dict[str, str] = {
    "war": "The soldiers of the army fought a great battle in the war.",
    "sea": "The sailors took the ship out to sea, and the boat sailed on the ocean.",
    "royalty": "The king and the queen sat on the throne of the kingdom.",
    "music": "The musician played a song on the piano, and the band sang music.",
    "money": "He paid the price in gold and silver, for money made him rich.",
    "marriage": "She married her husband at the wedding, and became his wife.",
    "religion": "The priest prayed to God in the church, and the people worshipped the Lord.",
    "food": "They ate bread and meat for dinner, with wine and fruit at the meal.",
}


def compile_feature(pattern: str | re.Pattern) -> re.Pattern:
    """`pattern` compiled (a compiled pattern is returned as is)."""
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)


def topic_regex(topic: str, topics: Mapping[str, str] = TOPICS) -> re.Pattern:
    """The compiled regex of `topic`; KeyError lists the known topics."""
    if topic not in topics:
        raise KeyError(f"Unknown topic {topic!r}; known topics: {sorted(topics)}.")
    return compile_feature(topics[topic])


def word_list(topic: str) -> list[str]:
    """The words of a topic's word set, as listed in `TOPIC_WORDS`."""
    if topic not in TOPIC_WORDS:
        raise KeyError(f"Unknown topic {topic!r}; known topics: {sorted(TOPIC_WORDS)}.")
    return TOPIC_WORDS[topic].split("|")


def mentions_topic(text: str, topic: str | re.Pattern, topics: Mapping[str, str] = TOPICS) -> bool:
    """True when `text` contains a word of `topic` (a topic name of `topics`, or a regex)."""
    regex = topic if isinstance(topic, re.Pattern) else topic_regex(topic, topics)
    return regex.search(text) is not None


def topic_rate(texts: Iterable[str], topic: str | re.Pattern, topics: Mapping[str, str] = TOPICS) -> float:
    """The share of `texts` that mention `topic` (0.0 for no texts)."""
    texts = list(texts)
    if not texts:
        return 0.0
    return sum(mentions_topic(t, topic, topics) for t in texts) / len(texts)


_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def is_repetitive(text: str, max_share: float = 0.5, min_distinct: int = 3) -> bool:
    """True when `text` is (mostly) one word repeated.

    That is fewer than `min_distinct` distinct words, or one word (case-folded) making up at least `max_share` of all
    words. Text without words counts as repetitive (it reads as nothing either)."""
    if not 0.0 < max_share <= 1.0:
        raise ValueError(f"max_share must lie in (0, 1], got {max_share}.")
    words = [w.casefold() for w in _WORD.findall(text)]
    if not words:
        return True
    counts = Counter(words)
    return len(counts) < min_distinct or counts.most_common(1)[0][1] / len(words) >= max_share
