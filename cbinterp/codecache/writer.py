"""Where `cache_codes` puts the arrays it records.

That is chunk files in a cache folder (`ChunkWriter`), or memory (`MemoryWriter`).

Under `torch.distributed` the ranks write disjoint chunks into the same folder and rank 0 alone writes the marker,
once all are done. The handshake: rank 0 checks (and maybe cleans) the folder while the others wait; every rank then
sees the folder as it was before anyone writes; at the end every rank reports how its share ended (a rank that
stopped tells the others, which stop too instead of waiting), rank 0 lists every chunk, and all read that marker.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from jaxtyping import Int
from safetensors.torch import save as save_tensors
from torch import Tensor

from cbinterp.codecache.folder import list_chunks, open_for_writing, pending_chunks, read_marker, store_tokenizer
from cbinterp.codecache.layout import CHUNK_INFO_KEY, EMPTY_CHAIN, LAYOUT, chain_docs, chunk_name
from cbinterp.codecache.reader import CodeCache
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.atomic import atomic_file
from cbinterp.core.training.distributed import broadcast_object, gather_objects, wait_for_all_ranks

__all__ = ["ChunkWriter", "MemoryWriter", "Writer"]

#: Arrays of consecutive documents: "doc_lengths", "tokens", "pos", "codes/<codebook>", "act/<hook>".
Arrays = dict[str, Tensor]


class ChunkWriter:
    """Collects one contiguous run of documents at a time and writes it as one chunk file into the cache folder.

    The marker lists a chunk once the chunks before it are there (at once in one process; at the end, by rank 0,
    under torch.distributed). Made by `ChunkWriter.open`."""

    def __init__(self, path: Path, meta: dict, rank: int = 0, world: int = 1):
        self.path, self.meta, self.rank, self.world = path, meta, rank, world
        self.weights_sha256, self.run_sha256 = meta["weights_sha256"], meta.get("run_sha256")
        self.file_entries: dict[str, dict] = dict(meta["files"])
        # chunk name -> entry: listed, adoptable and (rank 0, one process) new ones
        self.known: dict[str, dict] = {c["file"]: c for c in meta["chunks"]}
        self.known.update(pending_chunks(path, meta))
        #: The chunks there before this run, in document order: their documents are checked, not cached again.
        self.covered: list[dict] = sorted(self.known.values(), key=lambda e: e["first_doc"])
        self._reported = False  # whether this rank has told the others how it ended (exactly once)
        self._start_chunk()

    @classmethod
    def open(
        cls, path: Path, meta: dict, identity: dict, hooks: list[str], tokenizer, rank: int, world: int
    ) -> ChunkWriter:
        """The writer of this rank into the cache folder `path`, once rank 0 has checked it.

        Rank 0 checks the folder (`open_for_writing`: a new cache, or the resume of the same run) and keeps
        `tokenizer`'s files there; every rank raises rank 0's refusal."""
        failure = None
        if rank == 0:
            try:
                meta = open_for_writing(path, meta, identity, hooks)
                if tokenizer is not None and not meta.get("tokenizer_files"):
                    store_tokenizer(path, meta, tokenizer)
            except (OSError, ValueError) as err:
                failure = (type(err).__name__, str(err))
                if world == 1:
                    raise
        if world > 1:  # the others wait here until rank 0 has checked (and maybe cleaned) the folder
            failure = broadcast_object(failure)
            if failure is not None:
                kind, message = failure
                raise (FileExistsError if kind == "FileExistsError" else ValueError)(message)
            if rank != 0:
                meta = read_marker(path)
        writer = cls(path, meta, rank, world)
        if world > 1:  # every rank has seen the folder as it was before anyone writes a chunk into it
            wait_for_all_ranks()
        return writer

    def _start_chunk(self) -> None:
        self.pieces: list[Arrays] = []
        self.first_doc: int | None = None
        self.n_docs = self.n_tokens = 0
        self.chain = EMPTY_CHAIN
        self.seq_lens: set[int] = set()
        self.need_pos = False

    def add(self, first: int, arrays: Arrays, rows: Int[Tensor, "rows pos"], seq: int, need_pos: bool) -> None:
        """Buffer documents `first ..` (`rows` their cached ids, for the fingerprint); a gap starts a new chunk.

        Args:
            need_pos: whether `arrays["pos"]` must be stored (positions other than 0, 1, ... in a document).
        """
        if self.first_doc is not None and first != self.first_doc + self.n_docs:
            self.flush()  # a chunk holds consecutive documents only: the ones between are cached already
        if self.first_doc is None:
            self.first_doc = first
        self.pieces.append(arrays)
        self.n_docs += rows.shape[0]
        self.n_tokens += int(arrays["doc_lengths"].sum())
        self.chain = chain_docs(self.chain, rows)
        self.seq_lens.add(int(seq))
        self.need_pos |= need_pos

    def flush(self) -> None:
        """Write the buffered documents as one chunk file (atomically); in one process, list it in the marker."""
        if self.first_doc is None:
            return
        merged = concat(self.pieces)
        if not self.need_pos:  # every document's tokens are its positions 0, 1, ...: derived from doc_lengths
            merged.pop("pos", None)
        if self.n_tokens == 0:  # documents without tokens: only their (zero) lengths are stored
            merged = {"doc_lengths": merged["doc_lengths"]}
        info = {
            "first_doc": self.first_doc,
            "n_docs": self.n_docs,
            "n_tokens": self.n_tokens,
            "data_sha256": self.chain,
            "seq_lens": sorted(self.seq_lens),
        }
        name = chunk_name(self.first_doc)
        with atomic_file(self.path / name) as tmp:
            # serialised here and written to our own temporary: safetensors' save_file makes a temporary of its
            # own (".tmpXXXXXX") beside the target, which a killed writer would leave in the cache folder
            run = {"weights_sha256": self.weights_sha256, "run_sha256": self.run_sha256}
            header = {CHUNK_INFO_KEY: json.dumps({**info, **run})}
            tmp.write_bytes(save_tensors({k: v.contiguous() for k, v in merged.items()}, metadata=header))
            file_entry = mf.file_entry(tmp)
        self._start_chunk()
        self.known[name] = {"file": name, **info}
        self.file_entries[name] = file_entry
        if self.world == 1:  # one process: the marker follows every chunk, so an interrupted run keeps its prefix
            list_chunks(self.path, self.meta, self.known, self.file_entries)

    def finish(self) -> None:
        """Write the last chunk; under torch.distributed, hear how every rank ended and raise if one failed."""
        self.flush()
        if self.world > 1:
            failures = [(r, s) for r, s in enumerate(self._report(None)) if s is not None]
            if failures:
                r, message = failures[0]
                raise RuntimeError(
                    f"cache_codes: rank {r} failed ({message}). The cache at {self.path} still lists only what was "
                    "complete before this run; the finished chunks are kept. Fix it and run cache_codes again: it "
                    "resumes."
                )

    def abort(self, err: BaseException) -> None:
        """Tell the other ranks (once) that this one stopped with `err`, so that they stop too instead of waiting."""
        if self.world > 1 and not self._reported:
            with contextlib.suppress(RuntimeError):
                self._report(f"{type(err).__name__}: {err}")

    def _report(self, status: str | None) -> list:
        """Every rank's status (None: done), after telling them this rank's."""
        self._reported = True
        try:
            return gather_objects(status)
        except RuntimeError as err:
            raise RuntimeError(
                f"cache_codes on rank {self.rank}: another rank stopped before finishing its share ({err}). The cache "
                f"at {self.path} still lists only what was complete before this run; the finished chunks are kept. "
                "Fix what stopped it and run cache_codes again: it resumes (with any number of ranks)."
            ) from err

    def publish(self) -> None:
        """Once every rank is done: rank 0 lists every chunk (the others' too) at once, and every rank reads it."""
        if self.rank == 0:
            self.known.update(pending_chunks(self.path, {**self.meta, "chunks": list(self.known.values())}))
            list_chunks(self.path, self.meta, self.known, self.file_entries)
        if self.world > 1:  # then everyone opens the same cache
            wait_for_all_ranks()
            self.meta = read_marker(self.path)

    def result(self, n_docs: int) -> CodeCache:
        """The cache written (`n_docs`, the documents of the input, is the marker's already)."""
        return CodeCache.open(self.path)


class MemoryWriter:
    """Keeps every recorded piece, for a cache in memory (one process, nothing covered before)."""

    def __init__(self, meta: dict, tokenizer=None):
        self.meta, self.tokenizer = meta, tokenizer
        self.kept: list[Arrays] = []
        self.covered: list[dict] = []

    def add(self, first: int, arrays: Arrays, rows: Tensor, seq: int, need_pos: bool) -> None:
        """Keep the arrays of documents `first ..` (in order: memory caches have no gaps)."""
        self.kept.append(arrays)

    def flush(self) -> None:
        """Nothing to write: a cache in memory has no chunks."""

    def finish(self) -> None:
        """Nothing to write or to hear: a cache in memory is made by one process."""

    def abort(self, err: BaseException) -> None:
        """No other rank to tell."""

    def publish(self) -> None:
        """No marker to write."""

    def result(self, n_docs: int) -> CodeCache:
        """The cache in memory of the `n_docs` documents recorded."""
        parts = concat(self.kept)
        if not any(_needs_pos(p) for p in self.kept):
            parts.pop("pos", None)
        self.meta.update(n_docs=n_docs, n_tokens=int(parts["doc_lengths"].sum()), layout=LAYOUT)
        return CodeCache(self.meta, arrays=parts, tokenizer=self.tokenizer)


Writer = ChunkWriter | MemoryWriter


def concat(parts: list[Arrays]) -> Arrays:
    """Key-wise concatenation of pieces (a key some pieces lack, e.g. tokens of empty documents, joins the rest)."""
    keys = list(dict.fromkeys(key for p in parts for key in p))
    return {key: torch.cat([p[key] for p in parts if key in p]) for key in keys}


def _needs_pos(piece: Arrays) -> bool:
    """Whether a piece's positions are not just 0, 1, ... in each document (a mask with holes or left padding)."""
    if "pos" not in piece:
        return False
    lengths = piece["doc_lengths"]
    starts = torch.cumsum(lengths, 0) - lengths
    expected = torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)
    return not torch.equal(piece["pos"].long(), expected)
