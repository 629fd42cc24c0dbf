"""Cache the code ids of every codebook (and optionally some activations) over a data set, in memory or on disk.

`cache_codes` runs the model over the documents (`cbinterp.codecache.inputs`) with a `CodeRecorder`, which hands
what it records to a writer: a `MemoryWriter`, or a `ChunkWriter` that streams chunk files into a cache folder
(`cbinterp.codecache.folder`; the format is described in `cbinterp.codecache.layout`), resuming an interrupted run
there (`CoveredDocuments`), and under `torch.distributed` shares the documents between the ranks. `CodeCache`
(`cbinterp.codecache.reader`) reads the result; `cached_codes` takes the codes of one `run_with_cache` instead.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from cbinterp.codecache import conditions as cond
from cbinterp.codecache.activation_cache import cached_codes
from cbinterp.codecache.identity import model_identity, new_marker
from cbinterp.codecache.inputs import batches as input_batches
from cbinterp.codecache.inputs import check_hooks
from cbinterp.codecache.layout import (  # noqa: F401 - re-exported: users import these from here
    DEFAULT_CHUNK_TOKENS,
    EMPTY_CHAIN,
    FORMAT_NAME,
    FORMAT_VERSION,
    LAYOUT,
    LEGACY_META_FILE,
    META_FILE,
    code_dtype,
    no_code_value,
)
from cbinterp.codecache.reader import CodeCache
from cbinterp.codecache.recorder import CodeRecorder
from cbinterp.codecache.resume import CoveredDocuments
from cbinterp.codecache.writer import ChunkWriter, MemoryWriter
from cbinterp.core.codebooks.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.storage.manifest import ResumeWarning
from cbinterp.core.tl_compat import Model
from cbinterp.core.training import distributed as dd

__all__ = ["CodeCache", "cache_codes", "cached_codes", "code_dtype", "no_code_value"]


@torch.no_grad()
def cache_codes(
    model: Model,
    tokens_or_iterable: Tensor | Iterable[Tensor],
    batch_size: int = 32,
    hooks: Sequence[str] = (),
    directory: str | os.PathLike | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    tokenizer_name: str | None = None,
    mask: Tensor | None = None,
    token_strings: Sequence[str] | None = None,
    activation_dtype: torch.dtype = torch.float16,
) -> CodeCache:
    """Run `model` over documents and record every codebook's code ids for every token.

    Args:
        tokens_or_iterable: a `(n_docs, seq)` int tensor of token ids, or an iterable of such batches (or of
            single documents of any length: tensors or lists of ids).
        batch_size: documents per forward pass.
        hooks: hook names whose activations are stored too (as `activation_dtype`), e.g. "blocks.0.mlp.hook_post".
        directory: stream to this folder in chunk files (resuming a previous, interrupted run there);
            None keeps everything in memory.
        chunk_tokens: tokens per chunk file (at least; chunks hold whole batches). Bounds memory on disk mode.
        progress: show a tqdm progress bar (rank 0 only under torch.distributed).
        tokenizer_name: recorded with the model's metadata when the tokenizer is not the model's own
            (`model.tokenizer`), so that a cache resumed or checked with another tokenizer is refused.
        mask: bool `(n_docs, seq)` beside a token tensor, False on padding (e.g. `tokenize_documents(...).mask`);
            for an iterable, give `(tokens, mask)` pairs. Padding must come after a row's real tokens (each row's
            True positions a prefix; left padding and holes are refused, see `cbinterp.codecache.inputs`); it is run
            as token 0 (after the real tokens of a causal model, it changes nothing of theirs), may hold any id, and
            is not cached. Without a mask every id must lie in [0, d_vocab).
        token_strings: one string per token id, kept in the cache as its text, for models without a tokenizer
            (e.g. the FSM's digits). Otherwise the model's tokenizer is kept (its files, on disk), so queries,
            probes and views read the cache's text without being told how.
        activation_dtype: dtype of the stored hook activations (float16 by default; float32 where thresholds on
            them must not tie, e.g. neuron baselines).

    Under `torch.distributed` (e.g. `torchrun`; any initialised process group) every rank passes the same input
    and the same `directory`: the batches are taken in blocks of about `chunk_tokens` tokens, block `i` cached by
    rank `i % world_size` as its own chunk files, and rank 0 lists them in the marker once every rank is done. The
    cache is the one a single process makes (same batches, same codes, same order). A resumed cache may use another
    world size.

    Returns a `CodeCache`. Documents are numbered in input order from 0; `doc`/`pos` give each token's place.
    """
    require_hooked_transformer(model)
    hooks = check_hooks(model.hook_dict, hooks)
    rank, world = dd.rank(), dd.world_size()
    codebooks = _checked_run(model, chunk_tokens, activation_dtype, directory, world)
    # token ids and masks are checked here, a tensor's whole before anything is written; an iterable's per batch
    causal = getattr(model.cfg, "attention_dir", "causal") != "bidirectional"
    batches, total = input_batches(tokens_or_iterable, batch_size, mask, model.cfg.d_vocab, causal)
    identity = model_identity(model, tokenizer_name)
    meta = new_marker(model, identity, hooks, activation_dtype, token_strings)
    tokenizer = getattr(model, "tokenizer", None) if token_strings is None else None
    path = None if directory is None else Path(directory)
    if path is None:
        writer = MemoryWriter(meta, tokenizer)
    else:
        writer = ChunkWriter.open(path, meta, identity, hooks, tokenizer, rank, world)
    covered = CoveredDocuments(writer.covered, path)
    recorder = CodeRecorder(model, codebooks, hooks, activation_dtype, writer)
    n_ctx = model.cfg.n_ctx
    n_docs = 0  # documents seen so far in the input (including skipped ones)
    seen_tokens = 0
    block, block_tokens = 0, 0  # blocks of ~chunk_tokens cached tokens, block i cached by rank i % world
    bar = tqdm(total=total, disable=not progress or rank != 0, unit="doc", desc="caching codes")
    try:
        for batch, keep in batches:
            if keep is not None:  # the fingerprint covers what is cached: padding reads as -1 whatever its id
                batch = batch.masked_fill(~keep.to(batch.device), -1)
            n, seq = batch.shape
            if seq > n_ctx:
                raise ValueError(
                    f"Documents of {seq} tokens are longer than the model's context n_ctx={n_ctx} (documents "
                    f"{n_docs}..{n_docs + n - 1}). Cut them to at most {n_ctx} tokens."
                )
            seen_tokens += n * seq
            first, n_docs = n_docs, n_docs + n
            block_tokens += n * seq if keep is None else int(keep.sum())
            mine = block % world == rank
            # cached documents are checked, the rest cached (by this rank if the block is its own)
            for start, stop, entry in covered.split(first, n_docs):
                part = slice(start - first, stop - first)
                if entry is not None:
                    covered.check(entry, batch[part], stop, seq)
                elif mine:
                    recorder.record(batch[part], None if keep is None else keep[part], start)
            if block_tokens >= chunk_tokens:
                if mine:  # the block's chunk ends here (its last batch landed first, so one overlap is lost)
                    recorder.land()
                    writer.flush()
                block, block_tokens = block + 1, 0
            bar.update(n)
        recorder.land()
        covered.check_input_ended_after(n_docs)
        if seen_tokens == 0:
            raise ValueError("cache_codes got no tokens: the input is empty (no documents, or documents of length 0).")
        writer.finish()
    except BaseException as err:
        recorder.land()  # an interruption keeps the last finished batch, as without the deferred copy
        writer.abort(err)
        raise
    finally:
        bar.close()
    writer.publish()
    if covered.resumed and rank == 0:
        warnings.warn(
            f"Resumed the code cache at {path}: {covered.n_docs} documents were already cached (checked to be the "
            "same documents, made by the same model, weights, hooks and codebook modes), "
            f"{writer.meta['n_docs'] - covered.n_docs} added.",
            ResumeWarning,
            stacklevel=3,
        )
    return writer.result(n_docs)


def _checked_run(
    model: Model,
    chunk_tokens: int,
    activation_dtype: torch.dtype,
    directory: str | os.PathLike | None,
    world: int,
) -> dict:
    """The model's codebooks, once the settings of a `cache_codes` run are checked (a ValueError names the fix)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks; attach some with attach_codebooks(model, ...) first.")
    if world > 1 and directory is None:
        raise ValueError(
            f"cache_codes runs under torch.distributed ({world} ranks) and needs directory=...: the ranks write "
            "their shares into one cache folder. Pass a directory (the same on every rank), or cache in one process."
        )
    cond.check_runnable(model)
    if not isinstance(activation_dtype, torch.dtype) or not activation_dtype.is_floating_point:
        raise ValueError(
            f"activation_dtype must be a floating torch dtype (e.g. torch.float32), got {activation_dtype!r}."
        )
    return codebooks
