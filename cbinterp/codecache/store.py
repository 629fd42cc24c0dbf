"""Cache the code ids of every codebook (and optionally some activations) over a data set, in memory or on disk.

Codes are stored in the smallest integer dtype that holds ids ``0 .. n_codes - 1`` (a plain forward pass never
yields the "no code" id -1): ``uint8`` for ``n_codes <= 256``, ``uint16`` for ``n_codes <= 65536`` (2 bytes per code,
the budget of the analysis issue) and ``int32`` above; ``uint16`` is only stored, concatenated and widened, which
torch supports. Token ids, document index and position are ``int32`` on disk; activations
of extra hooks are ``float16``. `CodeCache` accessors return codes, tokens, doc and pos as ``int64``.

On disk (``directory=...``) the cache is a folder of ``chunk_000000.safetensors`` files, each holding whole
documents and written atomically, plus ``meta.json``, rewritten atomically after each chunk. An interrupted run
keeps its finished chunks; running `cache_codes` again on the same folder with the same model skips the
documents already cached and appends the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Bool
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from cbinterp.core.atomic import atomic_file
from cbinterp.core.attach import get_codebooks, require_hooked_transformer
from cbinterp.core.naming import CODES_SUFFIX, codes_hook_name, did_you_mean

FORMAT_NAME = "cbinterp-code-cache"
FORMAT_VERSION = 1
META_FILE = "meta.json"
DEFAULT_CHUNK_TOKENS = 1 << 18

__all__ = ["CodeCache", "cache_codes", "cached_codes", "code_dtype"]


def code_dtype(n_codes: int) -> torch.dtype:
    """The smallest dtype that stores code ids 0..n_codes-1 (uint8, uint16, then int32)."""
    if n_codes <= 256:
        return torch.uint8
    if n_codes <= 65536:
        return torch.uint16
    if n_codes <= 2**31 - 1:
        return torch.int32
    raise ValueError(f"n_codes={n_codes} is too large to cache.")


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


def _batches(tokens_or_iterable, batch_size: int) -> tuple[Iterator[Tensor], Optional[int]]:
    """Batches of at most batch_size documents, and the number of documents if known."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

    def split(t) -> Iterator[Tensor]:
        t = torch.as_tensor(t)
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(
                f"Expected an int tensor of token ids of shape (n_docs, seq), got {t.dtype} {tuple(t.shape)}."
            )
        for start in range(0, t.shape[0], batch_size):
            yield t[start : start + batch_size]

    if isinstance(tokens_or_iterable, Tensor):
        t = tokens_or_iterable
        return split(t), (t.shape[0] if t.dim() == 2 else 1)

    def gen():
        for batch in tokens_or_iterable:
            yield from split(batch)

    return gen(), None


class _Writer:
    """Collects per-batch arrays and writes them as chunks (directory mode) or keeps them (memory mode)."""

    def __init__(self, directory: Optional[Path], meta: dict, chunk_tokens: int):
        self.directory, self.meta, self.chunk_tokens = directory, meta, chunk_tokens
        self.buffer: list[dict[str, Tensor]] = []
        self.buffered_tokens = 0
        self.buffered_docs = 0
        self.kept: list[dict[str, Tensor]] = []

    def add(self, arrays: Optional[dict[str, Tensor]], n_docs: int) -> None:
        """Buffer one batch (`arrays` None for a batch of empty documents, which only count)."""
        if arrays is not None:
            self.buffer.append(arrays)
            self.buffered_tokens += arrays["tokens"].shape[0]
        self.buffered_docs += n_docs
        if self.directory is not None and self.buffered_tokens >= self.chunk_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            if self.buffered_docs:  # only empty documents: count them, nothing to store
                self.meta["n_docs"] += self.buffered_docs
                self.buffered_docs = 0
                if self.directory is not None:
                    _write_meta(self.directory, self.meta)
            return
        merged = _concat(self.buffer)
        n_tokens, n_docs = self.buffered_tokens, self.buffered_docs
        self.buffer, self.buffered_tokens, self.buffered_docs = [], 0, 0
        if self.directory is None:
            self.kept.append(merged)
            self.meta["n_tokens"] += n_tokens
            self.meta["n_docs"] += n_docs
            return
        name = f"chunk_{len(self.meta['chunks']):06d}.safetensors"
        with atomic_file(self.directory / name) as tmp:
            save_file({k: v.contiguous() for k, v in merged.items()}, str(tmp))
        self.meta["chunks"].append({"file": name, "n_tokens": n_tokens, "n_docs": n_docs})
        self.meta["n_tokens"] += n_tokens
        self.meta["n_docs"] += n_docs
        _write_meta(self.directory, self.meta)


def _write_meta(directory: Path, meta: dict) -> None:
    with atomic_file(directory / META_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a code cache: it has no {META_FILE}.")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a cbinterp code cache (format {meta.get('format')!r}).")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta['version']}; this cbinterp reads up to {FORMAT_VERSION}.")
    return meta


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
        "hooks": hooks,
        "n_tokens": 0,
        "n_docs": 0,
        "chunks": [],
    }
    path = None
    if directory is not None:
        path = Path(directory)
        if (path / META_FILE).exists():
            old = _read_meta(path)
            if {k: old.get(k) for k in identity} != identity:
                raise ValueError(
                    f"The cache at {path} was made with a different model: {_describe_mismatch(old, identity)}. "
                    f"Use another directory, or delete this one to start over."
                )
            if list(old.get("hooks", [])) != hooks:
                raise ValueError(
                    f"The cache at {path} stores hooks {old.get('hooks')}, not {hooks}; use the same hooks to resume."
                )
            meta = old
        else:
            path.mkdir(parents=True, exist_ok=True)
            _write_meta(path, meta)

    skip = meta["n_docs"]
    code_names = [codes_hook_name(name) for name in codebooks]
    wanted = set(code_names) | set(hooks)
    dtypes = {name: code_dtype(cb.n_codes) for name, cb in codebooks.items()}
    device = model.cfg.device
    writer = _Writer(path, meta, chunk_tokens)
    batches, total = _batches(tokens_or_iterable, batch_size)
    doc_index = 0  # documents seen so far in the input (including skipped ones)
    seen_tokens = 0
    bar = tqdm(total=total, disable=not progress, unit="doc", desc="caching codes")
    pending = None  # the last batch's host arrays, whose device-to-host copies may still be running

    def land(arrays: dict[str, Tensor], n_docs: int, event) -> None:
        if event is not None:
            event.synchronize()
        for key in [k for k in arrays if k.startswith("codes/")]:
            arrays[key] = arrays[key].to(dtypes[key.removeprefix("codes/")])
        writer.add(arrays, n_docs)

    try:
        for batch in batches:
            n, seq = batch.shape
            seen_tokens += n * seq
            first = doc_index
            doc_index += n
            if doc_index <= skip:  # already cached by an earlier run
                bar.update(n)
                continue
            if first < skip:
                batch, first = batch[skip - first :], skip
                n = batch.shape[0]
            if seq == 0:
                previous, pending = pending, None  # land the last batch first: documents stay in order
                if previous is not None:
                    land(*previous)
                writer.add(None, n)
                bar.update(n)
                continue
            _, cache = model.run_with_cache(batch.to(device), names_filter=lambda name: name in wanted)
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
            pending = (arrays, n, event)
            bar.update(n)
        previous, pending = pending, None
        if previous is not None:
            land(*previous)
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
    if path is not None:
        return CodeCache.open(path)
    return CodeCache(meta, arrays=_concat(writer.kept))


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

    def __init__(self, meta: dict, arrays: Optional[dict[str, Tensor]] = None, directory: Optional[Path] = None):
        self.meta = meta
        self.directory = directory
        self._arrays = arrays

    @classmethod
    def open(cls, directory: Union[str, os.PathLike]) -> "CodeCache":
        path = Path(directory)
        return cls(_read_meta(path), directory=path)

    # -- loading -------------------------------------------------------------------------------------------
    def _load(self) -> dict[str, Tensor]:
        if self._arrays is None:
            parts = [load_file(str(self.directory / c["file"])) for c in self.meta["chunks"]]
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
        return count * torch.empty(0, dtype=code_dtype(info["n_codes"])).element_size()

    def storage_dtype(self, name: str) -> torch.dtype:
        return code_dtype(self._codebook(name)["n_codes"])

    # -- arrays --------------------------------------------------------------------------------------------
    def codes(self, name: str) -> Tensor:
        """Code ids of codebook `name`: int64 `(n_tokens, k)`, or `(n_tokens, heads, k)` for per-head codebooks."""
        self._codebook(name)
        return self._get(f"codes/{name}").long()

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

    def check_model(self, model: HookedTransformer, tokenizer_name: Optional[str] = None) -> None:
        """Raise ValueError if `model` (and `tokenizer_name`, as given to `cache_codes`) is not what this cache was
        made with: codebooks, n_codes, vocabulary, size, tokenizer."""
        current = _model_meta(require_hooked_transformer(model), tokenizer_name)
        stored = {k: self.meta.get(k) for k in current}
        if stored != current:
            raise ValueError(f"This cache was made with a different model: {_describe_mismatch(stored, current)}.")

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
