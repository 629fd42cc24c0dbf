"""Regex features over the decoded text of a `CodeCache` (or token tensor), mapped to token masks.

A feature is a regular expression over the text of each document, decoded through a `Vocabulary` (per-token
strings, or for a byte-level tokenizer the document's bytes decoded as a whole). Each match's character span is
mapped to the tokens it covers: a token is covered when its character span `[start, end)` overlaps the match's;
a match that starts or ends inside a sub-word token covers that token; zero-length tokens cover nothing;
zero-length matches are ignored. `which` picks the first, the last or any covered token of every match.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cbinterp.codecache.vocab import Vocabulary, vocabulary_of

#: Anything `Vocabulary` accepts: a tokenizer, a Vocabulary, or per-id strings or bytes.
VocabularyLike = Vocabulary | Sequence[str] | Sequence[bytes] | object

__all__ = ["doc_token_indices", "token_positions"]

_WHICH = ("first", "last", "any")


def _flat_tokens(cache_or_tokens) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, doc, pos) flattened, int64 on the CPU."""
    if isinstance(cache_or_tokens, Tensor):
        t = cache_or_tokens.long().cpu()
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2:
            raise ValueError(f"tokens must be (seq,) or (n_docs, seq), got shape {tuple(cache_or_tokens.shape)}.")
        n, s = t.shape
        return t.reshape(-1), torch.arange(n).repeat_interleave(s), torch.arange(s).repeat(n)
    return cache_or_tokens.tokens.cpu(), cache_or_tokens.doc.cpu(), cache_or_tokens.pos.cpu()


def doc_token_indices(doc: Tensor, pos: Tensor) -> list[tuple[int, np.ndarray]]:
    """For each document id (ascending), the flat token indices of its tokens in position order."""
    doc_np, pos_np = doc.cpu().numpy(), pos.cpu().numpy()
    order = np.lexsort((pos_np, doc_np))
    if len(order) == 0:
        return []
    cuts = np.flatnonzero(np.diff(doc_np[order])) + 1
    return [(int(doc_np[g[0]]), g) for g in np.split(order, cuts)]


def token_positions(
    cache_or_tokens,
    token_strings: VocabularyLike | None = None,
    pattern: str | re.Pattern | None = None,
    which: str = "any",
) -> Tensor:
    """Bool mask `(n_tokens,)` of the tokens covered by matches of `pattern` in each decoded document.

    Args:
        cache_or_tokens: a `CodeCache` (the mask follows its token order) or token ids `(n_docs, seq)` / `(seq,)`
            (the mask is over the flattened ids, document by document).
        token_strings: how ids read as text: a tokenizer (exact character spans for byte-level BPE), a
            `Vocabulary`, or one string (or bytes) per vocabulary id, e.g. `[tok.decode([i]) for i in range(n)]`;
            None takes the cache's own. `token_positions(cache, pattern)` does the same.
        pattern: a regex (str or compiled), searched with `finditer` over each document's text.
        which: "first", "last" or "any" covered token of each match.
    """
    if pattern is None and isinstance(token_strings, (str, re.Pattern)):
        pattern, token_strings = token_strings, None  # token_positions(cache, pattern)
    if pattern is None:
        raise TypeError("token_positions needs a pattern (a regex).")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}.")
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    vocab = vocabulary_of(cache_or_tokens, token_strings)
    offsets = None if isinstance(cache_or_tokens, Tensor) else getattr(cache_or_tokens, "doc_offsets", None)
    if offsets is not None:  # each document's tokens are one range, in position order: no per-token doc and pos
        tok_np = cache_or_tokens.stored_tokens().numpy()
        bounds = offsets.numpy()
        groups = (np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
    else:
        tokens, doc, pos = _flat_tokens(cache_or_tokens)
        tok_np = tokens.numpy()
        groups = (idx for _, idx in doc_token_indices(doc, pos))
    mask = np.zeros(len(tok_np), dtype=bool)
    for idx in groups:
        text, starts, ends = vocab.spans(tok_np[idx])
        nonempty = ends > starts
        for m in regex.finditer(text):
            a, b = m.span()
            if b <= a:
                continue
            covered = np.flatnonzero(nonempty & (starts < b) & (ends > a))
            if len(covered) == 0:
                continue
            if which == "any":
                mask[idx[covered]] = True
            elif which == "first":
                mask[idx[covered[0]]] = True
            else:
                mask[idx[covered[-1]]] = True
    return torch.from_numpy(mask)
