/* The sparse backward of the TopK-family SAE kernels in one pass over the selected (row, latent) pairs per side,
 * for saeforge.kernels.native (built on first use together with native_topk.c; the PyTorch path in
 * sparse_topk.py is the fallback and the reference).
 *
 * S is the [n, m] sparse latent matrix, listed as `nnz` entries (rows[e], cols[e], values[e]) in canonical order
 * (rows ascending, columns ascending within a row). The passes run over the entries grouped by column (latent):
 * `csc_order` lists them column by column, stable (rows ascending within a column), with a counting sort.
 *
 * - decoder side (`decode_backward_f32`): for latent j with decoder row w = W_dec[j] and the entries e of column
 *   j: dv[e] = g[rows[e]] . w (the sampled dot products), and dW_dec[j] = sum_e values[e] g[rows[e]]. One read of
 *   each g row per entry serves both.
 * - encoder side (`encode_backward_*`): dW_enc[:, j] = sum_e gp[e] x[rows[e]] and db[j] = sum_e gp[e], written
 *   straight into the parameter's [d, m] layout: 16 latents are accumulated as a [16, d] tile and stored
 *   transposed, each store a 64-byte line of a row of dW_enc.
 *
 * Summation order (what the tests' error bounds are derived from): a dot product of length d keeps 16 partial
 * sums (lane l adds the products i = l, l + 16, ...; the tail lanes i >= 16 * floor(d / 16) go to lanes 0, 1, ...
 * in order) and adds them pairwise at the end; a column's sums add its entries in ascending row order, starting
 * from 0. With AVX-512 the products are fused into the additions (one rounding fewer each, inside the same bound).
 *
 * Also here: the decoder-gradient projection (`project_rows_f32`) and a bfloat16 matrix-vector product
 * (`matvec_bf16`), each one pass where the PyTorch versions make [m, d] temporaries or a float32 copy.
 *
 * Columns are split over `threads` OpenMP threads (dynamic chunks: the entries per latent vary a lot); no two
 * threads write the same output.
 */
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16 /* latents per encoder tile: 16 float32 = one 64-byte line of a dW_enc row */
#define AHEAD 2 /* entries: the row of entry p + AHEAD is fetched into the cache while entry p is processed (rows
                 * are visited in no particular order, so the hardware prefetcher cannot guess them) */

static inline void prefetch_row(const void *base, int64_t row, int64_t bytes) {
    const char *p = (const char *)base + row * bytes;
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

/* cols [nnz] in [0, m) -> col_start [m + 1] and perm [nnz]: the entry ids of column j are
 * perm[col_start[j] .. col_start[j + 1]), in their original order. Returns 1 on an out-of-range column. */
int64_t csc_order(const int64_t *cols, int64_t nnz, int64_t m, int64_t *col_start, int64_t *perm) {
    memset(col_start, 0, (m + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < nnz; e++) {
        if (cols[e] < 0 || cols[e] >= m) return 1;
        col_start[cols[e] + 1]++;
    }
    for (int64_t j = 0; j < m; j++) col_start[j + 1] += col_start[j];
    int64_t *next = malloc(m * sizeof(int64_t));
    if (!next) return 1;
    memcpy(next, col_start, m * sizeof(int64_t));
    for (int64_t e = 0; e < nnz; e++) perm[next[cols[e]]++] = e;
    free(next);
    return 0;
}

static float dot(const float *a, const float *b, int64_t d) {
#if defined(__AVX512F__)
    if (d % 16 == 0) { /* the same lanes with a fused multiply-add (as the fused loop below) */
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        float lanes[16];
        _mm512_storeu_ps(lanes, acc);
        for (int h = 8; h >= 1; h /= 2)
            for (int l = 0; l < h; l++) lanes[l] += lanes[l + h];
        return lanes[0];
    }
#endif
    float s[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16)
        for (int l = 0; l < 16; l++) s[l] += a[i + l] * b[i + l];
    for (int l = 0; i < d; i++, l++) s[l] += a[i] * b[i];
    for (int h = 8; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) s[l] += s[l + h];
    return s[0];
}

/* g [n, d], W_dec [m, d], values [nnz]; dv [nnz] (or NULL), dW [m, d] (or NULL), every latent's row written */
int64_t decode_backward_f32(const float *g, const float *W_dec, const float *values, const int64_t *rows,
                            const int64_t *perm, const int64_t *col_start, int64_t m, int64_t d, float *dv,
                            float *dW, int64_t threads) {
#pragma omp parallel for num_threads((int)threads) schedule(dynamic, 32)
    for (int64_t j = 0; j < m; j++) {
        const float *w = W_dec + j * d;
        float *acc = dW ? dW + j * d : NULL;
        if (acc) memset(acc, 0, d * sizeof(float));
        for (int64_t p = col_start[j]; p < col_start[j + 1]; p++) {
            int64_t e = perm[p];
            if (AHEAD && p + AHEAD < col_start[m]) prefetch_row(g, rows[perm[p + AHEAD]], d * 4);
            const float *gr = g + rows[e] * d;
#if defined(__AVX512F__)
            if (dv && acc && d % 16 == 0) { /* both from one read of the g row (the same per-lane order as dot) */
                __m512 s = _mm512_setzero_ps(), vv = _mm512_set1_ps(values[e]);
                for (int64_t i = 0; i < d; i += 16) {
                    __m512 gv = _mm512_loadu_ps(gr + i);
                    s = _mm512_fmadd_ps(gv, _mm512_loadu_ps(w + i), s);
                    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(vv, gv, _mm512_loadu_ps(acc + i)));
                }
                float lanes[16];
                _mm512_storeu_ps(lanes, s);
                for (int h = 8; h >= 1; h /= 2)
                    for (int l = 0; l < h; l++) lanes[l] += lanes[l + h];
                dv[e] = lanes[0];
                continue;
            }
#endif
            if (dv) dv[e] = dot(gr, w, d);
            if (acc) {
                float v = values[e];
                for (int64_t i = 0; i < d; i++) acc[i] += v * gr[i];
            }
        }
    }
    return 0;
}

/* x [n, d] (float32, or bfloat16 bits widened exactly), gp [nnz]; dW [d, m] (every entry written), db [m] (or
 * NULL). acc: TILE * d floats per thread. */
static int64_t encode_tiles(const void *x, int bf16, const float *gp, const int64_t *rows, const int64_t *perm,
                            const int64_t *col_start, int64_t m, int64_t d, float *dW, float *db, int threads) {
    int64_t tiles = (m + TILE - 1) / TILE, failed = 0;
#pragma omp parallel num_threads(threads) reduction(+ : failed)
    {
        float *acc = malloc(TILE * d * sizeof(float));
        float *wide = bf16 ? malloc(d * sizeof(float)) : NULL;
        int ok = acc && (!bf16 || wide);
        failed += !ok;
#pragma omp for schedule(dynamic, 4)
        for (int64_t t = 0; t < tiles; t++) {
            if (!ok) continue; /* every thread must meet the loop; the caller sees `failed` */
            int64_t j0 = t * TILE, w = m - j0 < TILE ? m - j0 : TILE;
            memset(acc, 0, TILE * d * sizeof(float));
            for (int64_t c = 0; c < w; c++) {
                float *a = acc + c * d, bsum = 0.0f;
                for (int64_t p = col_start[j0 + c]; p < col_start[j0 + c + 1]; p++) {
                    int64_t e = perm[p];
                    if (AHEAD && p + AHEAD < col_start[m]) prefetch_row(x, rows[perm[p + AHEAD]], d * (bf16 ? 2 : 4));
#if defined(__AVX512F__)
                    if (d % 16 == 0) { /* the same sums, bfloat16 widened in registers */
                        __m512 vv = _mm512_set1_ps(gp[e]);
                        bsum += gp[e];
                        for (int64_t i = 0; i < d; i += 16) {
                            __m512 xv;
                            if (bf16) {
                                __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + rows[e] * d + i));
                                xv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
                            } else {
                                xv = _mm512_loadu_ps((const float *)x + rows[e] * d + i);
                            }
                            _mm512_storeu_ps(a + i, _mm512_fmadd_ps(vv, xv, _mm512_loadu_ps(a + i)));
                        }
                        continue;
                    }
#endif
                    const float *xr;
                    if (bf16) {
                        const uint16_t *src = (const uint16_t *)x + rows[e] * d;
                        uint32_t *bits = (uint32_t *)wide;
                        for (int64_t i = 0; i < d; i++) bits[i] = (uint32_t)src[i] << 16;
                        xr = wide;
                    } else {
                        xr = (const float *)x + rows[e] * d;
                    }
                    float v = gp[e];
                    bsum += v;
                    for (int64_t i = 0; i < d; i++) a[i] += v * xr[i];
                }
                if (db) db[j0 + c] = bsum;
            }
            for (int64_t i = 0; i < d; i++) {
                float *out = dW + i * m + j0;
                for (int64_t c = 0; c < w; c++) out[c] = acc[c * d + i];
            }
        }
        free(acc);
        free(wide);
    }
    return failed;
}

int64_t encode_backward_f32(const float *x, const float *gp, const int64_t *rows, const int64_t *perm,
                            const int64_t *col_start, int64_t m, int64_t d, float *dW, float *db, int64_t threads) {
    return encode_tiles(x, 0, gp, rows, perm, col_start, m, d, dW, db, (int)threads);
}

int64_t encode_backward_bf16(const uint16_t *x, const float *gp, const int64_t *rows, const int64_t *perm,
                             const int64_t *col_start, int64_t m, int64_t d, float *dW, float *db,
                             int64_t threads) {
    return encode_tiles(x, 1, gp, rows, perm, col_start, m, d, dW, db, (int)threads);
}

/* The gradient g [m, d] of unit-norm decoder rows W [m, d], in place: each row's component along its decoder row
 * removed, g_r -= ((g_r . W_r) / max(|W_r|^2, 1e-24)) W_r, in one pass (both dot products, then the update, while
 * the two rows are in L1). The same projection as SAE.before_optimizer_step's, without its [m, d] temporaries. Each
 * row is computed whole by one thread in a fixed order (dot()'s lanes), so the result does not depend on the number
 * of threads. */
int64_t project_rows_f32(float *g, const float *W, int64_t m, int64_t d, int64_t threads) {
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t r = 0; r < m; r++) {
        float *gr = g + r * d;
        const float *wr = W + r * d;
        float n2 = dot(wr, wr, d), c = dot(gr, wr, d) / (n2 > 1e-24f ? n2 : 1e-24f);
        for (int64_t i = 0; i < d; i++) gr[i] -= c * wr[i];
    }
    return 0;
}

/* out [d] = W v for a bfloat16 W [d, m] (widened exactly) and a float32 v [m]: the tied pre-encoder bias's gradient
 * with a bfloat16 encoder GEMM, without a float32 copy of W. Each row's sum as dot() adds (16 lanes, then
 * pairwise). Returns nonzero when out of memory (then out is incomplete). */
int64_t matvec_bf16(const uint16_t *W, const float *v, int64_t d, int64_t m, float *out, int64_t threads) {
    int64_t failed = 0;
#pragma omp parallel num_threads((int)threads) reduction(+ : failed)
    {
        float *wide = malloc(m * sizeof(float));
        failed += !wide;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < d; i++) {
            if (!wide) continue; /* every thread must meet the loop */
            uint32_t *bits = (uint32_t *)wide;
            for (int64_t j = 0; j < m; j++) bits[j] = (uint32_t)W[i * m + j] << 16;
            out[i] = dot(wide, v, m);
        }
        free(wide);
    }
    return failed;
}
