"""How many rows the matmul code search scores at once: cache-sized blocks on a CPU, memory-sized ones on CUDA.

`fused_search.matmul_search` scores a block of rows against every code with one batched matmul and then takes the
top k. On a CPU a block should stay in cache; on a GPU each block costs a matmul and a top-k launch, so the fewer
the better, as long as the scores fit in memory. `search_block_rows` is the rule (a pure function, tested on a
CPU); `block_rows_for` applies it to the tensors of a search, asking CUDA for its free memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CPU_BLOCK_SCORES", "block_rows_for", "bytes_per_row", "cuda_free_bytes", "search_block_rows"]

#: CPU blocks hold about this many scores (8 MB of float32): a block stays in cache (`Codebook._chunk_scores`).
CPU_BLOCK_SCORES = 1 << 21
#: On CUDA a block may take this fraction of the free memory (what the driver has free plus what torch's caching
#: allocator holds unused): the rest is left for whatever else runs beside the search.
CUDA_MEMORY_FRACTION = 0.5
#: On CUDA a search needing at most this many bytes is one block whatever the free memory (no query needed).
CUDA_SMALL_SEARCH_BYTES = 1 << 28
#: The free memory assumed on CUDA where it can't be asked (inside a `torch.compile` trace).
CUDA_ASSUMED_FREE_BYTES = 1 << 32
#: At most this many scores in a block: CUDA kernels index some tensors with 32-bit integers.
MAX_BLOCK_SCORES = 2**31 - 1


def bytes_per_row(groups: int, n_codes: int, k: int, dtype: torch.dtype) -> int:
    """The memory one row of a block takes on CUDA.

    Per score: the score and room for a same-size temporary and an int64 index (what a sort-based top-k may use);
    plus the k best values and int64 ids of every group."""
    size = dtype.itemsize
    return groups * (n_codes * (2 * size + 8) + k * (size + 8))


def search_block_rows(
    n_rows: int,
    groups: int,
    n_codes: int,
    k: int,
    dtype: torch.dtype,
    device_kind: str,
    free_bytes: int | None = None,
    cpu_block_scores: int = CPU_BLOCK_SCORES,
    fraction: float = CUDA_MEMORY_FRACTION,
) -> int:
    """The rows per block of the matmul search of `n_rows` rows against `groups` x `n_codes` codes, top `k`.

    The rule:
    * not CUDA (CPU and any other device): `max(1, cpu_block_scores // (groups * n_codes))` rows, about
      `cpu_block_scores` scores per block, so a block stays in cache;
    * CUDA: as many rows as fit in `max(fraction * free_bytes, CUDA_SMALL_SEARCH_BYTES)` bytes at `bytes_per_row`
      each, and at most `MAX_BLOCK_SCORES` scores: one matmul and one top-k for the whole search where it fits.
      `free_bytes` None (unknown) means `CUDA_ASSUMED_FREE_BYTES`.
    Never fewer than 1 row nor more than `n_rows` (1 when `n_rows` is 0).
    """
    for name, value in (("n_rows", n_rows), ("groups", groups), ("n_codes", n_codes), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "n_rows" else 1):
            raise ValueError(
                f"search_block_rows: {name} must be an int >= {0 if name == 'n_rows' else 1}, got {value!r}."
            )
    if not 0 < fraction <= 1:
        raise ValueError(f"search_block_rows: fraction must be in (0, 1], got {fraction!r}.")
    scores_per_row = groups * n_codes
    if device_kind != "cuda":
        rows = cpu_block_scores // scores_per_row
    else:
        free = CUDA_ASSUMED_FREE_BYTES if free_bytes is None else max(0, int(free_bytes))
        budget = max(int(fraction * free), CUDA_SMALL_SEARCH_BYTES)
        rows = min(budget // bytes_per_row(groups, n_codes, k, dtype), MAX_BLOCK_SCORES // scores_per_row)
    return max(1, min(rows, n_rows))


def cuda_free_bytes(device: torch.device) -> int:
    """Bytes a new tensor can take on a CUDA device.

    That is what the driver has free plus what torch's caching allocator holds but does not use (freed blocks it
    keeps)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def block_rows_for(x: Tensor, w: Tensor, k: int, cpu_block_scores: int = CPU_BLOCK_SCORES) -> int:
    """`search_block_rows` for the search of x (n, groups, dim) against w (groups, n_codes, dim) where they are.

    On CUDA it asks for the free memory only when the whole search needs more than `CUDA_SMALL_SEARCH_BYTES`,
    and never inside a `torch.compile` trace (the query can't be traced; `CUDA_ASSUMED_FREE_BYTES` stands in)."""
    n, groups, n_codes = x.shape[0], w.shape[0], w.shape[1]
    kind = x.device.type
    free = None
    if (
        kind == "cuda"
        and n * bytes_per_row(groups, n_codes, k, x.dtype) > CUDA_SMALL_SEARCH_BYTES
        and not torch.compiler.is_compiling()
    ):
        free = cuda_free_bytes(x.device)
    return search_block_rows(n, groups, n_codes, k, x.dtype, kind, free, cpu_block_scores)
