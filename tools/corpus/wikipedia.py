"""The two sources in gensim's wheel: Wikipedia (MediaWiki XML export -> plain section text) and Lee."""

from __future__ import annotations

import bz2
import html
import io
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from .base import Document, SourceResult, join_paragraphs, slug
from .fetch import GENSIM

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"

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
