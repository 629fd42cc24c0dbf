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
