"""World English Bible: SWORD zText module -> one document per chapter."""

from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path

from .base import Document, SourceResult, join_paragraphs, slug
from .fetch import WEB, _deb_extract

WEB_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"


def read_ztext(module_dir: Path, testament: str) -> str:
    """All entries of one testament (ot/nt) in index order, concatenated as OSIS markup."""
    bzs = (module_dir / f"{testament}.bzs").read_bytes()  # per block: offset, compressed size, size (uint32 LE)
    bzv = (module_dir / f"{testament}.bzv").read_bytes()  # per entry: block, offset in block (uint32), size (uint16)
    bzz = (module_dir / f"{testament}.bzz").read_bytes()
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    cache: dict[int, bytes] = {}
    entries = []
    for i in range(0, len(bzv), 10):
        block, offset, size = struct.unpack_from("<IIH", bzv, i)
        if size == 0:
            continue
        if block not in cache:
            start, length, full = blocks[block]
            data = zlib.decompress(bzz[start : start + length])
            if len(data) != full:
                raise SystemExit(f"{testament} block {block}: {len(data)} bytes, index says {full}")
            cache[block] = data
        entry = cache[block][offset : offset + size].decode("utf-8")
        # One entry, where Greek Daniel overruns the versification into Hosea, is cut inside a tag.
        entries.append(re.sub(r"<[^>]*$", "", entry))
    return " ".join(entries)


def osis_to_text(markup: str) -> str:
    """Plain paragraphs of an OSIS fragment: notes dropped, psalm titles kept, paragraph and line breaks kept."""
    # A note sits between two words with no space of its own ("God<note>..</note><w>created"), so it leaves one.
    text = re.sub(r"<note\b[^>]*>.*?</note>", " ", markup, flags=re.DOTALL)
    text = re.sub(r"<note\b[^>]*/>", "", text)
    text = re.sub(r'<title\b(?![^>]*type="psalm")[^>]*>.*?</title>', "", text, flags=re.DOTALL)
    text = re.sub(r'<title\b[^>]*type="psalm"[^>]*>(.*?)</title>', r"\n\1\n", text, flags=re.DOTALL)
    # Paragraph, poetry line and line-group boundaries become breaks; other tags vanish and keep their words.
    text = re.sub(r"<(div|p|l|lg|lb|item|list)\b[^>]*>|</(div|p|l|lg|item|list)>", "\n", text)
    text = re.sub(r"<[^<>]+>", "", text)
    text = re.sub(r"[ \t]+([,.;:?!])", r"\1", text)  # the space a note left before punctuation
    return join_paragraphs(html.unescape(text).split("\n"))


# In this module Hosea's book heading was overwritten by the Greek Daniel chapters that do not fit the
# NRSVA versification, so its name is not in the data.
_BOOK_NAME_FALLBACK = {"Hos": "Hosea"}
_OSIS_MARKER = re.compile(r'<div\b[^>]*\btype="book"[^>]*>|<chapter\b[^>]*>')


def _attr(tag: str, name: str) -> str | None:
    """Value of one attribute of a tag (with a leading space so osisID is not taken for sID)."""
    match = re.search(rf'\s{name}="([^"]*)"', tag)
    return match.group(1) if match else None


def extract_bible(deb: Path, work: Path) -> SourceResult:
    """One document per chapter ("Genesis 1"), in canonical order, deuterocanon included."""
    module_dir = _deb_extract(deb, work / "web") / WEB_DIR
    names: dict[str, str] = {}  # OSIS book code -> name as printed ("1 Kings")
    chapters: dict[str, list[str]] = {}  # "Gen.1" -> markup pieces, in the order first seen
    for testament in ("ot", "nt"):
        stream = read_ztext(module_dir, testament)
        current = None  # osisID of the open chapter
        last = 0
        for match in _OSIS_MARKER.finditer(stream):
            tag = match.group(0)
            if current is not None:
                chapters[current].append(stream[last : match.start()])
            last = match.end()
            if tag.startswith("<div"):
                current = None
                if _attr(tag, "sID") is not None:
                    # The running-header milestone right after the book's div names it.
                    head = re.search(r'<milestone\b[^>]*type="x-usfm-h"[^>]*>', stream[last : last + 2000])
                    if head and _attr(head.group(0), "n"):
                        names[_attr(tag, "osisID")] = _attr(head.group(0), "n")
            elif _attr(tag, "sID") is not None:
                current = _attr(tag, "osisID")
                chapters.setdefault(current, [])
            elif _attr(tag, "eID") is not None:
                current = None
        if current is not None:
            chapters[current].append(stream[last:])
    docs = []
    book_order: list[str] = []
    for osis_id, pieces in chapters.items():
        book, number = osis_id.rsplit(".", 1)
        if book not in book_order:
            book_order.append(book)
        name = names.get(book) or _BOOK_NAME_FALLBACK.get(book)
        if name is None:
            raise SystemExit(f"no name for book {book}")
        text = osis_to_text("".join(pieces))
        if text:
            docs.append(
                Document(
                    f"bible/{book_order.index(book) + 1:02d}-{slug(name)}-{int(number):03d}",
                    "bible",
                    f"{name} {int(number)}",
                    text,
                )
            )
    return SourceResult("bible", docs, WEB, f"{WEB_DIR}/{{ot,nt}}.{{bzs,bzv,bzz}}")
