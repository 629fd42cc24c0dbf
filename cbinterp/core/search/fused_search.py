"""The nearest-code search (k = 1) on a CPU without the score matrix: a small C kernel, built once and cached.

`Codebook._search` scores a block of positions against every code with one matmul and then takes the maximum: at
the attention codebooks' shape (head size 32, 1000 codes) the matmul's inner dimension is so small that writing the
(groups, positions, codes) scores to memory costs more than the arithmetic. The kernel here keeps a 6-row by
16-code tile of dot products in registers, adds the bias (euclidean) and folds the tile into a running maximum and
its index: nothing but the best score and its id leave the core.

* Results: the same ids and best scores as the matmul search. Each dot product is summed in order over the
  dimension with fused multiply-adds, and the first maximum wins a tie, as in `Tensor.max`. On the 2-core AVX2
  machine measured, MKL's matmul adds in the same order up to a dimension of 128 (16 codes or more): the scores
  were bitwise identical and so were the ids (0 differences in 1.6 million searches at the FSM model's shapes, on
  random and on data-drawn codes). At dimension 256 the scores differ by rounding (up to ~1e-5) and no id
  differed in 200,000 rows; at 512 one near-tie in 50,000 rows flipped (euclidean), so the kernel stops at 256.
* Non-finite values: a row whose scores could overflow (its sum of |x| times the largest |code entry| near the
  float limit), or that holds a NaN or an infinity, is not searched here (id -2) and the caller searches it the
  matmul way, so NaN propagation stays as it was; codes with a non-finite entry refuse the whole call.
* Threads: OpenMP over blocks of (group, 96 rows), `torch.get_num_threads()` of them; a row's result does not depend
  on the number of threads.
* Where: CPU, float32, x86-64 with AVX2 and FMA (checked at run time), not under CPU autocast, and only at shapes
  where it is faster (`MAX_DIM`, `MIN_CODES`); elsewhere, or if the build fails (logged once, and then
  `available()` is False), the matmul search runs. `nearest_code` is a torch operator (`cbinterp::nearest_code`),
  so a compiled model calls the kernel as one opaque step.
* `matmul_search` is the search it stands in for (any device, any k, one batched matmul per block of rows, then
  the top k; blocks sized per device by `cbinterp.core.search.blocks`): `Codebook` runs it wherever the kernel
  does not, and `nearest_code` for the rows the kernel leaves.

The library is plain C called through ctypes (no torch headers: it builds in 1.5 to 3 s with `gcc -O3`), cached
under `$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`) as `cbinterp_fused_search/<hash>.so`, the hash
naming the source, flags and compiler. `CBINTERP_FUSED_SEARCH=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import typing
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cbinterp.core.search.blocks import CPU_BLOCK_SCORES, block_rows_for

__all__ = ["applies", "argmax", "available", "matmul_search"]

logger = logging.getLogger(__name__)

#: Returned as the id of a row that the kernel left to the caller (non-finite, or scores that could overflow).
UNSEARCHED = -2

#: The kernel's C source, shipped beside this module as package data.
SOURCE = (Path(__file__).parent / "nearest_code.c").read_text()

FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions"
    )
    return Path(root) / "cbinterp_fused_search"


def _build(cc: str, target: Path) -> None:
    """Compile SOURCE to `target`, atomically (a temporary beside it, then a rename): concurrent builds are safe."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src = Path(tmp) / "fused_search.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        proc = subprocess.run(
            [cc, *FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)


def library_name(cc: str) -> str:
    """The cached library's file name: a hash of the source, the flags and the compiler."""
    return f"fused_search_{hashlib.sha256(chr(0).join((SOURCE, *FLAGS, cc)).encode()).hexdigest()[:16]}.so"


def _load(cc: str) -> ctypes.CDLL:
    """The library from the cache, built there first if missing (or rebuilt if it does not load).

    Where the cache can't be written, it is built in a folder of the temporary directory."""
    errors = []
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"cbinterp_fused_search-{os.getuid()}"):
        target = folder / library_name(cc)
        try:
            if target.exists():
                try:
                    return ctypes.CDLL(str(target))
                except OSError:  # a damaged file (a build cut short elsewhere): build it again
                    pass
            _build(cc, target)
            return ctypes.CDLL(str(target))
        except Exception as err:  # noqa: BLE001 - try the next folder, then report every reason
            errors.append(f"{folder}: {err}")
    raise RuntimeError("; ".join(errors))


@functools.cache
def _kernel():
    """The ctypes function `cb_fused_argmax`, or None (the reason logged once) where the fused search can't run."""
    if os.environ.get("CBINTERP_FUSED_SEARCH", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info(
            "fused code search: not built on %s %s; the matmul search runs", platform.system(), platform.machine()
        )
        return None
    cc = _compiler()
    if cc is None:
        logger.warning("fused code search: no C compiler found (gcc, cc or $CC); the matmul search runs")
        return None
    try:
        lib = _load(cc)
        if not lib.cb_supported():
            logger.info("fused code search: this CPU lacks AVX2/FMA; the matmul search runs")
            return None
        fn = lib.cb_fused_argmax
    except Exception as err:  # noqa: BLE001 - any failure means the plain search, never an error
        logger.warning("fused code search unavailable (%s); the matmul search runs", err)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, i64, i64, i64, p, i64, p, p, p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether the fused search can run in this process (builds the library on the first call)."""
    return _kernel() is not None


#: The shapes the kernel takes (measured on a 2-core AVX2 machine): up to dimension 256 it is 1.4x (256) to 4x
#: (32) faster than the matmul search; from 512 up MKL's blocked matmul is about as fast and its sums part from the
#: kernel's in order (a rare near-tie flips); below about 64 codes the score matrix is small anyway while the
#: kernel pads the codes to a multiple of 16.
MAX_DIM = 256
MIN_CODES = 64


@torch.compiler.assume_constant_result
def _ready() -> bool:
    """`available()`, read once at trace time by torch.compile (the answer does not change within a process)."""
    return available()


def applies(x: Tensor, w: Tensor) -> bool:
    """Whether the fused search takes these tensors (x (n, groups, dim), w (groups, n_codes, dim)).

    It takes CPU float32, in a shape where it is the faster one, outside CPU autocast (where the matmul would run in
    bf16: `Codebook._search_fp32` turns autocast off first), once the library is built. Under torch.compile the
    search runs as the opaque operator `nearest_code`, so compiled training gets the kernel too."""
    return (
        x.shape[-1] <= MAX_DIM
        and w.shape[-2] >= MIN_CODES
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and _ready()
    )


def argmax(x: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The first best code id `(n, groups)` (int64) and its score `(n, groups)` of every row of `x`.

    `x` is (n, groups, dim), searched against the codes `w` (groups, n_codes, dim): score x.w, or 2x.w - bias (bias
    (groups, n_codes)) for euclidean.

    Rows left to the caller have id `UNSEARCHED` (NaN best): those with a non-finite entry or scores that could
    overflow. None if the kernel refused the call (codes not finite); only for tensors that `applies` takes.
    """
    fn = _kernel()
    n, groups, dim = x.shape
    n_codes = w.shape[1]
    if fn is None or n_codes >= 2**31 - 16:
        return None
    x = x.contiguous()
    w = w.contiguous()
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    ids = torch.empty(n, groups, dtype=torch.int64)
    best = torch.empty(n, groups, dtype=torch.float32)
    if n == 0:
        return ids, best
    rc = fn(
        x.data_ptr(),
        n,
        groups,
        dim,
        w.data_ptr(),
        n_codes,
        None if bias is None else bias.data_ptr(),
        ids.data_ptr(),
        best.data_ptr(),
        torch.get_num_threads(),
    )
    return (ids, best) if rc == 0 else None


def matmul_search(
    x: Float[Tensor, "n groups dim"],
    w: Float[Tensor, "groups n_codes dim"],
    bias: Float[Tensor, "groups n_codes"] | None,
    k: int = 1,
    block_scores: int = CPU_BLOCK_SCORES,
    block_rows: int | None = None,
) -> tuple[Int[Tensor, "groups n k"], Float[Tensor, "groups n"]]:
    """The search the kernel stands in for, on any device: a batched matmul per block of rows, then the top k.

    One batched matmul of x (n, groups, dim) against every group's codes w (groups, n_codes, dim) (no loop over
    groups). Returns ids `(groups, n, k)`, best first, and the best scores `(groups, n)`; score x.w, or 2x.w - bias
    for euclidean.

    Blocks of `block_rows` rows, by default `blocks.block_rows_for`'s: on a CPU about `block_scores` scores,
    so that a block stays in cache; on CUDA as many rows as half the free memory holds (often all of them). The
    block size does not change the ids (the scores only by the rounding of another matmul order)."""
    groups, n = w.shape[0], x.shape[0]
    by_group = x.transpose(0, 1)  # (groups, n, dim), a view
    w_t = w.transpose(1, 2)  # (groups, dim, n_codes)
    rows = block_rows_for(x, w, k, block_scores) if block_rows is None else max(1, int(block_rows))
    if rows >= n:  # one block: the results come straight out of top-k, without copies into codes and best
        return _top(_block(by_group, w_t, bias), k)
    codes = torch.empty(groups, n, k, dtype=torch.long, device=x.device)
    best = torch.empty(groups, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, rows):
        ids, values = _top(_block(by_group[:, start : start + rows], w_t, bias), k)
        codes[:, start : start + rows] = ids
        best[:, start : start + rows] = values
    return codes, best


def _block(by_group: Tensor, w_t: Tensor, bias: Tensor | None) -> Tensor:
    """The scores (groups, rows, n_codes) of a block of rows (groups, rows, dim) against w_t (groups, dim, n_codes)."""
    scores = torch.bmm(by_group, w_t)
    return scores if bias is None else scores.mul_(2).sub_(bias.unsqueeze(1))


def _top(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k ids (groups, rows, k), best first, and the best score (groups, rows) of a block of scores."""
    if k == 1:  # max(dim) is about twice as fast as argmax on CPU, and also returns the first maximum
        top = scores.max(dim=-1, keepdim=True)
    else:
        top = scores.topk(k, dim=-1)
    return top.indices, top.values[..., 0]


def _matmul_argmax(x: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """`matmul_search` with k = 1 as the kernel answers: ids and best scores `(n, groups)`."""
    codes, best = matmul_search(x, w, bias)
    return codes[..., 0].transpose(0, 1).contiguous(), best.transpose(0, 1).contiguous()


# no_type_check: torch.library reads the operator's schema off this function's own annotations, which a run-time
# checker's wrapper (the tests' jaxtyping import hook) would hide.
@torch.library.custom_op("cbinterp::nearest_code", mutates_args=())
@typing.no_type_check
def nearest_code(x: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """The first best code id `(n, groups)` and its score `(n, groups)` of every row, complete.

    The kernel, and the matmul search for the rows it leaves (non-finite input, possible overflow) or for all of them
    where it refuses the call (codes not finite). An operator of its own (`torch.ops.cbinterp.nearest_code`), so that
    torch.compile calls it as one opaque step instead of tracing ctypes; only for tensors that `applies` takes."""
    found = argmax(x, w, bias)
    if found is None:
        return _matmul_argmax(x, w, bias)
    ids, best = found
    left = (ids == UNSEARCHED).any(-1).nonzero()[:, 0]
    if left.numel():
        ids[left], best[left] = _matmul_argmax(x[left], w, bias)
    return ids, best


@nearest_code.register_fake
@typing.no_type_check
def _(x: Tensor, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    n, groups = x.shape[0], x.shape[1]
    return x.new_empty((n, groups), dtype=torch.int64), x.new_empty((n, groups))
