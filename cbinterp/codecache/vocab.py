"""How token ids read as text: per-id strings, per-id bytes (exact for byte-level BPE), or a tokenizer.

Concatenating `tokenizer.decode([i])` strings is lossy for byte-level BPE: a character whose UTF-8 bytes are
split over two tokens decodes to "\ufffd" twice and shifts every later character span. A `Vocabulary` built from a
byte-level tokenizer keeps each id's bytes instead, decodes a document's bytes as a whole, and gives every token
the span of the characters its bytes belong to (a character split over tokens belongs to each of them).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import numpy as np

__all__ = ["Vocabulary", "byte_level_alphabet", "vocabulary_of"]


def byte_level_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE (GPT-2 style) writes for each byte value, mapped back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # bytes without a printable stand-in are shifted above 255, in order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and type(decoder).__name__ == "ByteLevel"


def _tokenizer_bytes(tokenizer) -> list[bytes]:
    alphabet = byte_level_alphabet()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = []
    for i, piece in enumerate(pieces):
        if i in special or piece is None:
            out.append(b"")  # special tokens (BOS, padding) are not text
        elif all(c in alphabet for c in piece):
            out.append(bytes(alphabet[c] for c in piece))
        else:  # an added token written as plain text
            out.append(piece.encode("utf-8"))
    return out


class Vocabulary:
    """Text of token ids. Build it from per-id strings, per-id bytes, or a Hugging Face tokenizer."""

    def __init__(self, source: Vocabulary | Sequence[str] | Sequence[bytes] | object):
        if isinstance(source, Vocabulary):
            self.pieces, self.is_bytes = source.pieces, source.is_bytes
        elif hasattr(source, "convert_ids_to_tokens") and hasattr(source, "decode"):
            if _is_byte_level(source):
                self.pieces, self.is_bytes = _tokenizer_bytes(source), True
            else:  # no byte view of the vocabulary: fall back to one decoded string per id
                self.pieces = [source.decode([i]) for i in range(len(source))]
                self.is_bytes = False
        elif isinstance(source, (str, bytes)) or not hasattr(source, "__len__"):
            raise TypeError(
                "Expected token strings (one str per vocabulary id), token bytes, or a tokenizer; "
                f"got {type(source).__name__}."
            )
        else:
            pieces = list(source)
            self.is_bytes = bool(pieces) and all(isinstance(p, (bytes, bytearray)) for p in pieces)
            self.pieces = [bytes(p) for p in pieces] if self.is_bytes else [str(p) for p in pieces]

    def __len__(self) -> int:
        return len(self.pieces)

    def _check(self, ids: np.ndarray) -> None:
        bad = (ids < 0) | (ids >= len(self.pieces))
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} has no text: the vocabulary has {len(self.pieces)} entries.")

    def spans(self, ids: Sequence[int | np.integer] | np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
        """The text of `ids` read as one document, and each token's character span `[start, end)` in it."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self._check(ids)
        pieces = [self.pieces[i] for i in ids]
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        if not self.is_bytes:
            return "".join(pieces), starts, ends
        data = b"".join(pieces)
        text, char_of_byte = _decode_with_map(data)
        c_starts = np.zeros(len(ids), dtype=np.int64)
        c_ends = np.zeros(len(ids), dtype=np.int64)
        nonempty = lengths > 0
        if len(data):
            c_starts[nonempty] = char_of_byte[starts[nonempty]]
            c_ends[nonempty] = char_of_byte[ends[nonempty] - 1] + 1
        # zero-length tokens sit where the next character begins and cover nothing
        at = np.minimum(starts[~nonempty], max(len(data) - 1, 0))
        c_starts[~nonempty] = c_ends[~nonempty] = char_of_byte[at] if len(data) else 0
        return text, c_starts, c_ends

    def text(self, ids: Sequence[int | np.integer] | np.ndarray) -> str:
        """The text of `ids`, decoded together (so characters split over tokens come out whole)."""
        return self.spans(ids)[0]


def _decode_with_map(data: bytes) -> tuple[str, np.ndarray]:
    """UTF-8 text of `data` (invalid bytes replaced) and, for every byte, the index of the character it is part of."""
    buf = np.frombuffer(data, dtype=np.uint8)
    starts = (buf & 0xC0) != 0x80  # UTF-8 continuation bytes are 10xxxxxx
    text = data.decode("utf-8", errors="replace")
    if int(starts.sum()) == len(text) and (len(buf) == 0 or starts[0]):
        return text, np.cumsum(starts) - 1
    # malformed bytes: walk them with an incremental decoder, which replaces them as `decode` does
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    char_of_byte = np.zeros(len(buf), dtype=np.int64)
    chars, pending = [], 0
    for j in range(len(buf)):
        out = decoder.decode(data[j : j + 1], final=j == len(buf) - 1)
        if out:
            char_of_byte[pending : j + 1] = len(chars)
            chars.extend(out)
            pending = j + 1
    char_of_byte[pending:] = max(len(chars) - 1, 0)
    return "".join(chars), char_of_byte


def vocabulary_of(cache_or_tokens, token_strings=None) -> Vocabulary:
    """`Vocabulary(token_strings)` when given, else the cache's own (`CodeCache.vocabulary`)."""
    if token_strings is not None:
        return Vocabulary(token_strings)
    vocabulary = getattr(cache_or_tokens, "vocabulary", None)
    if vocabulary is None:
        raise ValueError(
            "No text for these tokens: the cache was made from a model without a tokenizer and without "
            "token_strings. Pass token_strings= (a tokenizer, or one string per token id), or cache with "
            "cache_codes(..., token_strings=...)."
        )
    return vocabulary
