"""Tests for the shipped English corpus (cbinterp/assets/corpus) and its loader cbinterp.tasks.corpus."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import json
import lzma
import os
import pkgutil
import re
import shutil
import struct
import subprocess
import sys
import types
import zlib
from collections import Counter
from pathlib import Path

import pytest

from cbinterp.tasks import corpus
from cbinterp.tasks.corpus import (
    CORPUS_SOURCES,
    CorpusError,
    Document,
    assign_splits,
    corpus_stats,
    load_corpus,
    split_halves,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((corpus.CORPUS_DIR / corpus.MANIFEST_FILE).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    """The whole corpus, loaded (and hash-checked) once for the module; later calls hit the loader's cache."""
    return load_corpus()


@pytest.fixture(scope="module")
def heldout(docs) -> list[Document]:
    return load_corpus("heldout")


def _by_source(items) -> dict[str, list[Document]]:
    groups: dict[str, list[Document]] = {}
    for doc in items:
        groups.setdefault(doc.source, []).append(doc)
    return groups


# --- the shipped file ----------------------------------------------------------------------------------------


def test_shipped_file_matches_manifest_hash_and_size(manifest):
    path = corpus.CORPUS_DIR / manifest["file"]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    assert len(data) == manifest["bytes"]
    assert len(data) <= 10_000_000, "the compressed corpus must stay under 10 MB"


def test_notice_names_sources_licences_and_rebuild_command():
    notice = (corpus.CORPUS_DIR / "NOTICE.md").read_text(encoding="utf-8")
    for needle in (
        "CC BY-SA 4.0",
        "Wikipedia contributors",
        "Brown Corpus",
        "World English Bible",
        "public domain",
        "janeaustenr",
        "MIT",
        "LGPL",
        "python tools/build_corpus.py --check",
    ):
        assert needle in notice, needle


def test_assets_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["cbinterp"]
    assert "assets/corpus/*" in patterns


# --- contents ---------------------------------------------------------------------------------------------------


def test_sources_and_counts_match_manifest(docs, manifest):
    assert CORPUS_SOURCES == tuple(sorted(manifest["sources"]))
    groups = _by_source(docs)
    assert set(groups) == set(CORPUS_SOURCES)
    for name, entry in manifest["sources"].items():
        assert len(groups[name]) == entry["n_documents"], name
        assert sum(len(d.text) for d in groups[name]) == entry["n_chars"], name
        assert entry["package"]["name"] and entry["package"]["version"] and entry["licence"]
    total = sum(len(d.text) for d in docs)
    assert total == manifest["n_chars"]
    assert total >= 15_000_000


def test_documents_are_well_formed(docs):
    ids = [d.id for d in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for doc in docs:
        assert doc.id.startswith(doc.source + "/")
        assert doc.title and doc.text and doc.text == doc.text.strip()
        assert "\n\n" not in doc.text and "  " not in doc.text and "\t" not in doc.text
    with pytest.raises(dataclasses.FrozenInstanceError):
        docs[0].text = "changed"


def test_brown_is_detokenized(docs):
    brown = [d for d in docs if d.source == "brown"]
    assert len(brown) == 500
    text = "\n".join(d.text for d in brown)
    for bad in (" ,", " .", " ;", " ?", " !", " )", "( ", "``", "''"):
        assert bad not in text, bad
    # No word/tag pairs such as "jury/nn" or "said/vbd" left (fractions like 1-1/2 are fine).
    assert not re.search(r"[A-Za-z]/(?:nn|vb|vbd|at|in|jj|np|cc|rb|nns|pps)\b", text)
    first = next(d for d in brown if d.id == "brown/ca01")
    assert first.title == "ca01 (press: reportage)"
    assert first.text.startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent "
        'primary election produced "no evidence" that any irregularities took place.'
    )
    assert "\n" in first.text  # paragraph breaks kept


def test_wikipedia_has_no_markup(docs):
    wiki = [d for d in docs if d.source == "wikipedia"]
    assert len(wiki) >= 90
    for doc in wiki:
        for bad in ("[[", "]]", "{{", "}}", "<ref", "{|", "|}", "'''", "[http", "Category:", "thumb|"):
            assert bad not in doc.text, (doc.id, bad)
    einstein = next(d for d in wiki if d.title == "Albert Einstein")
    assert "theoretical physicist" in einstein.text and "#REDIRECT" not in einstein.text


def test_bible_and_austen_look_right(docs):
    titles = {d.title for d in docs}
    assert {"Genesis 1", "Psalms 23", "Revelation 22", "Hosea 1"} <= titles
    bible = "\n".join(d.text for d in docs if d.source == "bible")
    assert "<" not in bible and ">" not in bible
    assert "In the beginning, God created the heavens and the earth." in bible
    austen = [d for d in docs if d.source == "austen"]
    novels = Counter(d.title.split(",")[0] for d in austen)
    assert novels == {
        "Sense and Sensibility": 50,
        "Pride and Prejudice": 61,
        "Mansfield Park": 48,
        "Emma": 55,
        "Northanger Abbey": 31,
        "Persuasion": 24,
    }
    pride = next(d for d in austen if d.id == "austen/pride-and-prejudice-01")
    assert pride.text.startswith(
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife."
    )


# --- splits -----------------------------------------------------------------------------------------------------


def test_split_disjoint_covering_stratified(docs, heldout, manifest):
    train = load_corpus("train")
    train_ids, heldout_ids = {d.id for d in train}, {d.id for d in heldout}
    assert not train_ids & heldout_ids
    assert train_ids | heldout_ids == {d.id for d in docs}
    assert len(heldout) >= 0.05 * len(docs)
    all_groups, held_groups = _by_source(docs), _by_source(heldout)
    for name in CORPUS_SOURCES:
        assert held_groups.get(name), f"no held-out document from {name}"
        assert len(held_groups[name]) >= 0.05 * len(all_groups[name])
        assert len(held_groups[name]) <= 0.05 * len(all_groups[name]) + 1
        expected = manifest["sources"][name]["splits"]["heldout"]
        assert len(held_groups[name]) == expected["n_documents"]
        assert sum(len(d.text) for d in held_groups[name]) == expected["n_chars"]


def test_split_is_deterministic_and_independent_of_source_filter(heldout):
    assert [d.id for d in load_corpus("heldout")] == [d.id for d in heldout]
    brown_held = load_corpus("heldout", sources=["brown"])
    assert brown_held == [d for d in heldout if d.source == "brown"]
    assert load_corpus("heldout", sources="brown") == brown_held  # a bare name works too
    bigger = load_corpus("heldout", heldout_fraction=0.2)
    assert {d.id for d in heldout} < {d.id for d in bigger}  # a larger fraction extends the smaller one


def test_split_uses_a_stable_hash_not_pythons():
    # Pinned: any change here changes which documents are held out on every machine.
    toy = [Document(f"s/{i:03d}", "s", "", "") for i in range(100)]
    held = sorted(k for k, v in assign_splits(toy).items() if v == "heldout")
    assert held == ["s/000", "s/005", "s/075", "s/094", "s/097"]
    # The module file alone, under another hash seed (importing the cbinterp package would load torch: slow).
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('c', {str(Path(corpus.__file__))!r})\n"
        "c = importlib.util.module_from_spec(spec); sys.modules['c'] = c; spec.loader.exec_module(c)\n"
        "toy = [c.Document(f's/{i:03d}', 's', '', '') for i in range(100)]\n"
        "print(sorted(k for k, v in c.assign_splits(toy).items() if v == 'heldout'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout
    assert out.strip() == str(held)


def test_split_halves(heldout):
    first, second = split_halves(heldout)
    assert not {d.id for d in first} & {d.id for d in second}
    assert sorted([d.id for d in first] + [d.id for d in second]) == sorted(d.id for d in heldout)
    first_groups, second_groups = _by_source(first), _by_source(second)
    for name, group in _by_source(heldout).items():
        assert len(group) >= 2
        assert first_groups.get(name) and second_groups.get(name), name
        assert abs(len(first_groups[name]) - len(second_groups[name])) <= 1
    again = split_halves(list(reversed(heldout)))
    assert again == (first, second)  # depends on ids only, not on input order
    single = [Document("x/1", "x", "", "")]
    assert split_halves(single) == (single, [])


# --- bad inputs ---------------------------------------------------------------------------------------------------


def test_unknown_split_source_or_fraction_raise(docs):
    with pytest.raises(ValueError, match="split must be None, 'train' or 'heldout'"):
        load_corpus("test")
    with pytest.raises(ValueError, match=r"unknown corpus source\(s\) \['shakespeare'\]; known sources: .*brown"):
        load_corpus(sources=["brown", "shakespeare"])
    for fraction in (0, 1, -0.1, 1.5):
        with pytest.raises(ValueError, match="heldout_fraction"):
            load_corpus("heldout", heldout_fraction=fraction)


def test_corpus_stats_from_manifest(manifest):
    stats = corpus_stats()
    assert set(stats["sources"]) == set(CORPUS_SOURCES)
    for name, row in stats["sources"].items():
        entry = manifest["sources"][name]
        assert row["documents"] == entry["n_documents"] and row["chars"] == entry["n_chars"]
        assert row["train_documents"] + row["heldout_documents"] == row["documents"]
        assert row["train_chars"] + row["heldout_chars"] == row["chars"]
    assert stats["total"]["chars"] == manifest["n_chars"] and stats["sha256"] == manifest["sha256"]


# --- damaged or missing copies ------------------------------------------------------------------------------------


@pytest.fixture
def copy_dir(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped corpus folder that the loader is pointed at."""
    target = tmp_path / "corpus"
    shutil.copytree(corpus.CORPUS_DIR, target)
    monkeypatch.setattr(corpus, "CORPUS_DIR", target)
    return target


def test_corrupted_copy_names_file_and_rebuild_command(copy_dir):
    path = copy_dir / corpus.CORPUS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorpusError) as err:
        load_corpus()
    message = str(err.value)
    assert str(path) in message and "does not match" in message
    assert "python tools/build_corpus.py" in message and "--check" in message


def test_missing_file_or_manifest_is_a_clear_error(copy_dir):
    (copy_dir / corpus.CORPUS_FILE).unlink()
    with pytest.raises(CorpusError, match=re.escape(str(copy_dir / corpus.CORPUS_FILE)) + ".*missing.*build_corpus"):
        load_corpus()
    (copy_dir / corpus.MANIFEST_FILE).unlink()
    with pytest.raises(CorpusError, match="manifest.*missing.*build_corpus"):
        corpus_stats()


def test_loader_reads_a_small_valid_corpus(tmp_path):
    """The loader end to end on a tiny corpus in another folder (passed as corpus_dir)."""
    records = [
        {"id": f"{src}/{i}", "source": src, "title": f"{src} {i}", "text": f"Text {i} of {src}."}
        for src in ("a", "b")
        for i in range(4)
    ]
    raw = "".join(json.dumps(r) + "\n" for r in sorted(records, key=lambda r: r["id"])).encode()
    packed = lzma.compress(raw)
    (tmp_path / corpus.CORPUS_FILE).write_bytes(packed)
    splits = {"train": {"n_documents": 3, "n_chars": 0}, "heldout": {"n_documents": 1, "n_chars": 0}}
    (tmp_path / corpus.MANIFEST_FILE).write_text(
        json.dumps(
            {
                "file": corpus.CORPUS_FILE,
                "sha256": hashlib.sha256(packed).hexdigest(),
                "sources": {s: {"n_documents": 4, "n_chars": 0, "splits": splits} for s in ("a", "b")},
            }
        )
    )
    small = load_corpus(corpus_dir=tmp_path)
    assert [d.id for d in small] == sorted(r["id"] for r in records)
    held = load_corpus("heldout", corpus_dir=tmp_path)
    assert sorted(d.source for d in held) == ["a", "b"]
    with pytest.raises(ValueError, match=r"known sources: \['a', 'b'\]"):
        load_corpus(sources=["brown"], corpus_dir=tmp_path)
    assert corpus_stats(corpus_dir=tmp_path)["total"]["documents"] == 8


# --- the rebuild tool's pieces (tools/corpus/, behind tools/build_corpus.py), on small inputs ---------------------


@pytest.fixture(scope="module")
def tool():
    """tools/corpus/'s modules as one namespace: the package is loaded by file path (tools/ is not importable)."""
    folder = REPO / "tools" / "corpus"
    spec = importlib.util.spec_from_file_location(
        "_cbinterp_tools_corpus", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package  # its modules import each other relatively, through the package's entry
    spec.loader.exec_module(package)
    modules = [importlib.import_module(f"{spec.name}.{info.name}") for info in pkgutil.iter_modules([str(folder)])]
    yield types.SimpleNamespace(**{k: v for m in modules for k, v in vars(m).items() if not k.startswith("_")})
    for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
        sys.modules.pop(name)


def test_tool_detokenizes_brown_tokens(tool):
    words = [
        "``",
        "Only",
        "a",
        "handful",
        "''",
        ",",
        "the",
        "jury",
        "said",
        ",",
        "``",
        "came",
        "(",
        "as",
        "expected",
        ")",
        "from",
        "Mr.",
        "Pye",
        "''",
        ".",
        "He",
        "is",
        "4'",
        "10''",
        "''",
        "tall",
        "--",
        "the",
        "'",
        "Met",
        "'",
        "said",
        "Jr.",
        ".",
    ]
    assert tool.detokenize(words) == (
        '"Only a handful," the jury said, "came (as expected) from Mr. Pye." He is 4\' 10" tall -- the \'Met\' said Jr.'
    )
    raw = "\n\n\tThe/at jury/nn said/vbd ./.\nIt/pps left/vbd ./.\n\n\tNext/ap one/cd ./.\nHeading/nn-hl\n"
    assert tool.brown_file_text(raw) == "The jury said. It left.\nNext one.\nHeading"


def test_tool_strips_wiki_markup(tool):
    markup = (
        "{{Infobox person|name=X|image=[[File:X.jpg|thumb|A [[nested]] caption]]}}\n"
        "'''Ada''' was a [[mathematician|mathematical]] [[writer]]s<ref>Cite {{cite book|t=Y}}</ref> "
        "born in {{convert|5|km|mi}} of [[London]].<ref name=a/> (; {{IPA|/x/}})\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n"
        "== Life ==\nShe wrote [http://example.org notes] &ndash; many.<!-- hidden -->\n"
        "* A list item\n[[Category:People]]\n== References ==\n* Some book\n"
    )
    text = tool.wiki_to_text(markup)
    assert (
        text == "Ada was a mathematical writers born in 5 km of London. (/x/)\nLife\nShe wrote notes – many.\n"
        "A list item"
    )


def test_tool_reads_r_lazyload_databases(tool, tmp_path):
    def i32(*values):
        return struct.pack(f">{len(values)}i", *values)

    def chars(text):
        raw = text.encode()
        return i32(9 | 1 << 15, len(raw)) + raw  # CHARSXP marked UTF-8

    def strings(items):
        return i32(16, len(items)) + b"".join(i32(9, -1) if s is None else chars(s) for s in items)

    def names(items):  # attribute pairlist: names = items
        return i32(2 | 1 << 10) + i32(1) + chars("names") + strings(items) + i32(254)

    header = b"X\n" + i32(3, 0x40201, 0x30500, 5) + b"UTF-8"  # format 3 with its native-encoding field
    payload = header + strings(["Chapter 1", "", "It was a — café.", None])
    record = struct.pack(">I", len(payload)) + zlib.compress(payload)
    variables = i32(19 | 1 << 9, 1) + i32(13, 2, 0, len(record)) + names(["novel"])
    index = (
        header
        + i32(19 | 1 << 9, 3)
        + variables
        + i32(19, 0)
        + i32(10, 1, 1)
        + names(["variables", "references", "compressed"])
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(record)
    assert tool.read_r_lazyload(tmp_path) == {"novel": ["Chapter 1", "", "It was a — café.", None]}


def test_tool_check_reports_mismatches(tool, tmp_path, manifest, capsys):
    shutil.copytree(corpus.CORPUS_DIR, tmp_path / "ok")
    assert tool.check_against(manifest, tmp_path / "ok") == []
    other = {**manifest, "sha256": "0" * 64}
    assert tool.check_against(other, tmp_path / "ok") == [
        "the rebuild has the same documents but other xz bytes (another xz library?)"
    ]
    changed = {**other, "jsonl_sha256": "1" * 64}
    assert tool.check_against(changed, tmp_path / "ok") == ["the rebuilt documents differ from the manifest's"]
    assert any("missing" in p for p in tool.check_against(manifest, tmp_path / "nowhere"))
