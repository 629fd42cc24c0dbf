"""`CodeCache`: the code ids (and optional activations) of a cached data set, in memory or read lazily from disk."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from cbinterp.codecache import integrity
from cbinterp.codecache.folder import read_marker
from cbinterp.codecache.identity import describe_mismatch, model_identity, tokenizer_only_difference
from cbinterp.codecache.layout import chunk_info, code_dtype, read_codes
from cbinterp.codecache.vocab import Vocabulary
from cbinterp.core.codebooks.attach import require_hooked_transformer
from cbinterp.core.codebooks.naming import did_you_mean
from cbinterp.core.storage import manifest as mf
from cbinterp.core.storage.tokenizer import load_tokenizer
from cbinterp.core.tl_compat import Model

__all__ = ["CodeCache"]


class _Part:
    """One chunk of a cache (or the whole of an in-memory one): documents `first_doc ..` and their arrays."""

    def __init__(self, first_doc: int, n_docs: int, n_tokens: int, keys: set | None = None, file=None, arrays=None):
        self.first_doc, self.n_docs, self.n_tokens = first_doc, n_docs, n_tokens
        self.file, self.arrays, self._keys = file, arrays, keys
        self.opener = None  # set by CodeCache: opens the file once it is checked

    @property
    def keys(self) -> set:
        if self._keys is None:
            with self.opener(self) as f:
                self._keys = set(f.keys())
        return self._keys


class CodeCache:
    """Code ids (and optional activations) of every token of a data set, with the token ids and their places.

    Made by `cache_codes`, or reopened from disk with `CodeCache.open(directory)` (no model needed). On disk,
    nothing is read until asked for, and then only the arrays asked for (each chunk's sha256 checked the first time
    it is read), kept in their stored dtypes; `doc` and `pos` are derived from one offset per document.
    """

    def __init__(
        self,
        meta: dict,
        arrays: dict[str, Tensor] | None = None,
        directory: Path | None = None,
        tokenizer=None,
    ):
        self.meta = meta
        self.directory = directory
        self._arrays = arrays
        self._tokenizer = tokenizer
        self._vocabulary: Vocabulary | None = None
        self._part_list: list[_Part] | None = None
        self._memo: dict[str, Tensor] = {}
        self._verified: set[str] = set()
        self._offsets: Tensor | None = None

    # -- text ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer the cache was made with (kept from the model), or None."""
        if self._tokenizer is None and self.meta.get("tokenizer_files") and self.directory is not None:
            for name in self.meta["tokenizer_files"]:
                integrity.check_member(self.directory, self.meta, name)
            self._tokenizer = load_tokenizer(self.directory)
        return self._tokenizer

    @property
    def vocabulary(self) -> Vocabulary | None:
        """How the cached token ids read as text (from the tokenizer or the stored token strings), or None."""
        if self._vocabulary is None:
            if self.tokenizer is not None:
                self._vocabulary = Vocabulary(self.tokenizer)
            elif self.meta.get("token_strings"):
                self._vocabulary = Vocabulary(self.meta["token_strings"])
        return self._vocabulary

    @classmethod
    def open(cls, directory: str | os.PathLike) -> CodeCache:
        """The cache in `directory`: reads its marker only; arrays are read when first asked for."""
        path = Path(directory)
        return cls(read_marker(path), directory=path)

    # -- loading -------------------------------------------------------------------------------------------
    def _parts(self) -> list[_Part]:
        if self._part_list is None:
            if self._arrays is not None:
                n_tokens = int(self._arrays["tokens"].shape[0]) if "tokens" in self._arrays else 0
                n_docs = int(self.meta.get("n_docs", 0))
                self._part_list = [_Part(0, n_docs, n_tokens, keys=set(self._arrays), arrays=self._arrays)]
            else:
                parts, first = [], 0
                for chunk in self.meta["chunks"]:  # checked on open: in document order, names inside the folder
                    first = chunk.get("first_doc", first)  # layout 1 chunks follow each other in listed order
                    part = _Part(first, chunk["n_docs"], chunk["n_tokens"], file=self.directory / chunk["file"])
                    part.opener = self._open_part
                    parts.append(part)
                    first += chunk["n_docs"]
                self._part_list = parts
        return self._part_list

    def _open_part(self, part: _Part):
        """The chunk file of `part`, opened; checked first (the first time).

        It must be a file of the folder, no link, of its recorded size and sha256, with a header that agrees with the
        marker."""
        name = part.file.name
        if name not in self._verified:
            integrity.check_member(self.directory, self.meta, name)
            header = chunk_info(part.file) if self.meta.get("layout", 1) >= 2 else None
            entry = {"first_doc": part.first_doc, "n_docs": part.n_docs, "n_tokens": part.n_tokens}
            integrity.check_header(self.directory, name, entry, header, self.meta)
            self._verified.add(name)
        return integrity.open_chunk(part.file)

    def _read(self, part: _Part, key: str) -> Tensor:
        """One array of one part, as stored."""
        if part.arrays is not None:
            return part.arrays[key]
        with self._open_part(part) as f:
            return f.get_tensor(key)

    def _raw(self, key: str) -> Tensor:
        """`key` ("tokens", "codes/<name>", "act/<hook>") over the whole cache, in its stored dtype (kept)."""
        if key not in self._memo:
            if self.n_tokens == 0:
                raise ValueError("This cache holds no tokens yet.")
            parts = [p for p in self._parts() if p.n_tokens > 0]
            if any(key not in p.keys for p in parts):
                raise KeyError(key)
            tensors = [self._read(p, key) for p in parts]
            self._memo[key] = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return self._memo[key]

    def _get(self, key: str) -> Tensor:
        """An array as stored (`doc` and `pos` as int32, derived when the layout stores offsets)."""
        if key in ("doc", "pos"):
            return getattr(self, key).to(torch.int32)
        return self._raw(key)

    def _part_lengths(self, part: _Part) -> Tensor | None:
        if "doc_lengths" not in part.keys:
            return None
        lengths = self._read(part, "doc_lengths").long()
        if lengths.shape != (part.n_docs,) or int(lengths.sum()) != part.n_tokens:
            raise ValueError(
                f"The chunk {part.file} holds {lengths.numel()} documents of {int(lengths.sum())} tokens, but the "
                f"marker lists it with {part.n_docs} documents of {part.n_tokens} tokens. Restore the cache, or delete "
                "the folder and run cache_codes again."
            )
        return lengths

    @property
    def doc_offsets(self) -> Tensor | None:
        """Int64 `(n_docs + 1,)`: document `d`'s tokens are the flat indices `doc_offsets[d]:doc_offsets[d + 1]`.

        In position order; None for a cache that stores coordinates per token (older layout, `subset_cache`)."""
        if self._offsets is None:
            parts = self._parts()
            if not all("doc_lengths" in p.keys for p in parts if p.n_tokens > 0 or p.arrays is not None):
                return None
            lengths = torch.zeros(self.n_docs, dtype=torch.int64)
            for p in parts:
                if "doc_lengths" in p.keys:
                    lengths[p.first_doc : p.first_doc + p.n_docs] = self._part_lengths(p)
            self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        return self._offsets

    # -- metadata ------------------------------------------------------------------------------------------
    @property
    def codebook_names(self) -> list[str]:
        """The names of the cached codebooks (their hook names), in the order they were recorded."""
        return list(self.meta["codebooks"])

    @property
    def hook_names(self) -> list[str]:
        """The hooks whose activations the cache stores beside the codes (`cache_codes(hooks=...)`)."""
        return list(self.meta["hooks"])

    def n_codes(self, name: str) -> int:
        """The number of codes of codebook `name`."""
        return self._codebook(name)["n_codes"]

    @property
    def n_tokens(self) -> int:
        """The number of cached token positions, over all documents."""
        return (
            int(self.meta["n_tokens"])
            if self._arrays is None
            else int(self._arrays.get("tokens", torch.zeros(0)).shape[0])
        )

    @property
    def n_docs(self) -> int:
        """The number of cached documents."""
        return int(self.meta["n_docs"])

    def _codebook(self, name: str) -> dict:
        if name not in self.meta["codebooks"]:
            raise KeyError(
                f"No codebook {name!r} in this cache{did_you_mean(name, self.codebook_names)} "
                f"It has {self.codebook_names}."
            )
        return self.meta["codebooks"][name]

    def bytes_per_token(self, name: str) -> int:
        """Bytes the codes of codebook `name` take per token on disk (k ids, per head for attention)."""
        info = self._codebook(name)
        count = 1
        for size in info["shape"]:
            count *= size
        return count * torch.empty(0, dtype=self.storage_dtype(name)).element_size()

    def storage_dtype(self, name: str) -> torch.dtype:
        """The dtype codebook `name`'s ids are stored in (the narrowest that holds its ids and the no-code id)."""
        if self._arrays is not None and f"codes/{name}" in self._arrays:
            return self._arrays[f"codes/{name}"].dtype
        return code_dtype(self._codebook(name)["n_codes"])

    # -- arrays --------------------------------------------------------------------------------------------
    def codes(self, name: str) -> Tensor:
        """Code ids of codebook `name`: int64 `(n_tokens, k)`, or `(n_tokens, heads, k)` for per-head codebooks."""
        info = self._codebook(name)
        return read_codes(self._raw(f"codes/{name}"), info["n_codes"])

    def stored_codes(self, name: str) -> Tensor:
        """Code ids of codebook `name` as stored (`storage_dtype`; any value >= n_codes, or < 0, is no code).

        What a query compares against without widening every id to int64."""
        self._codebook(name)
        return self._raw(f"codes/{name}")

    def stored_tokens(self) -> Tensor:
        """Token ids as stored (int32)."""
        return self._raw("tokens")

    @property
    def tokens(self) -> Tensor:
        """Int64 `(n_tokens,)`: every cached token id, documents one after another."""
        return self._raw("tokens").long()

    @property
    def doc(self) -> Tensor:
        """Int64 `(n_tokens,)`: each token's document."""
        offsets = self.doc_offsets
        if offsets is not None:
            return torch.repeat_interleave(torch.arange(self.n_docs), offsets.diff())
        return self._raw("doc").long()

    @property
    def pos(self) -> Tensor:
        """Int64 `(n_tokens,)`: each token's place in its document's row."""
        if self.doc_offsets is None:
            return self._raw("pos").long()
        out = []
        for p in self._parts():
            if p.n_tokens == 0:
                continue
            if "pos" in p.keys:  # stored where positions are not 0, 1, ... (masks with holes)
                out.append(self._read(p, "pos").long())
            else:
                lengths = self._part_lengths(p)
                starts = torch.cumsum(lengths, 0) - lengths
                out.append(torch.arange(p.n_tokens) - torch.repeat_interleave(starts, lengths))
        if not out:
            raise ValueError("This cache holds no tokens yet.")
        return torch.cat(out)

    def doc_pos(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Int64 (doc, pos) of the tokens at flat `index`.

        Without building them for every token when the layout stores offsets (and no chunk stores positions)."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        offsets = self.doc_offsets
        if offsets is None or any("pos" in p.keys for p in self._parts() if p.n_tokens > 0):
            return self.doc[index], self.pos[index]
        doc = torch.searchsorted(offsets, index, right=True) - 1
        return doc, index - offsets[doc]

    def activations(self, hook_name: str) -> Tensor:
        """Stored activations of `hook_name`, `(n_tokens, ...)` (float16 unless cached with another dtype)."""
        if hook_name not in self.meta["hooks"]:
            raise KeyError(f"Hook {hook_name!r} was not cached; this cache has activations of {self.hook_names}.")
        return self._raw(f"act/{hook_name}")

    def check_model(self, model: Model, tokenizer_name: str | None = None, weights: bool = True) -> None:
        """Raise ValueError if `model` is not what this cache was made with.

        Compared: codebooks, n_codes, vocabulary, size, tokenizer (`tokenizer_name`, as given to `cache_codes`), and
        (with `weights`, when the cache recorded them) the weights themselves."""
        current = model_identity(require_hooked_transformer(model), tokenizer_name)
        stored = {k: self.meta.get(k) for k in current}
        if stored != current:
            tokenizer_only = tokenizer_only_difference(stored, current)
            if tokenizer_only:
                raise ValueError(f"This cache does not match: {tokenizer_only}.")
            raise ValueError(f"This cache was made with a different model: {describe_mismatch(stored, current)}.")
        recorded = self.meta.get("weights_sha256")
        if weights and recorded is not None and recorded != mf.weights_fingerprint(model):
            raise ValueError("This cache was made with a different model: other weights (fingerprints differ).")

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return (
            f"CodeCache(n_tokens={self.n_tokens}, n_docs={self.n_docs}, codebooks={self.codebook_names}, "
            f"hooks={self.hook_names}{where})"
        )
