"""The library's one loading path for text: documents, a byte-level BPE tokenizer, packed windows and batches.

    iter_texts(source)                      documents from strings, .txt/.jsonl files or a Hugging Face data set
    train_bpe_tokenizer / load_tokenizer    a byte-level BPE tokenizer (save_tokenizer writes it atomically)
    attach_tokenizer(model, tokenizer)      to_tokens / to_string / to_str_tokens / generate on a config-built model
    pack_documents -> TextBatches           packed windows for `cbinterp.core.training.train` (seeded, resumable)
    StreamingTextBatches                    the same read lazily, each rank tokenising only its own rows
    tokenize_documents                      whole documents as padded rows, for `cache_codes` and analysis

Conventions, shared by every function here (they match TransformerLens' ``prepend_bos``): every row of tokens
starts with the BOS token (batches built for a model follow its ``default_prepend_bos`` instead); the trained
tokenizer has one special token, ``<|endoftext|>``, used as BOS, EOS (the separator between documents) and PAD.
Document text is encoded with ``split_special_tokens=True``, so a literal ``"<|endoftext|>"`` inside a document is
ordinary text: only the packing functions place the special id. Nothing here touches the Hugging Face Hub:
tokenizers load from local folders only.

The work is done in one module per job, all re-exported here: `text_sources` (documents), `bpe` (tokenizer
training), `packing` (windows, whole documents, the checks against a model) and `text_batches` (`TextBatches`).
"""

from __future__ import annotations

from cbinterp.core.storage.tokenizer import attach_tokenizer, load_tokenizer, save_tokenizer, tokenizer_fingerprint
from cbinterp.tasks.bpe import END_OF_TEXT, train_bpe_tokenizer
from cbinterp.tasks.packing import DOCS_PER_BATCH, DocumentTokens, check_model, pack_documents, tokenize_documents
from cbinterp.tasks.text_batches import StreamingTextBatches, TextBatches
from cbinterp.tasks.text_sources import FILE_SUFFIXES, TextSource, iter_texts

__all__ = [
    "DOCS_PER_BATCH",
    "END_OF_TEXT",
    "FILE_SUFFIXES",
    "DocumentTokens",
    "StreamingTextBatches",
    "TextBatches",
    "TextSource",
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
