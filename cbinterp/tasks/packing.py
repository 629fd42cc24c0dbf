"""Tokenised text as rows that start with BOS, with the checks that rows fit a model.

Packed training windows (`pack_documents`) and whole documents (`tokenize_documents`)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from cbinterp.core.codebooks.attach import require_hooked_transformer
from cbinterp.core.tl_compat import Model
from cbinterp.tasks.text_sources import TextSource, iter_texts

__all__ = [
    "DOCS_PER_BATCH",
    "DocumentTokens",
    "check_model",
    "pack_documents",
    "resolve_prepend_bos",
    "tokenize_documents",
]

DOCS_PER_BATCH = 256  # documents tokenised per call: larger batches amortise the wrapper, 256 stay small


# -- checks ---------------------------------------------------------------------------------------------------


def check_model(model: Model, seq_len: int, max_token_id: int | None = None) -> None:
    """Raise ValueError if rows of `seq_len` tokens (ids up to `max_token_id`) do not fit `model`."""
    require_hooked_transformer(model)
    if seq_len > model.cfg.n_ctx:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context (cfg.n_ctx={model.cfg.n_ctx}); "
            f"use seq_len <= {model.cfg.n_ctx}."
        )
    if max_token_id is not None and max_token_id >= model.cfg.d_vocab:
        raise ValueError(
            f"Token id {max_token_id} does not fit the model's vocabulary (cfg.d_vocab={model.cfg.d_vocab}); "
            f"the tokenizer is larger than the model: use a model with d_vocab >= {max_token_id + 1}."
        )


def _check_seq_len(seq_len: int, bos: bool) -> None:
    if not isinstance(seq_len, int) or seq_len < (2 if bos else 1):
        raise ValueError(f"seq_len must be an int >= {2 if bos else 1} (BOS plus at least one token), got {seq_len!r}.")


def resolve_prepend_bos(prepend_bos: bool | None, model: Model | None) -> bool:
    """Whether windows start with BOS: `prepend_bos` when given, else the model's convention, else True.

    The model's convention is `model.cfg.default_prepend_bos` (TransformerLens sets False for e.g. Pythia)."""
    if prepend_bos is not None:
        if not isinstance(prepend_bos, bool):
            raise ValueError(f"prepend_bos must be None (follow the model), True or False, got {prepend_bos!r}.")
        return prepend_bos
    return bool(model.cfg.default_prepend_bos) if model is not None else True


def _separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id placed between documents: EOS (a tokenizer without BOS can still pack windows without one)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "The tokenizer has no EOS token, which packing puts between documents; set tokenizer.eos_token."
        )
    return tokenizer.eos_token_id


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int, int]:
    """(BOS, document separator, PAD) ids; the separator is EOS, PAD falls back to EOS."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError("The tokenizer needs BOS and EOS tokens (train_bpe_tokenizer sets both to <|endoftext|>).")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return bos, eos, pad


# -- packing --------------------------------------------------------------------------------------------------


def _document_ids(
    texts: TextSource, tokenizer: PreTrainedTokenizerBase, text_column: str, docs_per_batch: int
) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens added); the source is checked now, read later."""
    if docs_per_batch < 1:
        raise ValueError(f"docs_per_batch must be >= 1, got {docs_per_batch}.")
    return _encode_batches(iter_texts(texts, text_column), tokenizer, docs_per_batch)


def _encode_batches(
    docs: Iterator[str], tokenizer: PreTrainedTokenizerBase, docs_per_batch: int
) -> Iterator[list[int]]:
    while batch := list(itertools.islice(docs, docs_per_batch)):  # pulls documents only as ids are wanted
        # add_special_tokens=False: a model's tokenizer adds BOS itself; split_special_tokens: text is only text
        encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False)
        yield from encoded["input_ids"]


def pack_documents(
    texts: TextSource,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    bos: bool = True,
    *,
    text_column: str = "text",
    docs_per_batch: int = DOCS_PER_BATCH,
) -> Iterator[Int[Tensor, " pos"]]:
    """Stream `texts` as windows of `seq_len` int64 token ids, in corpus order, with bounded memory.

    The documents' tokens are joined into one stream with ``<|endoftext|>`` (the tokenizer's EOS) between
    consecutive documents (empty documents are skipped, so no two separators meet). The stream is cut into
    consecutive, non-overlapping pieces of ``seq_len - 1`` tokens and each window is BOS followed by one piece,
    as TransformerLens' ``prepend_bos`` would give. A window may hold the end of one document and the start of
    the next, always with the separator between them. The tail of the stream that does not fill a piece (fewer
    than ``seq_len - 1`` tokens) is dropped. With ``bos=False`` windows are plain ``seq_len``-token pieces.

    Documents are read and tokenised `docs_per_batch` at a time, only as windows are taken, so the corpus is
    never held in memory. The ids are not checked against a model here: `TextBatches` and `check_model` do that.
    """
    _check_seq_len(seq_len, bos)
    head = np.array([_special_ids(tokenizer)[0]] if bos else [], dtype=np.int64)
    pieces = _pieces(_document_ids(texts, tokenizer, text_column, docs_per_batch), tokenizer, seq_len - len(head))
    return (torch.from_numpy(np.concatenate([head, piece])) for piece in pieces)


def _pieces(doc_ids: Iterator[list[int]], tokenizer: PreTrainedTokenizerBase, size: int) -> Iterator[np.ndarray]:
    """Consecutive `size`-token pieces of the separator-joined stream of documents; the partial tail is dropped."""
    packer = Packer(size, _separator_id(tokenizer))
    for ids in doc_ids:
        yield from packer.add(ids)


class Packer:
    """Joins documents' ids with a separator and cuts the stream into `size`-token pieces as they fill.

    `add(ids)` returns the pieces completed by one more document (empty documents are skipped, so no two
    separators meet); the partial tail waits for the next document."""

    def __init__(self, size: int, separator: int):
        self.size = size
        self.separator = np.array([separator], dtype=np.int64)
        self.pending: list[np.ndarray] = []
        self.n_pending, self.first = 0, True

    def add(self, ids: list[int]) -> list[np.ndarray]:
        if not len(ids):
            return []
        if not self.first:
            self.pending.append(self.separator)
        self.pending.append(np.asarray(ids, dtype=np.int64))
        self.n_pending += len(ids) + (not self.first)
        self.first = False
        if self.n_pending < self.size:
            return []
        stream = np.concatenate(self.pending)
        n_full = len(stream) // self.size
        self.pending = [stream[n_full * self.size :]]
        self.n_pending = len(self.pending[0])
        return list(stream[: n_full * self.size].reshape(n_full, self.size))


# -- whole documents for analysis -----------------------------------------------------------------------------


@dataclasses.dataclass
class DocumentTokens:
    """Documents as rows of tokens: each starts with BOS; a document's last row is padded with PAD.

    `mask` is True at real tokens (BOS and text) and False at padding; `doc_index` is the document of each row,
    in corpus order (every document has at least one row: an empty one is BOS alone).
    """

    tokens: Int[Tensor, "rows pos"]
    mask: Bool[Tensor, "rows pos"]
    doc_index: Int[Tensor, " rows"]

    @property
    def n_docs(self) -> int:
        """The number of documents packed into the sequences."""
        return int(self.doc_index[-1]) + 1 if len(self.doc_index) else 0

    def document(self, i: int) -> Int[Tensor, " n_tokens"]:
        """The text tokens of document `i` (BOS and padding left out)."""
        rows = self.doc_index == i
        return self.tokens[rows][:, 1:][self.mask[rows][:, 1:]]


def tokenize_documents(
    texts: TextSource,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    model: Model | None = None,
    *,
    text_column: str = "text",
    docs_per_batch: int = DOCS_PER_BATCH,
) -> DocumentTokens:
    """Each document as ``ceil(n_tokens / (seq_len - 1))`` rows of BOS plus ``seq_len - 1`` tokens, none shared.

    Unlike `pack_documents`, no row mixes two documents and nothing is dropped, because the code cache and the
    analyses want whole documents. With `model`, `seq_len` and the ids are checked against it.
    """
    _check_seq_len(seq_len, True)
    if model is not None:
        check_model(model, seq_len)
    bos_id, _, pad_id = _special_ids(tokenizer)
    body = seq_len - 1
    rows, masks, docs = [], [], []
    for doc, ids in enumerate(_document_ids(texts, tokenizer, text_column, docs_per_batch)):
        n_rows = max(1, math.ceil(len(ids) / body))
        text = np.full(n_rows * body, pad_id, dtype=np.int64)
        text[: len(ids)] = ids
        column = np.full((n_rows, 1), bos_id, dtype=np.int64)
        rows.append(np.concatenate([column, text.reshape(n_rows, body)], axis=1))
        real = (np.arange(n_rows * body) < len(ids)).reshape(n_rows, body)
        masks.append(np.concatenate([np.ones((n_rows, 1), dtype=bool), real], axis=1))
        docs.append(np.full(n_rows, doc, dtype=np.int64))
    if not rows:
        raise ValueError("tokenize_documents: the corpus is empty (no documents). Check the source.")
    out = DocumentTokens(
        tokens=torch.from_numpy(np.concatenate(rows)),
        mask=torch.from_numpy(np.concatenate(masks)),
        doc_index=torch.from_numpy(np.concatenate(docs)),
    )
    if model is not None:
        check_model(model, seq_len, int(out.tokens.max()))
    return out
