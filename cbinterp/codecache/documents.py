"""Code caches of whole documents: cache padded document rows, keep only the text tokens, number them by document.

`tokenize_documents` gives each document as rows of BOS plus text, its last row padded. `cache_codes` caches every
position of those rows, BOS and padding included, and numbers each row as a document. `cache_documents` runs it
and then keeps only the text tokens (`subset_cache`), renumbered so that `doc` is the document and `pos` the
token's place in the whole document: a regex feature (`token_positions`) then reads each document as one text,
and codes firing on BOS or padding count neither as hits nor as false alarms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from cbinterp.codecache.store import CodeCache, cache_codes
from cbinterp.core.tl_compat import Model

__all__ = ["cache_documents", "subset_cache", "text_token_mask"]


def subset_cache(
    cache: CodeCache,
    keep: Bool[Tensor, " n_tokens"],
    doc: Int[Tensor, " n_tokens"] | None = None,
    pos: Int[Tensor, " n_tokens"] | None = None,
) -> CodeCache:
    """An in-memory `CodeCache` of the tokens where `keep` holds (codes, tokens, stored activations).

    Optionally with new `doc` / `pos` numbers (given for every token of `cache`, before selection)."""
    keep = torch.as_tensor(keep).reshape(-1)
    if keep.dtype != torch.bool or keep.shape[0] != cache.n_tokens:
        raise ValueError(
            f"keep must be a bool mask over the cache's {cache.n_tokens} tokens, got {keep.dtype} {tuple(keep.shape)}."
        )
    arrays = {}
    for key in ["tokens", "doc", "pos"]:
        arrays[key] = cache._get(key)[keep]
    for name, value in (("doc", doc), ("pos", pos)):
        if value is not None:
            value = torch.as_tensor(value).reshape(-1)
            if value.shape[0] != cache.n_tokens:
                raise ValueError(f"{name} must have one entry per token of the cache ({cache.n_tokens}).")
            arrays[name] = value[keep].to(torch.int32)
    for name in cache.codebook_names:
        arrays[f"codes/{name}"] = cache._get(f"codes/{name}")[keep]
    for hook in cache.hook_names:
        arrays[f"act/{hook}"] = cache._get(f"act/{hook}")[keep]
    meta = {k: v for k, v in cache.meta.items() if k not in ("chunks", "meta_sha256")}  # its own numbers below
    meta["n_tokens"] = int(keep.sum())
    meta["n_docs"] = int(torch.unique(arrays["doc"]).numel())
    return CodeCache(meta, arrays=arrays, tokenizer=cache.tokenizer)


def text_token_mask(mask: Bool[Tensor, "rows pos"]) -> Bool[Tensor, "rows pos"]:
    """The text tokens of `DocumentTokens.mask`: real tokens other than each row's leading BOS."""
    out = mask.clone()
    out[:, 0] = False
    return out


def cache_documents(
    model: Model,
    documents,
    hooks: Sequence[str] = (),
    batch_size: int = 16,
    progress: bool = False,
) -> CodeCache:
    """Cache the codes (and `hooks`' activations) of `documents`, keeping only text tokens (no BOS, no padding).

    `documents` is a `DocumentTokens` from `tokenize_documents`. `doc` is the document index and `pos` the place of
    the token in its document (rows laid end to end, BOS not counted).

    Real tokens (mask True) must be ids in [0, d_vocab); padding (mask False, after the text) may hold any id: it
    is never run as itself nor cached."""
    tokens, mask, doc_index = _checked_documents(documents)
    # padding is not cached: the cache holds each row's BOS and text, row after row
    cache = cache_codes(model, tokens, mask=mask, batch_size=batch_size, hooks=hooks, progress=progress)
    rows, seq = tokens.shape
    body = seq - 1
    row_in_doc = torch.zeros(rows, dtype=torch.long)
    for i in range(1, rows):  # rows of a document are consecutive
        row_in_doc[i] = row_in_doc[i - 1] + 1 if doc_index[i] == doc_index[i - 1] else 0
    position = row_in_doc[:, None] * body + torch.arange(seq)[None, :] - 1  # BOS (dropped) would get row start - 1
    keep = text_token_mask(mask)
    doc = doc_index[:, None].expand(rows, seq)
    # the flat order of cache_codes is row-major over the real positions of (rows, seq), as indexing by `mask`
    return subset_cache(cache, keep[mask], doc=doc[mask], pos=position.clamp(min=0)[mask])


def _checked_documents(documents) -> tuple[Tensor, Tensor, Tensor]:
    """The tokens, mask and doc_index of a `DocumentTokens`, checked to fit one another.

    Token ids are checked by `cache_codes`."""
    tokens, mask = torch.as_tensor(documents.tokens), torch.as_tensor(documents.mask)
    doc_index = torch.as_tensor(documents.doc_index).reshape(-1)
    if tokens.dim() != 2 or mask.dtype != torch.bool or mask.shape != tokens.shape or len(doc_index) != len(tokens):
        raise ValueError(
            f"documents must be a DocumentTokens (tokenize_documents): tokens (rows, seq), a bool mask of that shape "
            f"and one doc_index per row; got tokens {tuple(tokens.shape)}, mask {mask.dtype} {tuple(mask.shape)}, "
            f"doc_index {tuple(doc_index.shape)}."
        )
    starts = torch.ones(len(doc_index), dtype=torch.bool)
    starts[1:] = doc_index[1:] != doc_index[:-1]
    firsts = doc_index[starts]
    if firsts.unique().numel() != firsts.numel():
        repeated = int(next(d for d in firsts.unique() if int((firsts == d).sum()) > 1))
        raise ValueError(
            f"The rows of document {repeated} are not consecutive in doc_index; a document's rows must follow one "
            "another (as tokenize_documents lays them out), or their positions cannot be numbered."
        )
    return tokens, mask, doc_index
