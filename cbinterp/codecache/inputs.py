"""The documents `cache_codes` takes, checked: token ids in the vocabulary, masks that mark right padding only.

A mask marks padding, and padding must follow every real token of its row (True positions a prefix of the row):
then the padding, run as token 0 and never cached, cannot change a real token's codes in a causal model, and
the cache equals caching each document alone. Left padding (`padding_side="left"`), a leading BOS marked False (a
mask `tokens != pad_token_id` where, as TransformerLens does for GPT-2, the pad token is the BOS/EOS id) or a hole
inside a row would run other tokens before real ones and silently change their codes; they are refused, naming
the fix. Shifting each row to start at its first real token was the other choice, but it silently drops what a
mask marks False before the text (a BOS the caller means as context), so an explicit error is the safer rule.
Padding may hold any id (-1 too), since it never reaches the model; every real id must lie in [0, d_vocab).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from cbinterp.core.checks import check_token_ids, is_int
from cbinterp.core.codebooks.naming import did_you_mean

__all__ = ["batches", "check_documents", "check_hooks", "check_token_strings"]

Batch = tuple[Int[Tensor, "rows pos"], Bool[Tensor, "rows pos"] | None]

_FIX = (
    "Right-pad each row (real tokens first, padding after them, as `to_tokens(..., padding_side='right')` does), or "
    "pass the documents as a list of variable-length token lists (no padding, no mask). To keep a token as context "
    "without counting it (a BOS), mark it True and drop it afterwards (cache_documents, subset_cache)."
)


def check_documents(
    tokens: Int[Tensor, "rows pos"],
    mask: Bool[Tensor, "rows pos"] | None,
    d_vocab: int,
    causal: bool = True,
    first_row: int = 0,
) -> None:
    """Raise a ValueError unless the real tokens are ids in [0, d_vocab) and each row's mask is a prefix.

    The real tokens are all of them, or those where `mask` holds; a prefix mask is right padding. `first_row` numbers
    the rows in messages."""
    if mask is None:
        check_token_ids(tokens, d_vocab, "The documents")
        return
    check_token_ids(tokens.masked_fill(~mask, 0), d_vocab, "The documents (where the mask is True)")
    if mask.numel() == 0:
        return
    lengths = mask.sum(1)
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    bad = (mask != prefix).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        shown = "".join("1" if m else "0" for m in mask[row, :32].tolist())
        raise ValueError(
            f"The mask of row {first_row + row} is not a prefix of its row (it reads {shown}"
            f"{'...' if mask.shape[1] > 32 else ''}; 1 = real): padding before or between real tokens is run through "
            f"the model and would change the codes of the tokens after it. {_FIX}"
        )
    if not causal and bool((lengths < mask.shape[1]).any()):
        raise ValueError(
            "The model attends in both directions (attention_dir='bidirectional'), so padding would change the codes "
            "of every token of its row. Pass the documents as a list of variable-length token lists instead of "
            "padded rows with a mask."
        )


def batches(
    tokens_or_iterable, batch_size: int, mask: Tensor | None = None, d_vocab: int | None = None, causal=True
) -> tuple[Iterator[Batch], int | None]:
    """(tokens, mask) batches of at most batch_size documents, each checked, and the number of documents if known.

    Items of an iterable are documents (token tensors or lists, one or several rows) or `(tokens, mask)` pairs; a
    mask is bool of the tokens' shape (True = real). Token ids are checked against `d_vocab`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    rows_seen = [0]

    def checked(t, m) -> Batch:
        given = t
        t = torch.as_tensor(t)
        if isinstance(given, (list, tuple)) and t.numel() == 0:
            t = t.long()  # torch reads an empty list as float: here it is a document (or rows) of no ids
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(
                f"Expected an int tensor of token ids of shape (n_docs, seq), got {t.dtype} {tuple(t.shape)}."
            )
        if m is not None:
            m = torch.as_tensor(m)
            m = m.unsqueeze(0) if m.dim() == 1 else m
            if m.dtype != torch.bool or m.shape != t.shape:
                raise ValueError(
                    f"mask must be a bool tensor of the tokens' shape {tuple(t.shape)} (True where a token is real, "
                    f"False on padding), got {m.dtype} {tuple(m.shape)}."
                )
        if d_vocab is not None:
            check_documents(t, m, d_vocab, causal, rows_seen[0])
        rows_seen[0] += t.shape[0]
        return t, m

    def split(t, m) -> Iterator[Batch]:
        for start in range(0, t.shape[0], batch_size):
            yield t[start : start + batch_size], (None if m is None else m[start : start + batch_size])

    if isinstance(tokens_or_iterable, Tensor):  # checked whole, before anything is run or written
        t, m = checked(tokens_or_iterable, mask)
        return split(t, m), t.shape[0]
    if mask is not None:
        raise ValueError("mask= goes with a token tensor; give an iterable's masks as (tokens, mask) pairs instead.")

    def gen():
        for item in tokens_or_iterable:
            yield from split(*(checked(*item) if _is_pair(item) else checked(item, None)))

    return gen(), None


def _is_pair(item) -> bool:
    """Whether an item is `(tokens, mask)`.

    That is a tuple of two, or a list of two whose second is a mask (bool), not a two-token document such as `[4,
    5]`."""
    if not isinstance(item, (tuple, list)) or len(item) != 2 or is_int(item[1]):
        return False
    if isinstance(item, tuple):
        return True
    try:
        return torch.as_tensor(item[1]).dtype == torch.bool
    except (TypeError, ValueError, RuntimeError):
        return False


def check_hooks(hook_dict: dict, hooks: Sequence[str]) -> list[str]:
    """`hooks` (one name or several) as a list, each a hook of the model (`hook_dict`), none twice."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    for name in hooks:
        if name not in hook_dict:
            raise ValueError(
                f"Unknown hook name {name!r}{did_you_mean(name, hook_dict, n=5)} "
                "`model.hook_dict` lists every hook name."
            )
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"A hook is listed twice in {hooks}.")
    return hooks


def check_token_strings(token_strings: Sequence[str], d_vocab: int) -> list[str]:
    """`token_strings` as a list, checked: strings, at least one per token id of the model."""
    strings = list(token_strings)
    if isinstance(token_strings, str) or not all(isinstance(t, str) for t in strings):
        raise TypeError("token_strings must be a sequence of str, one per token id.")
    if len(strings) < d_vocab:
        raise ValueError(f"token_strings has {len(strings)} entries but the model has d_vocab={d_vocab} token ids.")
    return strings
