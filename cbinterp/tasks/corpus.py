"""Loader for the shipped English corpus (Wikipedia, Lee news, Brown, World English Bible, Austen) and its splits.

The corpus is a derived, compressed file committed under ``cbinterp/assets/corpus`` together with a manifest
that pins its sha256; ``tools/build_corpus.py`` rebuilds it from package registries. Splits are chosen per
document from a sha256 of the document id, so they are the same on every machine and Python version.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CORPUS_DIR",
    "CORPUS_FILE",
    "CORPUS_SOURCES",
    "MANIFEST_FILE",
    "REBUILD_COMMAND",
    "CorpusError",
    "Document",
    "assign_splits",
    "corpus_stats",
    "load_corpus",
    "split_halves",
]

# Module-level so tests (and users with a rebuilt copy elsewhere) can point the loader at another folder.
CORPUS_DIR = Path(__file__).resolve().parent.parent / "assets" / "corpus"
CORPUS_FILE = "english.jsonl.xz"
MANIFEST_FILE = "manifest.json"
CORPUS_SOURCES: tuple[str, ...] = ("austen", "bible", "brown", "lee", "wikipedia")
REBUILD_COMMAND = "python tools/build_corpus.py"
DEFAULT_HELDOUT_FRACTION = 0.05
SPLITS = ("train", "heldout")

# Salts keep the held-out choice and the halves choice independent of each other.
_SPLIT_SALT = "cbinterp-corpus-split-v1"
_HALVES_SALT = "cbinterp-corpus-halves-v1"


class CorpusError(RuntimeError):
    """The shipped corpus file or its manifest is missing, damaged or does not match."""


@dataclass(frozen=True)
class Document:
    """One document of the corpus."""

    id: str
    source: str
    title: str
    text: str


def _unit_hash(salt: str, doc_id: str) -> float:
    """A number in [0, 1) from sha256(salt:id), stable across processes (unlike the built-in hash())."""
    digest = hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _by_source(docs: Sequence[Document]) -> dict[str, list[Document]]:
    """Documents grouped by source, in first-seen order."""
    groups: dict[str, list[Document]] = {}
    for doc in docs:
        groups.setdefault(doc.source, []).append(doc)
    return groups


def _check_fraction(heldout_fraction: float) -> float:
    """The fraction as a float, or ValueError when it is not strictly between 0 and 1."""
    fraction = float(heldout_fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout_fraction must be strictly between 0 and 1, got {heldout_fraction!r}")
    return fraction


def assign_splits(docs: Sequence[Document], heldout_fraction: float = DEFAULT_HELDOUT_FRACTION) -> dict[str, str]:
    """Map each document id to "train" or "heldout", stratified by source."""
    fraction = _check_fraction(heldout_fraction)
    splits: dict[str, str] = {}
    for group in _by_source(docs).values():
        ranked = sorted(group, key=lambda d: (_unit_hash(_SPLIT_SALT, d.id), d.id))
        # ceil and at least one, so every source is held out and no source falls below the fraction; a source with
        # a single document then has it held out, which is the price of "every source is held out".
        n_heldout = min(len(ranked), max(1, math.ceil(fraction * len(ranked))))
        for rank, doc in enumerate(ranked):
            splits[doc.id] = "heldout" if rank < n_heldout else "train"
    return splits


def split_halves(docs: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """Split documents into two disjoint halves by id hash, each source alternating between the halves."""
    first: list[Document] = []
    second: list[Document] = []
    for group in _by_source(docs).values():
        ranked = sorted(group, key=lambda d: (_unit_hash(_HALVES_SALT, d.id), d.id))
        # Alternating over the hash order puts a source with >= 2 documents in both halves, sizes within one.
        first.extend(ranked[0::2])
        second.extend(ranked[1::2])
    return sorted(first, key=lambda d: d.id), sorted(second, key=lambda d: d.id)


def _rebuild_hint(directory: Path) -> str:
    """The sentence every corpus error ends with."""
    return f"Rebuild it with `{REBUILD_COMMAND}` (writes {directory}) and check it with `{REBUILD_COMMAND} --check`."


def _read_manifest(directory: Path) -> dict:
    """The parsed manifest, or CorpusError naming the file."""
    path = directory / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"Corpus manifest {path} is missing. {_rebuild_hint(directory)}") from None
    except (OSError, ValueError) as exc:
        raise CorpusError(f"Corpus manifest {path} cannot be read ({exc}). {_rebuild_hint(directory)}") from None


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# Parsed corpora keyed by (folder, size, mtime), so a file is verified once per process but a replaced or
# damaged copy at the same place is verified again.
_CACHE: dict[tuple[str, int, int], tuple[Document, ...]] = {}


def _load_all(directory: Path) -> tuple[Document, ...]:
    """All documents of the corpus in `directory`, verified against its manifest on first load."""
    manifest = _read_manifest(directory)
    path = directory / manifest.get("file", CORPUS_FILE)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CorpusError(f"Corpus file {path} is missing. {_rebuild_hint(directory)}") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    actual = _sha256_file(path)
    if actual != manifest.get("sha256"):
        raise CorpusError(
            f"Corpus file {path} does not match its manifest {directory / MANIFEST_FILE}: sha256 is "
            f"{actual}, expected {manifest.get('sha256')}. {_rebuild_hint(directory)}"
        )
    docs = []
    try:
        with lzma.open(path, "rt", encoding="utf-8", newline="\n") as lines:
            for line in lines:
                record = json.loads(line)
                docs.append(Document(record["id"], record["source"], record["title"], record["text"]))
    except (lzma.LZMAError, EOFError, ValueError, KeyError) as exc:
        # Reached only if the manifest itself was edited to match a bad file.
        raise CorpusError(f"Corpus file {path} cannot be parsed ({exc!r}). {_rebuild_hint(directory)}") from None
    result = tuple(docs)
    _CACHE[key] = result
    return result


def _known_sources(manifest: dict) -> tuple[str, ...]:
    """Source names in the manifest, sorted."""
    return tuple(sorted(manifest.get("sources", {})))


def load_corpus(
    split: str | None = None,
    sources: Sequence[str] | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    *,
    corpus_dir: str | Path | None = None,
) -> list[Document]:
    """Documents of the shipped corpus, sorted by id, optionally one split and some sources only."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be None, 'train' or 'heldout', got {split!r}")
    fraction = _check_fraction(heldout_fraction)
    directory = Path(corpus_dir) if corpus_dir is not None else CORPUS_DIR
    known = _known_sources(_read_manifest(directory))
    if sources is not None:
        # A bare string is a Sequence[str] of characters; take it as one source name instead.
        wanted = (sources,) if isinstance(sources, str) else tuple(sources)
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise ValueError(f"unknown corpus source(s) {unknown}; known sources: {list(known)}")
    docs = _load_all(directory)
    if split is not None:
        # Splits are assigned on the whole corpus, so filtering by source never moves a document between splits.
        assignment = assign_splits(docs, fraction)
        docs = tuple(d for d in docs if assignment[d.id] == split)
    if sources is not None:
        keep = set(wanted)
        docs = tuple(d for d in docs if d.source in keep)
    return list(docs)


def corpus_stats(*, corpus_dir: str | Path | None = None) -> dict:
    """Documents and characters per source and split, read from the manifest (no decompression)."""
    directory = Path(corpus_dir) if corpus_dir is not None else CORPUS_DIR
    manifest = _read_manifest(directory)
    per_source = {}
    for name in _known_sources(manifest):
        entry = manifest["sources"][name]
        per_source[name] = {
            "documents": entry["n_documents"],
            "chars": entry["n_chars"],
            **{
                f"{split}_{unit}": entry["splits"][split][f"n_{unit}"]
                for split in SPLITS
                for unit in ("documents", "chars")
            },
        }
    total = {key: sum(row[key] for row in per_source.values()) for key in next(iter(per_source.values()), {})}
    return {
        "file": manifest.get("file", CORPUS_FILE),
        "sha256": manifest.get("sha256"),
        "heldout_fraction": manifest.get("heldout_fraction"),
        "total": total,
        "sources": per_source,
    }
