"""Cache the code ids of every codebook (and optionally some activations) over a data set, in memory or on disk.

Codes are stored in the smallest integer dtype that holds ids ``0 .. n_codes - 1`` *and* a "no code" value that no
real id can take (the -1 that `ablate_codes` / `replace_codes` write, or a non-finite activation): ``uint8`` for
``n_codes <= 255`` (no code = 255), ``uint16`` for ``n_codes <= 65535`` (no code = 65535; 2 bytes per code, the
budget of the analysis issue) and ``int32`` above (no code = -1); ``uint16`` is only stored, concatenated and
widened, which torch supports. `CodeCache.codes` gives int64 ids with -1 for no code, which every query and probe
skips. Token ids, document index and position are ``int32`` on disk; activations of extra hooks are ``float16``.
`CodeCache` accessors return codes, tokens, doc and pos as ``int64``.

On disk (``directory=...``) the cache is a cbinterp folder (see `cbinterp.core.manifest`) of kind
"cbinterp-code-cache": ``chunk_000000.safetensors`` files, each holding whole documents and written atomically, and
the marker ``cbinterp.json``, rewritten atomically after each chunk, which holds the metadata, the sha256 of every
chunk, and the fingerprints of the model's weights and of the documents cached so far. An interrupted run keeps its
finished chunks; running `cache_codes` again on the same folder with the same model, weights and data skips the
documents already cached (checking that they are the same) and appends the rest; anything else is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Bool
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from cbinterp.codecache.vocab import Vocabulary
from cbinterp.core import manifest as mf
from cbinterp.core.atomic import _pid_alive, atomic_file
from cbinterp.core.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.codes import NO_CODE
from cbinterp.core.manifest import ResumeWarning
from cbinterp.core.naming import CODES_SUFFIX, codes_hook_name, did_you_mean
from cbinterp.core.tokenizer import load_tokenizer, write_tokenizer_files

FORMAT_NAME = mf.CODE_CACHE
FORMAT_VERSION = mf.VERSION
META_FILE = mf.MANIFEST_FILE
LEGACY_META_FILE = mf.LEGACY_CACHE_META
DEFAULT_CHUNK_TOKENS = 1 << 18
_CHUNK = re.compile(r"^chunk_\d{6}\.safetensors$")
_TEMP = re.compile(r"^\..+\.(\d+)-[0-9a-f]+\.tmp$")

__all__ = ["CodeCache", "cache_codes", "cached_codes", "code_dtype", "no_code_value"]


def code_dtype(n_codes: int) -> torch.dtype:
    """The smallest dtype that stores code ids 0..n_codes-1 and a "no code" value none of them can take (uint8,
    uint16, then int32)."""
    if n_codes < 256:
        return torch.uint8
    if n_codes < 65536:
        return torch.uint16
    if n_codes <= 2**31 - 1:
        return torch.int32
    raise ValueError(f"n_codes={n_codes} is too large to cache.")


def no_code_value(dtype: torch.dtype) -> int:
    """How "no code" (-1) is stored in `dtype`: its largest value for the unsigned ones, -1 for int32."""
    return {torch.uint8: 255, torch.uint16: 65535}.get(dtype, NO_CODE)


def _stored_codes(codes: Tensor, dtype: torch.dtype) -> Tensor:
    """int32 code ids (-1 = no code) as stored in `dtype`."""
    if dtype == torch.int32:
        return codes.to(torch.int32)
    return codes.masked_fill(codes < 0, no_code_value(dtype)).to(dtype)


def _read_codes(raw: Tensor, n_codes: int) -> Tensor:
    """Stored codes back as int64 ids, -1 for no code (any stored value that is no code id)."""
    out = raw.long()
    return out.masked_fill_((out >= n_codes) | (out < 0), NO_CODE)


def _chain_docs(chain: str, batch: Tensor) -> str:
    """The running fingerprint of the documents cached so far, extended by the rows of `batch` (length and ids)."""
    rows = batch.detach().to("cpu", torch.int32).contiguous().numpy()
    length = int(rows.shape[1]).to_bytes(8, "little")
    for row in rows:
        chain = hashlib.sha256(chain.encode() + length + row.tobytes()).hexdigest()
    return chain


EMPTY_CHAIN = hashlib.sha256(b"cbinterp-docs").hexdigest()


def _model_meta(model: HookedTransformer, tokenizer_name: Optional[str] = None) -> dict:
    """What identifies a model for a cache: its codebooks, the basics of its config, and its tokenizer's name
    (`tokenizer_name` when given, for a tokenizer that lives outside the model)."""
    cfg = model.cfg
    tokenizer = getattr(model, "tokenizer", None)
    codebooks = {
        name: {
            "n_codes": cb.n_codes,
            "k": cb.k,
            "groups": cb.cfg.groups,
            "dim": cb.cfg.dim,
            "shape": [cb.cfg.groups, cb.k] if cb.grouped else [cb.k],
        }
        for name, cb in get_codebooks(model).items()
    }
    return {
        "codebooks": codebooks,
        "model": {
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "d_vocab": cfg.d_vocab,
            "model_name": getattr(cfg, "model_name", None),
            "tokenizer_name": tokenizer_name
            or getattr(cfg, "tokenizer_name", None)
            or (getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None),
        },
    }


def _tokenizer_only(stored: dict, current: dict) -> Optional[str]:
    """The message when the model matches and only the recorded tokenizer name differs (e.g. one was forgotten)."""
    a, b = dict(stored.get("model") or {}), dict(current.get("model") or {})
    old, new = a.pop("tokenizer_name", None), b.pop("tokenizer_name", None)
    if a != b or stored.get("codebooks") != current.get("codebooks") or old == new:
        return None
    hint = f" pass tokenizer_name={old!r} if it is the same tokenizer," if old is not None else ""
    return (
        f"the model matches but the cache records the tokenizer {old!r} and this call {new!r}:{hint} or use the "
        "tokenizer the cache was made with"
    )


def _describe_mismatch(stored: dict, current: dict) -> str:
    diffs = []
    for key in ("codebooks", "model"):
        a, b = stored.get(key, {}), current.get(key, {})
        for field in sorted(set(a) | set(b)):
            if a.get(field) != b.get(field):
                diffs.append(f"{key}.{field}: cache has {a.get(field)!r}, model has {b.get(field)!r}")
    return "; ".join(diffs[:8]) + (" ..." if len(diffs) > 8 else "")


def _check_hooks(model: HookedTransformer, hooks: Sequence[str]) -> list[str]:
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    for name in hooks:
        if name not in model.hook_dict:
            raise ValueError(
                f"Unknown hook name {name!r}{did_you_mean(name, model.hook_dict, n=5)} "
                "`model.hook_dict` lists every hook name."
            )
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"A hook is listed twice in {hooks}.")
    return hooks


def _batches(
    tokens_or_iterable, batch_size: int, mask: Optional[Tensor] = None
) -> tuple[Iterator[tuple[Tensor, Optional[Tensor]]], Optional[int]]:
    """(tokens, mask) batches of at most batch_size documents, and the number of documents if known. Items of an
    iterable are token tensors or `(tokens, mask)` pairs; a mask is bool of the tokens' shape (True = real)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

    def split(t, m) -> Iterator[tuple[Tensor, Optional[Tensor]]]:
        t = torch.as_tensor(t)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
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
        for start in range(0, t.shape[0], batch_size):
            yield t[start : start + batch_size], (None if m is None else m[start : start + batch_size])

    if isinstance(tokens_or_iterable, Tensor):
        t = tokens_or_iterable
        return split(t, mask), (t.shape[0] if t.dim() == 2 else 1)
    if mask is not None:
        raise ValueError("mask= goes with a token tensor; give an iterable's masks as (tokens, mask) pairs instead.")

    def gen():
        for item in tokens_or_iterable:
            yield from split(*item) if isinstance(item, (tuple, list)) and len(item) == 2 else split(item, None)

    return gen(), None


class _Writer:
    """Collects per-batch arrays and writes them as chunks (directory mode) or keeps them (memory mode)."""

    def __init__(self, directory: Optional[Path], meta: dict, chunk_tokens: int):
        self.directory, self.meta, self.chunk_tokens = directory, meta, chunk_tokens
        self.buffer: list[dict[str, Tensor]] = []
        self.buffered_tokens = 0
        self.buffered_docs = 0
        self.chain = meta.get("data_sha256", EMPTY_CHAIN)
        self.seq_lens = set(meta.get("seq_lens", []))
        self.kept: list[dict[str, Tensor]] = []

    def add(self, arrays: Optional[dict[str, Tensor]], n_docs: int, chain: str, seq: int) -> None:
        """Buffer one batch (`arrays` None for a batch of empty documents, which only count); `chain` is the data
        fingerprint after it."""
        if arrays is not None:
            self.buffer.append(arrays)
            self.buffered_tokens += arrays["tokens"].shape[0]
        self.buffered_docs += n_docs
        self.chain = chain
        self.seq_lens.add(int(seq))
        if self.directory is not None and self.buffered_tokens >= self.chunk_tokens:
            self.flush()

    def _commit(self, n_tokens: int, n_docs: int) -> None:
        self.meta["n_tokens"] += n_tokens
        self.meta["n_docs"] += n_docs
        self.meta["data_sha256"] = self.chain
        self.meta["seq_lens"] = sorted(self.seq_lens)

    def flush(self) -> None:
        if not self.buffer:
            if self.buffered_docs:  # only empty documents: count them, nothing to store
                self._commit(0, self.buffered_docs)
                self.buffered_docs = 0
                if self.directory is not None:
                    _write_meta(self.directory, self.meta)
            return
        merged = _concat(self.buffer)
        n_tokens, n_docs = self.buffered_tokens, self.buffered_docs
        self.buffer, self.buffered_tokens, self.buffered_docs = [], 0, 0
        if self.directory is None:
            self.kept.append(merged)
            self._commit(n_tokens, n_docs)
            return
        name = f"chunk_{len(self.meta['chunks']):06d}.safetensors"
        with atomic_file(self.directory / name) as tmp:
            # serialised here and written to our own temporary: safetensors' save_file makes a temporary of its
            # own (".tmpXXXXXX") beside the target, which a killed writer would leave in the cache folder
            tmp.write_bytes(save_tensors({k: v.contiguous() for k, v in merged.items()}))
            entry = mf.file_entry(tmp)
        self.meta["chunks"].append({"file": name, "n_tokens": n_tokens, "n_docs": n_docs})
        self.meta["files"][name] = entry
        self._commit(n_tokens, n_docs)
        _write_meta(self.directory, self.meta)


def _write_meta(directory: Path, meta: dict) -> None:
    with atomic_file(directory / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def _read_meta(directory: Path, check_files: bool = False) -> dict:
    """The cache's metadata (its marker), checked by the one verifier; a version-1 cache's meta.json otherwise."""
    if not (directory / META_FILE).exists() and (directory / LEGACY_META_FILE).is_file():
        path = directory / LEGACY_META_FILE
        try:
            meta = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"Damaged code cache metadata {path}: {err}.") from err
        if meta.get("format") != FORMAT_NAME or meta.get("version") != 1:
            raise ValueError(f"{path} is not a cbinterp code cache (format {meta.get('format')!r}).")
        return meta
    meta = mf.verify_dir(directory, (mf.CODE_CACHE,), "code cache", check_files=check_files)
    for key, kind in (("codebooks", dict), ("hooks", list), ("chunks", list), ("n_tokens", int), ("n_docs", int)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"Damaged code cache marker {directory / META_FILE}: no valid {key!r}.")
    return meta


def _clean_debris(path: Path, meta: dict) -> None:
    """Remove what killed writers left in the cache folder: their temporaries, and chunks the marker does not list."""
    listed = set(meta.get("files", {}))
    for entry in path.iterdir():
        m = _TEMP.match(entry.name)
        if (m and not _pid_alive(int(m.group(1)))) or (_CHUNK.match(entry.name) and entry.name not in listed):
            entry.unlink(missing_ok=True)


def _open_for_writing(path: Path, meta: dict, identity: dict, hooks: list[str]) -> dict:
    """The metadata to continue from at `path` (a new cache's when nothing is there); refuses anything else."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Refusing to write a code cache to {path}: a file is there, not a folder.")
    if path.is_dir() and not (path / META_FILE).exists():
        if (path / LEGACY_META_FILE).exists():
            raise ValueError(
                f"The code cache at {path} was written by an older cbinterp, without fingerprints of the weights and "
                "data, so it cannot be resumed safely. Read it with CodeCache.open, or delete it to cache again."
            )
        others = sorted(p.name for p in path.iterdir() if not _TEMP.match(p.name))
        if others:
            raise FileExistsError(
                f"Refusing to write a code cache to {path}: the folder holds other files ({others[:5]}) and is not a "
                f"code cache ({META_FILE} is missing). Use another directory, or empty it yourself."
            )
    if not (path / META_FILE).exists():
        path.mkdir(parents=True, exist_ok=True)
        _clean_debris(path, meta)
        _write_meta(path, meta)
        return meta
    try:
        old = _read_meta(path, check_files=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot resume the code cache at {path}: {err}") from err
    if {k: old.get(k) for k in identity} != identity:
        tokenizer_only = _tokenizer_only(old, identity)
        if tokenizer_only:
            raise ValueError(f"Cannot resume the code cache at {path}: {tokenizer_only}.")
        raise ValueError(
            f"The cache at {path} was made with a different model: {_describe_mismatch(old, identity)}. "
            f"Use another directory, or delete this one to start over."
        )
    if old.get("weights_sha256") != meta["weights_sha256"]:
        raise ValueError(
            f"The cache at {path} was made with a different model: other weights (the weights fingerprint differs). "
            "Resuming would mix codes of two models; use another directory, or delete this one to start over."
        )
    if list(old.get("hooks", [])) != hooks:
        raise ValueError(
            f"The cache at {path} stores hooks {old.get('hooks')}, not {hooks}; use the same hooks to resume."
        )
    _clean_debris(path, old)
    return old


def _checked_strings(token_strings: Sequence[str], d_vocab: int) -> list[str]:
    strings = list(token_strings)
    if isinstance(token_strings, str) or not all(isinstance(t, str) for t in strings):
        raise TypeError("token_strings must be a sequence of str, one per token id.")
    if len(strings) < d_vocab:
        raise ValueError(f"token_strings has {len(strings)} entries but the model has d_vocab={d_vocab} token ids.")
    return strings


def _store_tokenizer(path: Path, meta: dict, tokenizer) -> None:
    """Keep the tokenizer's files in the cache folder, listed and checksummed like every other file."""
    names = write_tokenizer_files(tokenizer, path)
    meta["tokenizer_files"] = names
    for name in names:
        meta["files"][name] = mf.file_entry(path / name)
    _write_meta(path, meta)


@torch.no_grad()
def cache_codes(
    model: HookedTransformer,
    tokens_or_iterable: Union[Tensor, Iterable[Tensor]],
    batch_size: int = 32,
    hooks: Sequence[str] = (),
    directory: Optional[Union[str, os.PathLike]] = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    progress: bool = True,
    tokenizer_name: Optional[str] = None,
    mask: Optional[Tensor] = None,
    token_strings: Optional[Sequence[str]] = None,
    activation_dtype: torch.dtype = torch.float16,
) -> "CodeCache":
    """Run `model` over documents and record every codebook's code ids for every token.

    Args:
        tokens_or_iterable: a `(n_docs, seq)` int tensor of token ids, or an iterable of such batches.
        batch_size: documents per forward pass.
        hooks: hook names whose activations are stored too (as `activation_dtype`), e.g. "blocks.0.mlp.hook_post".
        directory: stream to this folder in chunk files (resuming a previous, interrupted run there);
            None keeps everything in memory.
        chunk_tokens: tokens per chunk file (at least; chunks hold whole batches). Bounds memory on disk mode.
        progress: show a tqdm progress bar.
        tokenizer_name: recorded with the model's metadata when the tokenizer is not the model's own
            (`model.tokenizer`), so that a cache resumed or checked with another tokenizer is refused.
        mask: bool `(n_docs, seq)` beside a token tensor, False on padding (e.g. `tokenize_documents(...).mask`);
            for an iterable, give `(tokens, mask)` pairs. Masked positions are run through the model (they sit
            after the real tokens, so they change nothing before them) but not cached: they count in no
            statistic, and `pos` keeps every real token's place in its row.
        token_strings: one string per token id, kept in the cache as its text, for models without a tokenizer
            (e.g. the FSM's digits). Otherwise the model's tokenizer is kept (its files, on disk), so queries,
            probes and views read the cache's text without being told how.
        activation_dtype: dtype of the stored hook activations (float16 by default; float32 where thresholds on
            them must not tie, e.g. neuron baselines).

    Returns a `CodeCache`. Documents are numbered in input order from 0; `doc`/`pos` give each token's place.
    """
    require_hooked_transformer(model)
    hooks = _check_hooks(model, hooks)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    codebooks = get_codebooks(model)
    if not codebooks:
        raise ValueError("The model has no codebooks; attach some with attach_codebooks(model, ...) first.")
    identity = _model_meta(model, tokenizer_name)
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        **identity,
        "weights_sha256": mf.weights_fingerprint(model),
        "hooks": hooks,
        "n_tokens": 0,
        "n_docs": 0,
        "chunks": [],
        "files": {},
        "data_sha256": EMPTY_CHAIN,
        "seq_lens": [],
    }
    tokenizer = getattr(model, "tokenizer", None) if token_strings is None else None
    if token_strings is not None:
        meta["token_strings"] = _checked_strings(token_strings, model.cfg.d_vocab)
    path = None
    if directory is not None:
        path = Path(directory)
        meta = _open_for_writing(path, meta, identity, hooks)
        if tokenizer is not None and not meta.get("tokenizer_files"):
            _store_tokenizer(path, meta, tokenizer)

    skip = meta["n_docs"]
    resumed = skip > 0
    code_names = [codes_hook_name(name) for name in codebooks]
    wanted = set(code_names) | set(hooks)
    dtypes = {name: code_dtype(cb.n_codes) for name, cb in codebooks.items()}
    device = model.cfg.device
    n_ctx = model.cfg.n_ctx
    writer = _Writer(path, meta, chunk_tokens)
    batches, total = _batches(tokens_or_iterable, batch_size, mask)
    doc_index = 0  # documents seen so far in the input (including skipped ones)
    seen_tokens = 0
    chain = EMPTY_CHAIN  # fingerprint of the input's documents so far
    skipped_lens: set[int] = set()
    bar = tqdm(total=total, disable=not progress, unit="doc", desc="caching codes")
    pending = None  # the last batch's host arrays, whose device-to-host copies may still be running

    def check_skipped() -> None:
        if chain != meta["data_sha256"]:
            raise ValueError(
                f"Cannot resume the code cache at {path}: the first {skip} documents of this input differ from the "
                f"{skip} cached there (other data, or another sequence length: cached lengths {meta.get('seq_lens')}, "
                f"these {sorted(skipped_lens)}). Resuming would mix two data sets; use another directory, or delete "
                "this one to start over."
            )

    def land(arrays: dict[str, Tensor], n_docs: int, event, after: str, seq: int, keep: Optional[Tensor]) -> None:
        if event is not None:
            event.synchronize()
        if keep is not None:  # only now: on CUDA the host copies are complete after the event
            flat = keep.reshape(-1).cpu()
            arrays = {key: value[flat] for key, value in arrays.items()}
        for key in [k for k in arrays if k.startswith("codes/")]:
            arrays[key] = _stored_codes(arrays[key], dtypes[key.removeprefix("codes/")])
        writer.add(arrays, n_docs, after, seq)

    try:
        for batch, keep in batches:
            if keep is not None:  # the fingerprint covers what is cached: padding reads as -1 whatever its id
                batch = batch.masked_fill(~keep.to(batch.device), -1)
            n, seq = batch.shape
            if seq > n_ctx:
                raise ValueError(
                    f"Documents of {seq} tokens are longer than the model's context n_ctx={n_ctx} (documents "
                    f"{doc_index}..{doc_index + n - 1}). Cut them to at most {n_ctx} tokens."
                )
            seen_tokens += n * seq
            first = doc_index
            doc_index += n
            if first < skip:  # already cached by an earlier run: check it is the same data
                done = min(n, skip - first)
                chain = _chain_docs(chain, batch[:done])
                skipped_lens.add(int(seq))
                if doc_index >= skip:
                    check_skipped()
                if doc_index <= skip:
                    bar.update(n)
                    continue
                batch, first = batch[done:], skip
                keep = None if keep is None else keep[done:]
                n = batch.shape[0]
            chain = _chain_docs(chain, batch)
            if seq == 0:
                previous, pending = pending, None  # land the last batch first: documents stay in order
                if previous is not None:
                    land(*previous)
                writer.add(None, n, chain, seq)
                bar.update(n)
                continue
            run = batch if keep is None else batch.clamp_min(0)  # padding is run as token 0 and then dropped
            _, cache = model.run_with_cache(run.to(device), names_filter=lambda name: name in wanted)
            arrays = {
                "tokens": batch.reshape(-1).to(torch.int32).cpu(),
                "doc": (torch.arange(first, first + n, dtype=torch.int32).unsqueeze(1).expand(n, seq)).reshape(-1),
                "pos": torch.arange(seq, dtype=torch.int32).expand(n, seq).reshape(-1),
            }
            # Codes cross to the host as int32 (every device casts to it) and shrink there; on CUDA the copies
            # run asynchronously and are collected after the next batch has been queued.
            for name in codebooks:
                codes = cache[codes_hook_name(name)]
                arrays[f"codes/{name}"] = _to_host(codes.reshape(n * seq, *codes.shape[2:]).to(torch.int32))
            for hook in hooks:
                act = cache[hook]
                arrays[f"act/{hook}"] = _to_host(act.reshape(n * seq, *act.shape[2:]).to(activation_dtype))
            del cache
            event = None
            if torch.device(device).type == "cuda":
                event = torch.cuda.Event()
                event.record()
            previous, pending = pending, None  # cleared first: a failed landing must not be retried after a gap
            if previous is not None:
                land(*previous)
            pending = (arrays, n, event, chain, seq, keep)
            bar.update(n)
        previous, pending = pending, None
        if previous is not None:
            land(*previous)
        if resumed and doc_index < skip:
            raise ValueError(
                f"Cannot resume the code cache at {path}: this input has {doc_index} documents, fewer than the {skip} "
                "already cached there (other data). Use another directory, or delete this one to start over."
            )
        if seen_tokens == 0:
            raise ValueError("cache_codes got no tokens: the input is empty (no documents, or documents of length 0).")
        writer.flush()
    except BaseException:
        if pending is not None:  # an interruption keeps the last finished batch, as without the deferred copy
            previous, pending = pending, None
            land(*previous)
        raise
    finally:
        bar.close()
    if resumed and path is not None:
        warnings.warn(
            f"Resumed the code cache at {path}: {skip} documents were already cached (checked to be the same), "
            f"{meta['n_docs'] - skip} added.",
            ResumeWarning,
            stacklevel=3,
        )
    if path is not None:
        return CodeCache.open(path)
    return CodeCache(meta, arrays=_concat(writer.kept), tokenizer=tokenizer)


def _to_host(t: Tensor) -> Tensor:
    """`t` on the CPU; from CUDA through pinned memory without waiting (synchronise before reading it)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def _concat(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    if not parts:
        return {}
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class CodeCache:
    """Code ids (and optional activations) of every token of a data set, with the token ids and their places.

    Made by `cache_codes`, or reopened from disk with `CodeCache.open(directory)` (no model needed). Arrays are
    loaded into memory on first access (all chunks concatenated).
    """

    def __init__(
        self,
        meta: dict,
        arrays: Optional[dict[str, Tensor]] = None,
        directory: Optional[Path] = None,
        tokenizer=None,
    ):
        self.meta = meta
        self.directory = directory
        self._arrays = arrays
        self._tokenizer = tokenizer
        self._vocabulary: Optional[Vocabulary] = None

    # -- text ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer the cache was made with (kept from the model), or None."""
        if self._tokenizer is None and self.meta.get("tokenizer_files") and self.directory is not None:
            for name in self.meta["tokenizer_files"]:
                mf.verify_file(self.directory, self.meta, name, "code cache")
            self._tokenizer = load_tokenizer(self.directory)
        return self._tokenizer

    @property
    def vocabulary(self) -> Optional[Vocabulary]:
        """How the cached token ids read as text (from the tokenizer or the stored token strings), or None."""
        if self._vocabulary is None:
            if self.tokenizer is not None:
                self._vocabulary = Vocabulary(self.tokenizer)
            elif self.meta.get("token_strings"):
                self._vocabulary = Vocabulary(self.meta["token_strings"])
        return self._vocabulary

    @classmethod
    def open(cls, directory: Union[str, os.PathLike]) -> "CodeCache":
        path = Path(directory)
        return cls(_read_meta(path), directory=path)

    # -- loading -------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Tensor]:
        if self._arrays is None:
            parts = []
            for chunk in self.meta["chunks"]:
                if "files" in self.meta:  # every chunk is checked against its recorded sha256 before it is read
                    mf.verify_file(self.directory, self.meta, chunk["file"], "code cache")
                parts.append(load_file(str(self.directory / chunk["file"])))
            self._arrays = _concat(parts)
        return self._arrays

    def _get(self, key: str) -> Tensor:
        arrays = self._load()
        if key not in arrays:
            if self.n_tokens == 0:
                raise ValueError("This cache holds no tokens yet.")
            raise KeyError(key)
        return arrays[key]

    # -- metadata ------------------------------------------------------------------------------------------
    @property
    def codebook_names(self) -> list[str]:
        return list(self.meta["codebooks"])

    @property
    def hook_names(self) -> list[str]:
        return list(self.meta["hooks"])

    def n_codes(self, name: str) -> int:
        return self._codebook(name)["n_codes"]

    @property
    def n_tokens(self) -> int:
        return (
            int(self.meta["n_tokens"])
            if self._arrays is None
            else int(self._arrays.get("tokens", torch.zeros(0)).shape[0])
        )

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    def _codebook(self, name: str) -> dict:
        if name not in self.meta["codebooks"]:
            raise KeyError(
                f"No codebook {name!r} in this cache{did_you_mean(name, self.codebook_names)} "
                f"It has {self.codebook_names}."
            )
        return self.meta["codebooks"][name]

    def bytes_per_token(self, name: str) -> int:
        """Bytes the codes of codebook `name` take per token on disk (k ids, per head for attention)."""
        info = self._codebook(name)
        count = 1
        for size in info["shape"]:
            count *= size
        return count * torch.empty(0, dtype=self.storage_dtype(name)).element_size()

    def storage_dtype(self, name: str) -> torch.dtype:
        if self._arrays is not None and f"codes/{name}" in self._arrays:
            return self._arrays[f"codes/{name}"].dtype
        return code_dtype(self._codebook(name)["n_codes"])

    # -- arrays --------------------------------------------------------------------------------------------
    def codes(self, name: str) -> Tensor:
        """Code ids of codebook `name`: int64 `(n_tokens, k)`, or `(n_tokens, heads, k)` for per-head codebooks."""
        info = self._codebook(name)
        return _read_codes(self._get(f"codes/{name}"), info["n_codes"])

    @property
    def tokens(self) -> Tensor:
        return self._get("tokens").long()

    @property
    def doc(self) -> Tensor:
        return self._get("doc").long()

    @property
    def pos(self) -> Tensor:
        return self._get("pos").long()

    def activations(self, hook_name: str) -> Tensor:
        """Stored activations of `hook_name`, `(n_tokens, ...)` (float16 unless cached with another dtype)."""
        if hook_name not in self.meta["hooks"]:
            raise KeyError(f"Hook {hook_name!r} was not cached; this cache has activations of {self.hook_names}.")
        return self._get(f"act/{hook_name}")

    def check_model(self, model: HookedTransformer, tokenizer_name: Optional[str] = None, weights: bool = True) -> None:
        """Raise ValueError if `model` (and `tokenizer_name`, as given to `cache_codes`) is not what this cache was
        made with: codebooks, n_codes, vocabulary, size, tokenizer, and (with `weights`, when the cache recorded
        them) the weights themselves."""
        current = _model_meta(require_hooked_transformer(model), tokenizer_name)
        stored = {k: self.meta.get(k) for k in current}
        if stored != current:
            tokenizer_only = _tokenizer_only(stored, current)
            if tokenizer_only:
                raise ValueError(f"This cache does not match: {tokenizer_only}.")
            raise ValueError(f"This cache was made with a different model: {_describe_mismatch(stored, current)}.")
        recorded = self.meta.get("weights_sha256")
        if weights and recorded is not None and recorded != mf.weights_fingerprint(model):
            raise ValueError("This cache was made with a different model: other weights (fingerprints differ).")

    def __repr__(self) -> str:
        where = f", directory={str(self.directory)!r}" if self.directory else ""
        return (
            f"CodeCache(n_tokens={self.n_tokens}, n_docs={self.n_docs}, codebooks={self.codebook_names}, "
            f"hooks={self.hook_names}{where})"
        )


def cached_codes(cache, mask: Optional[Bool[Tensor, "batch pos"]] = None) -> dict[str, Tensor]:
    """The code ids of every codebook in an `ActivationCache` (or any name -> tensor mapping), positions flattened.

    Returns `{codebook name: codes}` keyed by the codebook's hook name (".hook_codes" removed, as in
    `get_codebooks`), each `(n_positions, k)` or `(n_positions, n_heads, k)`. `mask (batch, pos)` keeps only the
    positions where it is True (e.g. to drop BOS or padding); without it all `batch * pos` positions are kept.
    """
    out = {}
    for name in list(cache.keys()):
        if not name.endswith(CODES_SUFFIX):
            continue
        codes = cache[name]
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(codes.shape[:2]):
                raise ValueError(
                    f"mask must be a bool tensor of shape (batch, pos) = {tuple(codes.shape[:2])}, "
                    f"got {mask.dtype} {tuple(mask.shape)}."
                )
            out[name.removesuffix(CODES_SUFFIX)] = codes[mask.to(codes.device)]
        else:
            out[name.removesuffix(CODES_SUFFIX)] = codes.flatten(0, 1)
    if not out:
        raise ValueError(
            "The cache holds no '*.hook_codes' activations; run_with_cache a model with codebooks attached."
        )
    return out
