/* Per-row top-k of a dense [n, m] float32 or bfloat16 matrix, for saeforge.kernels.native (built on first use with
 * the system C compiler, loaded with ctypes; the plain-PyTorch selection is the fallback and the reference).
 *
 * Why: torch.topk over a 4608-wide row copies every (value, index) pair before its partial sort, and the two-level
 * PyTorch selection still needs several ops with per-row overheads (~17 ms at 4096 x 4608 on 2 cores). Here a row
 * (18 KB in float32: it stays in L1) is read twice:
 *
 * 1. the maxima of G interleaved groups (group g = columns g, g + G, g + 2G, ...): an elementwise max over the
 *    row viewed as [m / G, G], which vectorises (x86 maxps is exactly `a > b ? a : b`);
 * 2. t = a lower bound of the k-th largest group maximum with at least k group maxima >= t. The k groups with
 *    the largest maxima hold k elements >= t, so the row's k-th largest value is >= t: every top-k element is
 *    >= t. One vectorised compare pass lists the candidates >= t in column order (typically a little over k);
 * 3. the k-th largest candidate value v; the result is every candidate > v plus the earliest ones == v, which
 *    comes out sorted by column (the canonical CSR order).
 *
 * With AVX-512 (and BMI2) steps 2 and 3 have no branch on the data: the selections are radix selections on the
 * floats' order-preserving integer keys (vectorised counting passes), the lists are built with in-register
 * compress, and the ties with pdep. A quickselect in their place spent ~2/3 of the kernel's time on mispredicted
 * branches (measured: 0.71 against 0.27 ns per element on one core, 4096 x 4608). Without AVX-512 the scalar
 * versions (quickselect) run.
 *
 * Exact: a top-k set with the same values as torch.topk; among equal values the earliest columns are kept. A row
 * with NaN, or with k > G, is not handled here (the function returns how many such rows it met; the caller then
 * uses its PyTorch path).
 */
#include <math.h>
#if defined(__AVX512F__) && defined(__BMI2__)
#define VECTOR_PATH 1 /* AVX-512 with BMI2 (pdep): the branch-free row selection */
#include <immintrin.h>
#else
#define VECTOR_PATH 0
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP_LEN 16 /* elements per group: G = ceil(m / GROUP_LEN) */
#define T_LOWEST_BIT 16 /* the threshold t needs only be a lower bound (see kth_largest_radix) */
#define PREFETCH_AHEAD 4 /* rows */

#if !VECTOR_PATH
/* the k-th largest (1-based) of a[0..n), reordering a (Hoare quickselect, median of three) */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, want = k - 1; /* position of the answer in descending order */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        float x = a[lo], y = a[mid], z = a[hi]; /* median of three as the pivot */
        float pivot = x > y ? (y > z ? y : (x > z ? z : x)) : (x > z ? x : (y > z ? z : y));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j];
                a[j] = t;
                i++;
                j--;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return a[want];
    }
    return a[want];
}
#endif

#if VECTOR_PATH
/* The k-th largest (1-based) of a[0..n) without branches on the data: a float's bits mapped to an unsigned key in
 * the same order (ties between -0 and +0 aside, which no comparison below tells apart), then the key built bit by
 * bit from the top, keeping a bit when at least k keys are >= the candidate — 32 vectorised counting passes. The
 * quickselect it replaces spent most of its time on mispredicted branches. */
static inline __m512i order_keys(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i flip = _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_xor_si512(b, flip);
}

/* lowest_bit 0: the exact k-th largest. lowest_bit b > 0: the key's bits below b are left 0, which gives a value
 * <= the k-th largest with at least k elements >= it (a lower bound, as tight as the top 32 - b bits make it).
 * The bits the smallest and largest keys share are set at once (typically the sign and most of the exponent). */
static float kth_largest_radix(const float *a, int64_t n, int64_t k, int lowest_bit) {
    __m512i kmin = _mm512_set1_epi32(-1), kmax = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 live = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        __m512i key = order_keys(_mm512_maskz_loadu_ps(live, a + i));
        kmin = _mm512_mask_min_epu32(kmin, live, kmin, key);
        kmax = _mm512_mask_max_epu32(kmax, live, kmax, key);
    }
    uint32_t lo = (uint32_t)_mm512_reduce_min_epu32(kmin), hi = (uint32_t)_mm512_reduce_max_epu32(kmax);
    int top = lo == hi ? -1 : 31 - __builtin_clz(lo ^ hi); /* the highest bit in which the keys differ */
    uint32_t ans = top < 0 ? lo : lo & ~((2u << top) - 1u); /* the shared prefix; every key is >= it */
    if (top == 31) ans = 0;
    for (int bit = top; bit >= lowest_bit; bit--) {
        uint32_t cand = ans | (1u << bit);
        __m512i cv = _mm512_set1_epi32((int)cand);
        int64_t cnt = 0;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 live = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1);
            __m512i key = order_keys(_mm512_maskz_loadu_ps(live, a + i));
            cnt += __builtin_popcount((unsigned)_mm512_mask_cmpge_epu32_mask(live, key, cv));
        }
        ans = cnt >= k ? cand : ans;
    }
    uint32_t bits = (ans & 0x80000000u) ? (ans ^ 0x80000000u) : ~ans;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
#endif

/* Fetch `bytes` of memory from `p` into the cache, spread over `parts` calls (part = 0 .. parts - 1): a few lines at
 * a time, interleaved with the work on the current row, keep the memory busy while the row is processed (one
 * burst of all of a row's prefetches at its start fills the miss buffers and stalls). */
static inline void prefetch_part(const char *p, int64_t bytes, int64_t part, int64_t parts) {
    if (!p) return;
    int64_t b0 = bytes * part / parts & ~(int64_t)63, b1 = bytes * (part + 1) / parts;
    for (int64_t b = b0; b < b1; b += 64) __builtin_prefetch(p + b, 0, 3);
}

/* One row of float values. work: G + m + 16 floats, cidx: m + 16 int32. Returns 0, or 1 when the row cannot be handled. */
static int row_topk(const float *row, int64_t m, int64_t k, int64_t *out_idx, float *out_val, float *work,
                    int32_t *cidx, const char *next, int64_t next_bytes) {
    int64_t G = (m + GROUP_LEN - 1) / GROUP_LEN;
    if (k > G) return 1;
    float *gmax = work, *cval = work + G;
    int64_t full = m / G; /* rows of the [m / G, G] view; the tail (m - full * G < G elements) joins groups 0.. */
    int nan = 0;
    memcpy(gmax, row, G * sizeof(float));
    prefetch_part(next, next_bytes, 0, full);
    for (int64_t r = 1; r < full; r++) {
        const float *p = row + r * G;
        prefetch_part(next, next_bytes, r, full);
        for (int64_t g = 0; g < G; g++) gmax[g] = p[g] > gmax[g] ? p[g] : gmax[g];
    }
    for (int64_t g = 0, base = full * G; base + g < m; g++) gmax[g] = row[base + g] > gmax[g] ? row[base + g] : gmax[g];
    for (int64_t g = 0; g < G; g++) nan |= gmax[g] != gmax[g];
    if (nan) return 1; /* a NaN group start survives the max; other NaNs are caught by the count below */
    /* t = the k-th largest group maximum. A cheap lower bound first: the maxima of k interleaved sets of group
     * maxima are k elements, so their minimum t1 <= t; the quickselect then runs over the few maxima >= t1. */
    float sup[64], t1;
    if (k <= 64 && G >= 2 * k) {
        memcpy(sup, gmax, k * sizeof(float));
        int64_t g = k;
        for (; g + k <= G; g += k)
            for (int64_t i = 0; i < k; i++) sup[i] = gmax[g + i] > sup[i] ? gmax[g + i] : sup[i];
        for (int64_t i = 0; g + i < G; i++) sup[i] = gmax[g + i] > sup[i] ? gmax[g + i] : sup[i];
        t1 = sup[0];
        for (int64_t i = 1; i < k; i++) t1 = sup[i] < t1 ? sup[i] : t1;
    } else {
        t1 = -INFINITY;
    }
    int64_t ng = 0;
#if VECTOR_PATH
    {
        const __m512 tv = _mm512_set1_ps(t1);
        for (int64_t g = 0; g < G; g += 16) { /* in place: the store never passes the part still to be read */
            __mmask16 live = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
            __m512 v = _mm512_maskz_loadu_ps(live, gmax + g);
            __mmask16 keep = _mm512_mask_cmp_ps_mask(live, v, tv, _CMP_GE_OQ);
            _mm512_mask_storeu_ps(gmax + ng, (__mmask16)((1u << __builtin_popcount((unsigned)keep)) - 1),
                                  _mm512_maskz_compress_ps(keep, v));
            ng += __builtin_popcount((unsigned)keep);
        }
    }
    float t = kth_largest_radix(gmax, ng, k, T_LOWEST_BIT);
#else
    for (int64_t g = 0; g < G; g++)
        if (gmax[g] >= t1) gmax[ng++] = gmax[g];
    float t = kth_largest(gmax, ng, k);
#endif
    int64_t c = 0;
    int unordered = 0; /* a NaN anywhere in the row: the caller's PyTorch path decides what it means */
    int64_t j = 0;
#if VECTOR_PATH
    /* 16 columns at a time: one compare, then the hits compressed in a register and stored whole (the buffers
     * have 16 spare slots). The register form of compress is used because its memory form is microcoded and slow
     * on some AMD cores. */
    {
        const __m512 tv = _mm512_set1_ps(t);
        __m512i col = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 nanmask = 0;
        for (; j + 16 <= m; j += 16, col = _mm512_add_epi32(col, step)) {
            __m512 v = _mm512_loadu_ps(row + j);
            __mmask16 hit = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
            nanmask |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            if (hit) {
                _mm512_storeu_ps(cval + c, _mm512_maskz_compress_ps(hit, v));
                _mm512_storeu_si512((void *)(cidx + c), _mm512_maskz_compress_epi32(hit, col));
                c += __builtin_popcount((unsigned)hit);
            }
        }
        unordered = nanmask != 0;
    }
#endif
    for (; j < m; j++) {
        unordered |= row[j] != row[j];
        if (row[j] >= t) {
            cval[c] = row[j];
            cidx[c++] = (int32_t)j;
        }
    }
    if (unordered) return 1;
    if (c < k) return 1; /* only with NaNs in the row */
    if (c == k) {
        for (int64_t i = 0; i < k; i++) out_idx[i] = cidx[i];
        memcpy(out_val, cval, k * sizeof(float));
        return 0;
    }
#if VECTOR_PATH
    {
        /* v = the k-th largest candidate; keep every candidate > v and the earliest ones == v, in column order */
        float v = kth_largest_radix(cval, c, k, 0);
        const __m512 vv = _mm512_set1_ps(v);
        int64_t above = 0;
        for (int64_t i = 0; i < c; i += 16) {
            __mmask16 live = c - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c - i)) - 1);
            above += __builtin_popcount((unsigned)_mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, cval + i), vv, _CMP_GT_OQ));
        }
        int64_t ties = k - above, o = 0;
        for (int64_t i = 0; i < c; i += 16) {
            __mmask16 live = c - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c - i)) - 1);
            __m512 x = _mm512_maskz_loadu_ps(live, cval + i);
            __mmask16 gt = _mm512_mask_cmp_ps_mask(live, x, vv, _CMP_GT_OQ);
            __mmask16 eq = _mm512_mask_cmp_ps_mask(live, x, vv, _CMP_EQ_OQ);
            unsigned want = ties >= 16 ? 0xFFFFu : (1u << ties) - 1;
            __mmask16 eq_kept = (__mmask16)_pdep_u32(want, (unsigned)eq); /* the first `ties` equal ones */
            ties -= __builtin_popcount((unsigned)eq_kept);
            __mmask16 take = gt | eq_kept;
            int n = __builtin_popcount((unsigned)take);
            __mmask16 first = (__mmask16)((1u << n) - 1);
            _mm512_mask_storeu_ps(out_val + o, first, _mm512_maskz_compress_ps(take, x));
            __m256i lo, hi;
            __m512i idx = _mm512_maskz_compress_epi32(take, _mm512_maskz_loadu_epi32(live, cidx + i));
            lo = _mm512_castsi512_si256(idx);
            hi = _mm512_extracti64x4_epi64(idx, 1);
            _mm512_mask_storeu_epi64(out_idx + o, (__mmask8)(first & 0xFF), _mm512_cvtepi32_epi64(lo));
            _mm512_mask_storeu_epi64(out_idx + o + 8, (__mmask8)(first >> 8), _mm512_cvtepi32_epi64(hi));
            o += n;
        }
    }
#else
    float *tmp = gmax; /* free again; c <= m, and G + m + 16 floats were given */
    float v;
    if (c <= G) {
        memcpy(tmp, cval, c * sizeof(float));
        v = kth_largest(tmp, c, k);
    } else {
        float *big = malloc(c * sizeof(float));
        if (!big) return 1;
        memcpy(big, cval, c * sizeof(float));
        v = kth_largest(big, c, k);
        free(big);
    }
    int64_t above = 0;
    for (int64_t i = 0; i < c; i++) above += cval[i] > v ? 1 : 0;
    int64_t ties = k - above, o = 0;
    for (int64_t i = 0; i < c && o < k; i++) {
        if (cval[i] > v || (cval[i] == v && ties-- > 0)) {
            out_idx[o] = cidx[i];
            out_val[o++] = cval[i];
        }
    }
#endif
    return 0;
}

/* rows [r0, r1) of pre [n, m] (row-major) on `threads` OpenMP threads (the process's OpenMP runtime: torch's, whose
 * libgomp is already loaded); out_idx / out_val are [n, k] (int64 / float32), row r at r * k. BF16: pre holds
 * bfloat16 bits, widened to float32 exactly. Returns the number of rows it could not handle (then out_* are
 * incomplete and the caller must not use them). */
static int64_t topk_rows(const void *pre, int bf16, int64_t m, int64_t k, int64_t r0, int64_t r1, int64_t *out_idx,
                         float *out_val, int threads) {
    int64_t G = (m + GROUP_LEN - 1) / GROUP_LEN, bad = 0;
#pragma omp parallel num_threads(threads) reduction(+ : bad)
    {
        float *work = malloc((G + m + 16) * sizeof(float));
        int32_t *cidx = malloc((m + 16) * sizeof(int32_t));
        uint32_t *wide = bf16 ? malloc(m * sizeof(uint32_t)) : NULL;
        if (!work || !cidx || (bf16 && !wide)) {
            bad += 1; /* reported as unhandled; the rows this thread skips are not counted, but bad > 0 suffices */
        } else {
#pragma omp for schedule(static)
            for (int64_t r = r0; r < r1; r++) {
                /* the row two ahead, into the cache: the selection's compute between rows otherwise leaves the
                 * loads waiting on memory (measured 4x slower per element than a row already in L2) */
                /* a row ahead is fetched while this one is processed: the selection's compute between rows
                 * otherwise leaves the loads waiting on memory (a row already in L2 runs ~3x faster) */
                int64_t row_bytes = m * (bf16 ? 2 : 4);
                const char *next = r + PREFETCH_AHEAD < r1 ? (const char *)pre + (r + PREFETCH_AHEAD) * row_bytes : NULL;
                const float *row;
                if (bf16) {
                    const uint16_t *src = (const uint16_t *)pre + r * m;
                    for (int64_t j = 0; j < m; j++) wide[j] = (uint32_t)src[j] << 16; /* bfloat16 -> float32, exact */
                    row = (const float *)wide;
                } else {
                    row = (const float *)pre + r * m;
                }
                bad += row_topk(row, m, k, out_idx + r * k, out_val + r * k, work, cidx, next, row_bytes);
            }
        }
        free(work);
        free(cidx);
        free(wide);
    }
    return bad;
}

int64_t topk_rows_f32(const float *pre, int64_t m, int64_t k, int64_t r0, int64_t r1, int64_t *out_idx,
                      float *out_val, int64_t threads) {
    return topk_rows(pre, 0, m, k, r0, r1, out_idx, out_val, (int)threads);
}

int64_t topk_rows_bf16(const uint16_t *pre, int64_t m, int64_t k, int64_t r0, int64_t r1, int64_t *out_idx,
                       float *out_val, int64_t threads) {
    return topk_rows(pre, 1, m, k, r0, r1, out_idx, out_val, (int)threads);
}

/* 1 when built with OpenMP (the kernels then split their work themselves), 0 otherwise */
int64_t native_openmp(void) {
#if defined(_OPENMP)
    return 1;
#else
    return 0;
#endif
}
