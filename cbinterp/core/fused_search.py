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
  the top k; blocks sized per device by `cbinterp.core.search_blocks`): `Codebook` runs it wherever the kernel
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
from pathlib import Path
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cbinterp.core.search_blocks import CPU_BLOCK_SCORES, block_rows_for

__all__ = ["applies", "argmax", "available", "matmul_search"]

logger = logging.getLogger(__name__)

#: Returned as the id of a row that the kernel left to the caller (non-finite, or scores that could overflow).
UNSEARCHED = -2

SOURCE = r"""
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define NR 16 /* codes per panel: two AVX vectors */
#define MR 6  /* rows per register tile: 12 accumulators */
#define RB 96 /* rows per block (one OpenMP task per group and block) */

int cb_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Rows [0, R) (x rows `xs` floats apart) against panels [p0, p1): the running best value and id per lane. */
#define TILE(R)                                                                                              \
  static inline __attribute__((always_inline, target("avx2,fma"))) void tile##R(                              \
      const float *x, int64_t xs, const float *wp, const float *bp, int64_t D, int64_t p0, int64_t p1,        \
      float *bv, int32_t *bi) {                                                                               \
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                                           \
    for (int64_t p = p0; p < p1; ++p) {                                                                       \
      const float *w = wp + p * D * NR;                                                                       \
      __m256 a0[R], a1[R];                                                                                    \
      for (int r = 0; r < R; ++r) {                                                                           \
        a0[r] = _mm256_setzero_ps();                                                                          \
        a1[r] = _mm256_setzero_ps();                                                                          \
      }                                                                                                       \
      for (int64_t d = 0; d < D; ++d) {                                                                       \
        __m256 w0 = _mm256_loadu_ps(w + d * NR), w1 = _mm256_loadu_ps(w + d * NR + 8);                        \
        for (int r = 0; r < R; ++r) {                                                                         \
          __m256 xv = _mm256_broadcast_ss(x + r * xs + d);                                                    \
          a0[r] = _mm256_fmadd_ps(xv, w0, a0[r]);                                                             \
          a1[r] = _mm256_fmadd_ps(xv, w1, a1[r]);                                                             \
        }                                                                                                     \
      }                                                                                                       \
      __m256 b0 = _mm256_loadu_ps(bp + p * NR), b1 = _mm256_loadu_ps(bp + p * NR + 8);                        \
      __m256 i0 = _mm256_castsi256_ps(_mm256_add_epi32(iota, _mm256_set1_epi32((int)(p * NR))));              \
      __m256 i1 = _mm256_castsi256_ps(_mm256_add_epi32(iota, _mm256_set1_epi32((int)(p * NR + 8))));          \
      for (int r = 0; r < R; ++r) {                                                                           \
        float *v = bv + r * NR, *j = (float *)(bi + r * NR);                                                  \
        __m256 s0 = _mm256_add_ps(a0[r], b0), s1 = _mm256_add_ps(a1[r], b1);                                  \
        __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);                                          \
        __m256 m0 = _mm256_cmp_ps(s0, v0, _CMP_GT_OQ), m1 = _mm256_cmp_ps(s1, v1, _CMP_GT_OQ);                \
        _mm256_storeu_ps(v, _mm256_blendv_ps(v0, s0, m0));                                                    \
        _mm256_storeu_ps(v + 8, _mm256_blendv_ps(v1, s1, m1));                                                \
        _mm256_storeu_ps(j, _mm256_blendv_ps(_mm256_loadu_ps(j), i0, m0));                                    \
        _mm256_storeu_ps(j + 8, _mm256_blendv_ps(_mm256_loadu_ps(j + 8), i1, m1));                            \
      }                                                                                                       \
    }                                                                                                         \
  }
TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)

__attribute__((target("avx2,fma"))) static void rows_tile(int R, const float *x, int64_t xs, const float *wp,
                                                          const float *bp, int64_t D, int64_t p0, int64_t p1,
                                                          float *bv, int32_t *bi) {
  switch (R) {
    case 6: tile6(x, xs, wp, bp, D, p0, p1, bv, bi); break;
    case 5: tile5(x, xs, wp, bp, D, p0, p1, bv, bi); break;
    case 4: tile4(x, xs, wp, bp, D, p0, p1, bv, bi); break;
    case 3: tile3(x, xs, wp, bp, D, p0, p1, bv, bi); break;
    case 2: tile2(x, xs, wp, bp, D, p0, p1, bv, bi); break;
    default: tile1(x, xs, wp, bp, D, p0, p1, bv, bi); break;
  }
}

/* x (n, G, D) and w (G, C, D) contiguous; bias (G, C) or NULL. The score of code c is x.w_c, or with a bias
   2 x.w_c - bias_c (euclidean). Writes, for every row and group, the first best code (ids, int64) and its score.
   A row whose sum of |x| is above what keeps every partial sum finite (or is not finite) gets id -2, best NaN.
   Returns 0, or 1 if the codes are not finite, 2 if out of memory. */
__attribute__((target("avx2,fma"))) int cb_fused_argmax(const float *x, int64_t n, int64_t G, int64_t D,
                                                        const float *w, int64_t C, const float *bias,
                                                        int64_t *ids, float *best, int threads) {
  const int64_t P = (C + NR - 1) / NR;
  const float scale = bias ? 2.0f : 1.0f;
  /* aligned_alloc wants a multiple of the alignment */
  float *wp = (float *)aligned_alloc(64, ((size_t)(G * P * D * NR) * sizeof(float) + 127) / 64 * 64);
  float *bp = (float *)aligned_alloc(64, ((size_t)(G * P * NR) * sizeof(float) + 127) / 64 * 64);
  float *limit = (float *)malloc((size_t)G * sizeof(float));
  if (!wp || !bp || !limit) {
    free(wp); free(bp); free(limit);
    return 2;
  }
  int finite = 1;
  for (int64_t g = 0; g < G; ++g) { /* pack (P, D, 16); padding codes score -inf */
    float maxw = 0.f, maxb = 0.f;
    for (int64_t c = 0; c < P * NR; ++c) {
      float *dst = wp + (g * P + c / NR) * D * NR + c % NR;
      const float *src = w + (g * C + c) * D;
      for (int64_t d = 0; d < D; ++d) {
        float v = c < C ? scale * src[d] : 0.f;
        dst[d * NR] = v;
        float a = fabsf(v);
        if (!(a <= FLT_MAX)) finite = 0;
        maxw = a > maxw ? a : maxw;
      }
      float b = c < C ? (bias ? -bias[g * C + c] : 0.f) : -INFINITY;
      if (c < C && !(fabsf(b) <= FLT_MAX)) finite = 0;
      if (c < C) maxb = fabsf(b) > maxb ? fabsf(b) : maxb;
      bp[g * P * NR + c] = b;
    }
    /* |partial sum| <= sum|x| * maxw: below FLT_MAX / 4 no score, partial or biased, overflows */
    float lim = (FLT_MAX / 4 - maxb) / (maxw > 0.f ? maxw : 1.f);
    limit[g] = lim < FLT_MAX / 4 ? lim : FLT_MAX / 4;
  }
  if (!finite) {
    free(wp); free(bp); free(limit);
    return 1;
  }
  const int64_t nb = (n + RB - 1) / RB, xs = G * D;
  int64_t cbp = 512 / D; /* panels per block of codes: about 32 KB of them */
  if (cbp < 1) cbp = 1;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < G * nb; ++t) {
    const int64_t g = t / nb, r0 = (t % nb) * RB, r1 = r0 + RB < n ? r0 + RB : n;
    float bv[RB * NR] __attribute__((aligned(32)));
    int32_t bi[RB * NR] __attribute__((aligned(32)));
    for (int64_t i = 0; i < (r1 - r0) * NR; ++i) {
      bv[i] = -INFINITY;
      bi[i] = 0;
    }
    const float *wg = wp + g * P * D * NR, *bg = bp + g * P * NR;
    for (int64_t p0 = 0; p0 < P; p0 += cbp) {
      const int64_t p1 = p0 + cbp < P ? p0 + cbp : P;
      for (int64_t r = r0; r < r1; r += MR) {
        const int R = r1 - r < MR ? (int)(r1 - r) : MR;
        rows_tile(R, x + (r * G + g) * D, xs, wg, bg, D, p0, p1, bv + (r - r0) * NR, bi + (r - r0) * NR);
      }
    }
    for (int64_t r = r0; r < r1; ++r) {
      const float *xr = x + (r * G + g) * D;
      float sum = 0.f;
      for (int64_t d = 0; d < D; ++d) sum += fabsf(xr[d]);
      if (!(sum <= limit[g])) {
        ids[r * G + g] = -2;
        best[r * G + g] = NAN;
        continue;
      }
      const float *v = bv + (r - r0) * NR;
      const int32_t *j = bi + (r - r0) * NR;
      float bb = v[0];
      int32_t bj = j[0];
      for (int l = 1; l < NR; ++l)
        if (v[l] > bb || (v[l] == bb && j[l] < bj)) {
          bb = v[l];
          bj = j[l];
        }
      ids[r * G + g] = bj;
      best[r * G + g] = bb;
    }
  }
  free(wp); free(bp); free(limit);
  return 0;
}
"""

FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp")


def _compiler() -> Optional[str]:
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
    """The library from the cache, built there first if missing (or rebuilt if it does not load); in a folder of
    the temporary directory where the cache can't be written."""
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


@functools.lru_cache(maxsize=None)
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
    """Whether the fused search takes these tensors (x (n, groups, dim), w (groups, n_codes, dim)): CPU float32,
    a shape where it is the faster one, outside CPU autocast (where the matmul would run in bf16:
    `Codebook._search_fp32` turns autocast off first), and the library built. Under torch.compile the search runs
    as the opaque operator `nearest_code`, so compiled training gets the kernel too."""
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


def argmax(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
    """The first best code id `(n, groups)` (int64) and its score `(n, groups)` of every row of `x` (n, groups, dim)
    against the codes `w` (groups, n_codes, dim): score x.w, or 2x.w - bias (bias (groups, n_codes)) for euclidean.

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
    bias: Optional[Float[Tensor, "groups n_codes"]],
    k: int = 1,
    block_scores: int = CPU_BLOCK_SCORES,
    block_rows: Optional[int] = None,
) -> tuple[Int[Tensor, "groups n k"], Float[Tensor, "groups n"]]:
    """The search the kernel stands in for, on any device: per block of rows, one batched matmul of x (n, groups,
    dim) against every group's codes w (groups, n_codes, dim) (no loop over groups), then the top k. Returns ids
    `(groups, n, k)`, best first, and the best scores `(groups, n)`; score x.w, or 2x.w - bias for euclidean.

    Blocks of `block_rows` rows, by default `search_blocks.block_rows_for`'s: on a CPU about `block_scores` scores,
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


def _block(by_group: Tensor, w_t: Tensor, bias: Optional[Tensor]) -> Tensor:
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


def _matmul_argmax(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """`matmul_search` with k = 1 as the kernel answers: ids and best scores `(n, groups)`."""
    codes, best = matmul_search(x, w, bias)
    return codes[..., 0].transpose(0, 1).contiguous(), best.transpose(0, 1).contiguous()


@torch.library.custom_op("cbinterp::nearest_code", mutates_args=())
def nearest_code(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The first best code id `(n, groups)` and its score `(n, groups)` of every row, complete: the kernel, and the
    matmul search for the rows it leaves (non-finite input, possible overflow) or for all of them where it refuses
    the call (codes not finite). An operator of its own (`torch.ops.cbinterp.nearest_code`), so that torch.compile
    calls it as one opaque step instead of tracing ctypes; only for tensors that `applies` takes."""
    found = argmax(x, w, bias)
    if found is None:
        return _matmul_argmax(x, w, bias)
    ids, best = found
    left = (ids == UNSEARCHED).any(-1).nonzero()[:, 0]
    if left.numel():
        ids[left], best[left] = _matmul_argmax(x[left], w, bias)
    return ids, best


@nearest_code.register_fake
def _(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    n, groups = x.shape[0], x.shape[1]
    return x.new_empty((n, groups), dtype=torch.int64), x.new_empty((n, groups))
