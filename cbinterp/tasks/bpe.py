"""Training a byte-level BPE tokenizer (GPT-2 style) whose one special token, ``<|endoftext|>``, is BOS, EOS and PAD."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from cbinterp.core.storage.tokenizer import content_name, load_tokenizer, save_tokenizer, set_tokenizer_name
from cbinterp.tasks.text_sources import TextSource, iter_texts

__all__ = ["END_OF_TEXT", "train_bpe_tokenizer"]

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: TextSource,
    vocab_size: int = 8192,
    *,
    seed: int = 0,
    min_frequency: int = 2,
    max_documents: int | None = None,
    directory: str | os.PathLike | None = None,
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
