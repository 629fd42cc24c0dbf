"""The documents a resumed cache holds already.

A resumed run checks that its input has the same ones there (by their fingerprint) and caches only the others."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from jaxtyping import Int
from torch import Tensor

from cbinterp.codecache.layout import EMPTY_CHAIN, chain_docs

__all__ = ["CoveredDocuments"]


class CoveredDocuments:
    """The chunks a cache folder held before this run (`entries`, marker entries).

    The input's documents are split and checked against them, in input order."""

    def __init__(self, entries: list[dict], path: Path | None):
        self.path = path
        self._ahead = sorted(entries, key=lambda e: e["first_doc"])  # popped as the input passes them
        self.resumed = bool(entries)
        self.n_docs = sum(e["n_docs"] for e in entries)
        self._chains: dict[str, str] = {}  # chunk -> fingerprint of this input's documents seen in it so far
        self._seq_lens: dict[str, set] = {}

    def split(self, first: int, end: int) -> Iterator[tuple[int, int, dict | None]]:
        """Documents `first .. end - 1` cut where covered chunks begin and end: `(start, stop, entry)`.

        `entry` is the covered chunk that holds documents `start .. stop - 1`, or None for documents to cache."""
        start = first
        while start < end:
            while self._ahead and self._ahead[0]["first_doc"] + self._ahead[0]["n_docs"] <= start:
                self._ahead.pop(0)
            entry = self._ahead[0] if self._ahead and self._ahead[0]["first_doc"] <= start else None
            if entry is not None:
                stop = min(end, entry["first_doc"] + entry["n_docs"])
            else:
                stop = min(end, self._ahead[0]["first_doc"]) if self._ahead else end
            yield start, stop, entry
            start = stop

    def check(self, entry: dict, rows: Int[Tensor, "rows pos"], end: int, seq: int) -> None:
        """Add `rows`, the input's documents `.. end - 1` of the covered chunk `entry`, to its fingerprint.

        At the chunk's last document, raise a ValueError unless the input's documents are the cached ones."""
        name = entry["file"]
        self._chains[name] = chain_docs(self._chains.get(name, EMPTY_CHAIN), rows)
        self._seq_lens.setdefault(name, set()).add(int(seq))
        if end == entry["first_doc"] + entry["n_docs"] and self._chains[name] != entry["data_sha256"]:
            raise ValueError(
                f"Cannot resume the code cache at {self.path}: documents {entry['first_doc']}..{end - 1} of this "
                f"input differ from those cached there (other data, or another sequence length: cached lengths "
                f"{entry['seq_lens']}, these {sorted(self._seq_lens[name])}). Resuming would mix two data sets; use "
                "another directory, or delete this one to start over."
            )

    def check_input_ended_after(self, n_docs: int) -> None:
        """Raise a ValueError if the input, of `n_docs` documents, ended before the covered ones."""
        if self._ahead and self._ahead[0]["first_doc"] + self._ahead[0]["n_docs"] > n_docs:
            raise ValueError(
                f"Cannot resume the code cache at {self.path}: this input has {n_docs} documents, fewer than the "
                f"{self._ahead[-1]['first_doc'] + self._ahead[-1]['n_docs']} already cached there (other data). Use "
                "another directory, or delete this one to start over."
            )
