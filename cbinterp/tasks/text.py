"""The library's one loading path for text: documents, a byte-level BPE tokenizer, packed windows and batches.

    iter_texts(source)                      documents from strings, .txt/.jsonl files or a Hugging Face data set
    train_bpe_tokenizer / load_tokenizer    a byte-level BPE tokenizer (save_tokenizer writes it atomically)
    attach_tokenizer(model, tokenizer)      to_tokens / to_string / to_str_tokens / generate on a config-built model
    pack_documents -> TextBatches           packed windows for `cbinterp.core.train` (seeded, resumable)
    tokenize_documents                      whole documents as padded rows, for `cache_codes` and analysis

Conventions, shared by every function here (they match TransformerLens' ``prepend_bos``): every row of tokens
starts with the BOS token; the trained tokenizer has one special token, ``<|endoftext|>``, used as BOS, EOS (the
separator between documents) and PAD. Document text is encoded with ``split_special_tokens=True``, so a literal
``"<|endoftext|>"`` inside a document is ordinary text: only this module places the special id. Nothing here
touches the Hugging Face Hub: tokenizers load from local folders only.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from jaxtyping import Bool, Int
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cbinterp.core.attach import require_hooked_transformer
from cbinterp.core.tokenizer import (
    attach_tokenizer,
    content_name,
    load_tokenizer,
    save_tokenizer,
    set_tokenizer_name,
    tokenizer_fingerprint,
)

__all__ = [
    "END_OF_TEXT",
    "DocumentTokens",
    "TextBatches",
    "attach_tokenizer",
    "check_model",
    "iter_texts",
    "load_tokenizer",
    "pack_documents",
    "save_tokenizer",
    "tokenize_documents",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]

END_OF_TEXT = "<|endoftext|>"
FILE_SUFFIXES = (".txt", ".jsonl")
DOCS_PER_BATCH = 256  # documents tokenised per call: larger batches amortise the wrapper, 256 stay small
TextSource = Union[Iterable[Any], os.PathLike, Any]  # see iter_texts


# -- documents ------------------------------------------------------------------------------------------------


def iter_texts(source: TextSource, text_column: str = "text") -> Iterator[str]:
    """Yield document strings from `source`, lazily (files are opened when iteration reaches them).

    `source` may be:
      - an iterable or generator of items, each a ``str`` document, a path to a ``.txt`` file (one document per
        file) or a ``.jsonl`` file (one document per line, in field `text_column`), or a mapping with a
        `text_column` field;
      - a single ``Path`` to such a file;
      - a Hugging Face ``datasets.Dataset`` or ``IterableDataset`` (column `text_column`).

    A ``Path`` item is always a file. A ``str`` item is a file when it has no newline, ends in ``.txt`` or
    ``.jsonl`` and names an existing file; such a str without whitespace that names no file raises
    FileNotFoundError (a mistyped path must not become a document). Pass ``Path`` objects to be explicit.
    """
    if isinstance(source, str):
        raise TypeError(
            "iter_texts got a single str, which would be read as one document per character; "
            "pass a list of documents ([text]) or of file paths ([path])."
        )
    if isinstance(source, (bytes, bytearray)):
        raise TypeError("iter_texts got bytes; decode them first (e.g. data.decode('utf-8')) and pass [text].")
    if isinstance(source, os.PathLike):
        path = _checked_file(Path(source))
        return _read_file(path, text_column)
    if _is_from_datasets(source):
        return _iter_dataset(source, text_column)
    if isinstance(source, Mapping) or not isinstance(source, Iterable):
        raise TypeError(
            f"iter_texts cannot read a {type(source).__name__}; expected an iterable of str documents or file "
            f"paths (.txt, .jsonl), a Path, or a datasets.Dataset / IterableDataset."
        )
    return _iter_items(source, text_column)


def _iter_items(items: Iterable[Any], text_column: str) -> Iterator[str]:
    for i, item in enumerate(items):
        if isinstance(item, os.PathLike):
            yield from _read_file(_checked_file(Path(item)), text_column)
        elif isinstance(item, str):
            if _names_file(item):
                yield from _read_file(_checked_file(Path(item)), text_column)
            else:
                yield item
        elif isinstance(item, Mapping):
            yield _as_text(item.get(text_column), f"item {i} (field {text_column!r})")
        else:
            raise TypeError(
                f"iter_texts: item {i} is a {type(item).__name__}; expected a str document, a path (str or Path) "
                f"to a .txt or .jsonl file, or a mapping with a {text_column!r} field."
            )


def _names_file(item: str) -> bool:
    """Whether a str item is a file path rather than a document (see iter_texts)."""
    if "\n" in item or len(item) > 4096 or not item.lower().endswith(FILE_SUFFIXES):
        return False
    if os.path.isfile(item):
        return True
    if not any(ch.isspace() for ch in item):
        raise FileNotFoundError(
            f"iter_texts: {item!r} looks like a file path but no such file exists. Fix the path, or pass "
            f"Path objects for files so that str items are always documents."
        )
    return False


def _checked_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"iter_texts: no file at {path}.")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise TypeError(
            f"iter_texts: cannot read {path}: expected a .txt file (one document) or a .jsonl file "
            f"(one JSON object per line), got {path.suffix or 'no suffix'}."
        )
    return path


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    try:
        if path.suffix.lower() == ".txt":
            yield path.read_text(encoding="utf-8")
            return
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_text(line, text_column, f"{path}:{lineno}")
    except UnicodeDecodeError as err:
        raise ValueError(f"iter_texts: {path} is not UTF-8 text ({err}); re-encode it as UTF-8.") from err


def _jsonl_text(line: str, text_column: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}); a .jsonl file holds one JSON object per line.") from err
    if not isinstance(row, dict) or text_column not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(f"{where}: expected an object with field {text_column!r}, got {keys}; set text_column=...")
    return _as_text(row[text_column], f"{where} (field {text_column!r})")


def _as_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"iter_texts: {where} is a {type(value).__name__}, expected a str document.")
    return value


def _is_from_datasets(source: Any) -> bool:
    """True for a Hugging Face Dataset / IterableDataset; `datasets` is imported only for objects it made."""
    if type(source).__module__.partition(".")[0] != "datasets":
        return False
    import datasets

    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = next(iter(source), "train")
        raise TypeError(f"iter_texts got a {type(source).__name__}; pick one split, e.g. source[{split!r}].")
    return isinstance(source, (datasets.Dataset, datasets.IterableDataset))


def _iter_dataset(dataset: Any, text_column: str) -> Iterator[str]:
    columns = dataset.column_names  # None for an IterableDataset whose features are unknown
    if columns is not None and text_column not in columns:
        raise ValueError(f"The data set has no column {text_column!r}; its columns are {columns}. Set text_column=...")
    return _dataset_rows(dataset.select_columns([text_column]) if columns else dataset, text_column)


def _dataset_rows(dataset: Any, text_column: str) -> Iterator[str]:
    for i, row in enumerate(dataset):  # a Dataset reads its Arrow table row by row: nothing is materialised
        if text_column not in row:
            raise ValueError(f"Row {i} of the data set has no field {text_column!r}; it has {sorted(row)}.")
        yield _as_text(row[text_column], f"row {i} (column {text_column!r})")


# -- tokenizer ------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(
    texts: TextSource,
    vocab_size: int = 8192,
    *,
    seed: int = 0,
    min_frequency: int = 2,
    max_documents: Optional[int] = None,
    directory: Optional[Union[str, os.PathLike]] = None,
    text_column: str = "text",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`; deterministic: same texts, same vocabulary.

    Any Unicode string round-trips (``decode(encode(s)) == s``): the 256 byte symbols are all in the vocabulary,
    so characters never seen in training still encode, and there is no normaliser to rewrite text. Token 0 is
    ``<|endoftext|>``, the tokenizer's BOS, EOS and PAD. The trainer itself has no randomness; `seed` picks the
    uniform sample of `max_documents` documents when that is set (otherwise it has no effect).

    With `directory`, the tokenizer is saved there (atomically) and the returned one is loaded from it, so that
    ``HookedTransformer(cfg, tokenizer=tok)`` can re-create it from its path. Without, it goes through the same
    save/load round trip in a temporary folder and is named by its content (``tokenizer_fingerprint``);
    `attach_tokenizer` works with either.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be >= 257 (256 byte symbols plus {END_OF_TEXT}), got {vocab_size}.")
    docs = iter_texts(texts, text_column)
    if max_documents is not None:
        docs = iter(_reservoir_sample(docs, max_documents, seed))
    counted = _Counted(docs)
    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would come back from decode and break the round trip
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(counted, trainer=trainer)
    if counted.non_empty == 0:
        raise ValueError("Cannot train a tokenizer: the corpus is empty (no non-empty documents). Check the source.")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,  # the clean-up rewrites " ." to "." on decode
    )
    if directory is not None:
        return load_tokenizer(save_tokenizer(fast, directory))
    with tempfile.TemporaryDirectory(prefix="cbinterp-bpe-") as tmp:
        loaded = load_tokenizer(save_tokenizer(fast, Path(tmp) / "tokenizer"))
    set_tokenizer_name(loaded, content_name(loaded))  # its folder is gone: a path name would point nowhere
    return loaded


class _Counted:
    """Wraps a document iterator, counting the non-empty documents that pass through."""

    def __init__(self, docs: Iterator[str]):
        self.docs, self.non_empty = docs, 0

    def __iter__(self) -> Iterator[str]:
        for doc in self.docs:
            self.non_empty += bool(doc)
            yield doc


def _reservoir_sample(docs: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of `k` documents in one pass, holding only `k` in memory, in corpus order."""
    if k < 1:
        raise ValueError(f"max_documents must be >= 1, got {k}.")
    rng = random.Random(seed)
    kept: list[tuple[int, str]] = []
    for i, doc in enumerate(docs):
        if i < k:
            kept.append((i, doc))
        elif (j := rng.randrange(i + 1)) < k:
            kept[j] = (i, doc)
    return [doc for _, doc in sorted(kept)]


# -- checks ---------------------------------------------------------------------------------------------------


def check_model(model: HookedTransformer, seq_len: int, max_token_id: Optional[int] = None) -> None:
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
) -> Iterator[Int[Tensor, " seq_len"]]:
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
    bos_id, _, _ = _special_ids(tokenizer)
    head = np.array([bos_id] if bos else [], dtype=np.int64)
    pieces = _pieces(_document_ids(texts, tokenizer, text_column, docs_per_batch), tokenizer, seq_len - len(head))
    return (torch.from_numpy(np.concatenate([head, piece])) for piece in pieces)


def _pieces(doc_ids: Iterator[list[int]], tokenizer: PreTrainedTokenizerBase, size: int) -> Iterator[np.ndarray]:
    """Consecutive `size`-token pieces of the separator-joined stream of documents; the partial tail is dropped."""
    separator = np.array([_special_ids(tokenizer)[1]], dtype=np.int64)
    pending: list[np.ndarray] = []
    n_pending, first = 0, True
    for ids in doc_ids:
        if not ids:
            continue
        if not first:
            pending.append(separator)
        pending.append(np.asarray(ids, dtype=np.int64))
        n_pending += len(ids) + (not first)
        first = False
        if n_pending >= size:
            stream = np.concatenate(pending)
            n_full = len(stream) // size
            yield from stream[: n_full * size].reshape(n_full, size)
            pending = [stream[n_full * size :]]
            n_pending = len(pending[0])


# -- batches for training -------------------------------------------------------------------------------------


class TextBatches:
    """Seeded, resumable batches of packed sequences for `cbinterp.core.train`: ``batches(step) -> (batch, seq_len)``.

    The sequences are visited epoch by epoch, each epoch in its own order, a permutation drawn from
    ``(seed, epoch)``. Batch `step` holds positions ``step * batch_size ...`` of the endless run of epochs, so a
    batch may span the end of one epoch and the start of the next, every sequence is seen exactly once per epoch,
    and step -> batch is a pure function: resuming at any step gives the batches of an uninterrupted run.
    Sequences are stored as int32 and handed out as int64 on the CPU (`train` moves them to the model's device).
    """

    def __init__(
        self,
        sequences: Int[Tensor, "n_seq seq_len"],
        batch_size: int,
        seed: int = 0,
        model: Optional[HookedTransformer] = None,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}.")
        sequences = torch.as_tensor(sequences)
        if sequences.dim() != 2 or sequences.dtype.is_floating_point or sequences.dtype == torch.bool:
            got = f"{sequences.dtype} {tuple(sequences.shape)}"
            raise ValueError(f"Expected int token ids of shape (n_seq, seq_len), got {got}.")
        if sequences.shape[0] == 0 or sequences.shape[1] == 0:
            raise ValueError("TextBatches: the corpus is empty: it did not fill one window. Add text or lower seq_len.")
        if sequences.min() < 0 or sequences.max() > torch.iinfo(torch.int32).max:
            raise ValueError("Token ids must lie in 0 .. 2**31 - 1.")
        self.sequences = sequences.to(torch.int32).contiguous()  # int32 halves the memory of int64 ids
        self.batch_size = batch_size
        self.seed = seed
        self._perm: tuple[int, Tensor] = (-1, torch.empty(0, dtype=torch.long))
        if model is not None:
            self.check_model(model)

    @classmethod
    def from_texts(
        cls,
        texts: TextSource,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        model: Optional[HookedTransformer] = None,
        *,
        text_column: str = "text",
        docs_per_batch: int = DOCS_PER_BATCH,
    ) -> "TextBatches":
        """Pack `texts` with `pack_documents` (BOS first in every window) and batch them."""
        _check_seq_len(seq_len, True)
        if model is not None:
            check_model(model, seq_len)  # before tokenising a whole corpus
        windows = pack_documents(texts, tokenizer, seq_len, text_column=text_column, docs_per_batch=docs_per_batch)
        rows = [window.to(torch.int32) for window in windows]
        if not rows:
            raise ValueError(
                f"TextBatches: the corpus is empty: its tokens did not fill one window of seq_len={seq_len} "
                f"(BOS plus {seq_len - 1} tokens). Add text or lower seq_len."
            )
        return cls(torch.stack(rows), batch_size, seed, model)

    @property
    def n_sequences(self) -> int:
        return int(self.sequences.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.sequences.shape[1])

    @property
    def steps_per_epoch(self) -> float:
        """Batches per pass over the data (fractional when batch_size does not divide the number of sequences)."""
        return self.n_sequences / self.batch_size

    def epoch_of(self, step: int) -> int:
        """The epoch that the first sequence of batch `step` belongs to."""
        return (_check_step(step) * self.batch_size) // self.n_sequences

    def permutation(self, epoch: int) -> Int[Tensor, " n_seq"]:
        """The order of the sequences in `epoch`: a pure function of (seed, epoch)."""
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, torch.from_numpy(rng.permutation(self.n_sequences)))
        return self._perm[1]

    def indices(self, step: int) -> Int[Tensor, " batch"]:
        """Which sequences batch `step` holds."""
        start = _check_step(step) * self.batch_size
        positions = torch.arange(start, start + self.batch_size)
        epochs, offsets = positions // self.n_sequences, positions % self.n_sequences
        out = torch.empty(self.batch_size, dtype=torch.long)
        for epoch in torch.unique(epochs).tolist():
            here = epochs == epoch
            out[here] = self.permutation(epoch)[offsets[here]]
        return out

    def __call__(self, step: int) -> Int[Tensor, "batch seq_len"]:
        return self.sequences[self.indices(step)].long()

    def check_model(self, model: HookedTransformer) -> None:
        """Raise ValueError if the sequences are longer than `model.cfg.n_ctx` or hold ids >= `cfg.d_vocab`."""
        check_model(model, self.seq_len, int(self.sequences.max()))

    def __repr__(self) -> str:
        return (
            f"TextBatches(n_sequences={self.n_sequences}, seq_len={self.seq_len}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


def _check_step(step: int) -> int:
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}.")
    return int(step)


# -- whole documents for analysis -----------------------------------------------------------------------------


@dataclasses.dataclass
class DocumentTokens:
    """Documents as rows of tokens: each starts with BOS; a document's last row is padded with PAD.

    `mask` is True at real tokens (BOS and text) and False at padding; `doc_index` is the document of each row,
    in corpus order (every document has at least one row: an empty one is BOS alone).
    """

    tokens: Int[Tensor, "rows seq_len"]
    mask: Bool[Tensor, "rows seq_len"]
    doc_index: Int[Tensor, " rows"]

    @property
    def n_docs(self) -> int:
        return int(self.doc_index[-1]) + 1 if len(self.doc_index) else 0

    def document(self, i: int) -> Int[Tensor, " n_tokens"]:
        """The text tokens of document `i` (BOS and padding left out)."""
        rows = self.doc_index == i
        return self.tokens[rows][:, 1:][self.mask[rows][:, 1:]]


def tokenize_documents(
    texts: TextSource,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    model: Optional[HookedTransformer] = None,
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
