"""Everyday queries on a `CodeCache`: how often codes fire, where, on which tokens, and with which other codes.

A code fires at a token when it is among that token's top-k code ids (a code listed twice counts once; -1 is no
code). For a per-head codebook (`codes(name)` of shape `(n_tokens, heads, k)`), `head=None` pools the heads:
`code_frequencies`/`dead_codes`/`codes_for_token` count (token, head) pairs, while the per-token masks of
`code_fires`, `code_contexts`, `top_tokens` and `cooccurrence` mean "fires in any head". `search_codes` scores
every (codebook, head, code) separately.

An ungrouped (MLP) codebook has no head: pass `head=None` (the default). A missing value (`pd.NA`, what the
`head` column of a table holds for such a codebook) means the same, so `head=row.head` works for any table row;
`head=0` is still accepted for an ungrouped codebook (its only group), any other head is an error, and so is a
negative head (`cbinterp.core.codebooks.heads`: the one rule the interventions' `heads=` follow too).

Counts (`n`, `max_examples`, `window`) and `seed` are ints (never bools or floats) at or above their bound.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cbinterp.codecache.features import VocabularyLike, doc_token_indices
from cbinterp.codecache.vocab import vocabulary_of
from cbinterp.core.checks import check_token_ids, is_int
from cbinterp.core.codebooks.codes import dedupe_codes
from cbinterp.core.codebooks.heads import as_index as _as_index
from cbinterp.core.codebooks.heads import check_head

__all__ = [
    "code_contexts",
    "code_fires",
    "code_frequencies",
    "codes_at",
    "codes_for_token",
    "cooccurrence",
    "dead_codes",
    "top_tokens",
]


def _codes_of(cache, name: str, stored: bool = False) -> Tensor:
    """The codes of `name`; with `stored`, as the cache stores them.

    Stored codes are compared against a code id as they are, not widened to int64."""
    return cache.stored_codes(name) if stored and hasattr(cache, "stored_codes") else cache.codes(name)


def _head_codes(cache, name: str, head, stored: bool = False) -> Tensor:
    """Codes `(n_tokens, k)` for one head, or `(n_tokens, heads, k)` / `(n_tokens, k)` for no head.

    No head is None or a missing value; 0 for an ungrouped codebook (see `cbinterp.core.codebooks.heads.check_head`)."""
    codes = _codes_of(cache, name, stored)
    head = check_head(head, name, codes.shape[1] if codes.dim() == 3 else None)
    return codes if head is None else codes[:, head]


def head_of(cache, name: str, head) -> int | None:
    """`head` of codebook `name` in `cache` as checked by `check_head`: an index, or None for no head."""
    codes = _codes_of(cache, name, stored=True)
    return check_head(head, name, codes.shape[1] if codes.dim() == 3 else None)


def _count(value, what: str, low: int) -> int:
    """`value` as an int >= `low`; a bool, a float (even 2.0) or a smaller int is refused."""
    if not is_int(value):
        raise TypeError(f"{what} must be an int >= {low}, got {value!r} ({type(value).__name__}).")
    if value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value}.")
    return int(value)


def _check_code(cache, name: str, code: int) -> int:
    n = cache.n_codes(name)
    code = _as_index(code, "code")
    if not 0 <= code < n:
        raise ValueError(f"code {code} out of range for codebook {name!r} with {n} codes.")
    return code


def code_frequencies(cache, name: str, head: int | None = None) -> Tensor:
    """Int64 `(n_codes,)`: how many tokens each code fires at.

    For a per-head codebook with head=None, (token, head) pairs are counted, summed over heads."""
    n_codes = cache.n_codes(name)
    codes = _head_codes(cache, name, head, stored=True)
    codes = codes.reshape(-1, codes.shape[-1])
    counts = torch.zeros(n_codes, dtype=torch.int64)
    for start in range(0, codes.shape[0], _SLICE):  # widened a slice at a time: int64 ids of all would be 8x
        rows = dedupe_codes(_widen(codes[start : start + _SLICE], n_codes)).reshape(-1)
        counts += torch.bincount(rows[rows >= 0], minlength=n_codes)[:n_codes]
    return counts


def dead_codes(cache, name: str, head: int | None = None) -> Tensor:
    """Int64 ids of the codes that never fire (in `head`, or in any head when None)."""
    return torch.nonzero(code_frequencies(cache, name, head) == 0).flatten()


def code_fires(cache, name: str, code: int, head: int | None = None) -> Tensor:
    """Bool `(n_tokens,)`: where `code` fires (in `head`, or in any head when None)."""
    code = _check_code(cache, name, code)
    codes = _head_codes(cache, name, head, stored=True)
    hit = codes == code  # a real id is stored as itself, and "no code" as a value no id takes
    return hit.reshape(hit.shape[0], -1).any(dim=1)


def codes_for_token(cache, name: str, token_id: int, head: int | None = None) -> pd.DataFrame:
    """The codes that fire on occurrences of `token_id`, most frequent first (ties: lower code).

    Columns `code`, `count` (occurrences on which it fires; (occurrence, head) pairs for head=None on a per-head
    codebook) and `share` (count / occurrences of the token)."""
    token_id = _count(token_id, "token_id", 0)
    d_vocab = (getattr(cache, "meta", None) or {}).get("model", {}).get("d_vocab")
    if d_vocab is not None:
        check_token_ids(torch.tensor([token_id]), int(d_vocab), "token_id")
    at = cache.tokens == token_id
    n_occ = int(at.sum())
    codes = _head_codes(cache, name, head)[at]
    rows = dedupe_codes(codes.reshape(-1, codes.shape[-1])).reshape(-1)
    counts = torch.bincount(rows[rows >= 0], minlength=cache.n_codes(name)).numpy()
    ids = np.flatnonzero(counts)
    order = np.lexsort((ids, -counts[ids]))
    ids = ids[order].astype(np.int64)
    return pd.DataFrame({"code": ids, "count": counts[ids].astype(np.int64), "share": counts[ids] / max(n_occ, 1)})


def cooccurrence(
    cache,
    name_a: str,
    code_a: int,
    name_b: str,
    code_b: int,
    head_a: int | None = None,
    head_b: int | None = None,
) -> dict:
    """Tokens at which code_a fires (`n_a`), code_b fires (`n_b`), both (`n_both`), and their `jaccard` index.

    `jaccard` = n_both / (n_a + n_b - n_both) (0.0 when neither fires)."""
    a = code_fires(cache, name_a, code_a, head_a)
    b = code_fires(cache, name_b, code_b, head_b)
    n_a, n_b, n_both = int(a.sum()), int(b.sum()), int((a & b).sum())
    union = n_a + n_b - n_both
    return {"n_a": n_a, "n_b": n_b, "n_both": n_both, "jaccard": n_both / union if union else 0.0}


_SLICE = 1 << 20


def _widen(raw: Tensor, n_codes: int) -> Tensor:
    """Stored codes as int64 ids, -1 for no code."""
    out = raw.long()
    return out.masked_fill_((out >= n_codes) | (out < 0), -1)


def _stored_tokens(cache) -> Tensor:
    return cache.stored_tokens() if hasattr(cache, "stored_tokens") else cache.tokens


def _doc_layout(cache):
    """Flat index -> (its doc's sorted flat indices, rank within the doc)."""
    groups = [idx for _, idx in doc_token_indices(cache.doc, cache.pos)]
    group_of = np.empty(len(cache.doc), dtype=np.int64)
    rank = np.empty(len(cache.doc), dtype=np.int64)
    for g, idx in enumerate(groups):
        group_of[idx] = g
        rank[idx] = np.arange(len(idx))
    return groups, group_of, rank


#: How `code_contexts` picks the firings it shows.
SAMPLES = ("random", "first")


def code_contexts(
    cache,
    name: str,
    code: int,
    token_strings: VocabularyLike | None = None,
    window: int = 20,
    head: int | None = None,
    max_examples: int | None = 20,
    sample: str = "random",
    seed: int = 0,
) -> list[dict]:
    """Up to `max_examples` places where `code` fires, in cache order, with their text around them.

    Dicts with `doc`, `pos`, `left` (text of the up to `window` preceding tokens of the same document), `token` (the
    token's text) and `right` (the up to `window` following tokens).

    `sample="random"` (default) shows a seeded uniform sample of all firings, so the contexts represent the code
    rather than the first documents of the cache; `"first"` takes the first firings in cache order. Texts are
    decoded through a `Vocabulary` (`token_strings` may be a tokenizer; None takes the cache's own), each piece
    as a whole.
    """
    window = _count(window, "window", 0)
    if max_examples is not None:
        max_examples = _count(max_examples, "max_examples (None for all)", 1)
    seed = _count(seed, "seed", 0)
    if not isinstance(sample, str) or sample not in SAMPLES:
        raise ValueError(f"sample must be one of {SAMPLES}, got {sample!r}.")
    where = torch.nonzero(code_fires(cache, name, code, head)).flatten().numpy()
    if max_examples is not None and len(where) > max_examples:
        if sample == "first":
            where = where[:max_examples]
        else:
            pick = np.random.default_rng(seed).choice(len(where), size=max_examples, replace=False)
            where = where[np.sort(pick)]
    if len(where) == 0:
        return []
    vocab = vocabulary_of(cache, token_strings)
    offsets = getattr(cache, "doc_offsets", None)
    if offsets is not None:  # a document's tokens are one range: nothing is built per token
        tokens = _stored_tokens(cache).numpy()
        docs, positions = cache.doc_pos(torch.from_numpy(where))
        starts, ends = offsets[docs].numpy(), offsets[docs + 1].numpy()
        return [
            {
                "doc": int(d),
                "pos": int(p),
                "left": vocab.text(tokens[max(a, i - window) : i]),
                "token": vocab.text(tokens[[i]]),
                "right": vocab.text(tokens[i + 1 : min(b, i + 1 + window)]),
            }
            for i, d, p, a, b in zip(where, docs.tolist(), positions.tolist(), starts, ends)
        ]
    groups, group_of, rank = _doc_layout(cache)
    tokens, doc, pos = cache.tokens.numpy(), cache.doc.numpy(), cache.pos.numpy()
    out = []
    for i in where:
        g, r = groups[group_of[i]], rank[i]
        out.append(
            {
                "doc": int(doc[i]),
                "pos": int(pos[i]),
                "left": vocab.text(tokens[g[max(r - window, 0) : r]]),
                "token": vocab.text(tokens[[i]]),
                "right": vocab.text(tokens[g[r + 1 : r + 1 + window]]),
            }
        )
    return out


def top_tokens(
    cache,
    name: str,
    code: int,
    head: int | None = None,
    n: int = 10,
    token_strings: VocabularyLike | None = None,
) -> pd.DataFrame:
    """The `n` tokens on which `code` fires most often; ties: lower token id first.

    Columns `token` (id), `text` (when the cache knows its text, or `token_strings` is given), `count` and `share`
    (count / tokens at which the code fires)."""
    n = _count(n, "n", 1)
    fires = code_fires(cache, name, code, head)
    toks = _stored_tokens(cache)[fires].long()
    counts = torch.bincount(toks).numpy() if len(toks) else np.zeros(0, dtype=np.int64)
    ids = np.flatnonzero(counts)
    ids = ids[np.lexsort((ids, -counts[ids]))][:n].astype(np.int64)
    table = {"token": ids}
    if token_strings is not None or getattr(cache, "vocabulary", None) is not None:
        vocab = vocabulary_of(cache, token_strings)
        table["text"] = pd.Series([vocab.text([i]) for i in ids], dtype=object)
    table["count"] = counts[ids].astype(np.int64)
    table["share"] = counts[ids] / max(len(toks), 1)
    return pd.DataFrame(table)


def codes_at(cache, doc: int, pos: int) -> dict[str, Tensor]:
    """Every codebook's code ids at token (`doc`, `pos`): `(k,)` or `(heads, k)` per codebook name."""
    doc, pos = _count(doc, "doc", 0), _count(pos, "pos", 0)
    hit = torch.nonzero((cache.doc == doc) & (cache.pos == pos)).flatten()
    if len(hit) == 0:
        raise KeyError(f"No token at doc {doc}, pos {pos} in this cache.")
    i = int(hit[0])
    return {name: cache.codes(name)[i] for name in cache.codebook_names}
