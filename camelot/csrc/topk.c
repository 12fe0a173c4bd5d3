/* Exact top-k of each row of a score matrix, for the CPU memory read (camelot/topk.py).
 *
 * torch.topk on CPU costs ~1.3 ns per element whatever k (it copies every row into a vector of
 * (value, index) pairs and partially sorts it); at 2048 slots that was a third of camelot's
 * per-segment overhead. Here one vectorised pass takes the maximum of each of LANES strided
 * lanes; the k-th largest lane maximum `thr` is a lower bound of the k-th largest score (the k
 * lanes at or above it hold k scores >= thr), so a second vectorised pass only stops at the
 * few chunks holding a score >= thr and inserts those into a sorted list of k, visiting only
 * the scores of the chunk at or above thr (a bit mask of one vector compare).
 *
 * Output: values descending (float32) and their indices; ties keep the lower index. Returns
 * nonzero for arguments it does not handle (the caller then uses torch.topk).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 32

/* score j of a row: float32, or bfloat16 (the upper half of a float32) */
static inline __attribute__((always_inline)) float load(const void *x, int64_t j, const int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)((const uint16_t *)x)[j] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)x)[j];
}

/* bit c set where score j + c >= thr (c < LANES): a chunk of the second pass in one or two
 * vector compares where the CPU has AVX-512, else a loop the compiler vectorises as it can */
#if defined(__AVX512F__) && LANES == 32
#include <immintrin.h>
static inline __attribute__((always_inline)) uint32_t chunk_mask(const void *x, int64_t j, float thr, const int bf16) {
    __m512 a, b, t = _mm512_set1_ps(thr);
    if (bf16) {
        const uint16_t *p = (const uint16_t *)x + j;
        a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
        b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 16))), 16));
    } else {
        a = _mm512_loadu_ps((const float *)x + j);
        b = _mm512_loadu_ps((const float *)x + j + 16);
    }
    /* ordered compare: a NaN score is never a candidate, as with >= below */
    return (uint32_t)_mm512_cmp_ps_mask(a, t, _CMP_GE_OQ) | (uint32_t)_mm512_cmp_ps_mask(b, t, _CMP_GE_OQ) << 16;
}
#else
static inline __attribute__((always_inline)) uint32_t chunk_mask(const void *x, int64_t j, float thr, const int bf16) {
    uint32_t m = 0;
    for (int c = 0; c < LANES; c++) m |= (uint32_t)(load(x, j + c, bf16) >= thr) << c;
    return m;
}
#endif

/* v[0..k) sorted descending, ix < 0 marks an empty place; x goes in after equal values */
static inline void insert(float *v, int64_t *ix, int k, float x, int64_t i) {
    int p = k - 1;
    while (p > 0 && (ix[p - 1] < 0 || v[p - 1] < x)) {
        v[p] = v[p - 1];
        ix[p] = ix[p - 1];
        p--;
    }
    v[p] = x;
    ix[p] = i;
}

static inline __attribute__((always_inline)) void
topk_row(const void *x, int64_t n, int k, float *v, int64_t *ix, const int bf16) {
    /* pass 1: maximum of each strided lane (lane c holds the scores j with j % LANES == c) */
    float acc[LANES];
    for (int c = 0; c < LANES; c++) acc[c] = -INFINITY;
    int64_t full = n - n % LANES;
    for (int64_t j = 0; j < full; j += LANES)
        for (int c = 0; c < LANES; c++) {
            float y = load(x, j + c, bf16);
            acc[c] = y > acc[c] ? y : acc[c];
        }
    for (int64_t j = full; j < n; j++) {
        float y = load(x, j, bf16);
        int c = (int)(j - full);
        acc[c] = y > acc[c] ? y : acc[c];
    }
    /* thr: the k-th largest lane maximum */
    float tv[LANES];
    int64_t ti[LANES];
    for (int j = 0; j < k; j++) { tv[j] = -INFINITY; ti[j] = -1; }
    for (int c = 0; c < LANES; c++)
        if (ti[k - 1] < 0 || acc[c] > tv[k - 1]) insert(tv, ti, k, acc[c], c);
    float thr = tv[k - 1];
    /* pass 2: only chunks holding a score >= thr are looked at element by element */
    for (int j = 0; j < k; j++) { v[j] = -INFINITY; ix[j] = -1; }
    for (int64_t j = 0; j < full; j += LANES) {
        /* in index order within the chunk, so ties still keep the lower index */
        for (uint32_t m = chunk_mask(x, j, thr, bf16); m; m &= m - 1) {
            int c = __builtin_ctz(m);
            float y = load(x, j + c, bf16);
            if (ix[k - 1] < 0 || y > v[k - 1]) insert(v, ix, k, y, j + c);
        }
    }
    for (int64_t j = full; j < n; j++) {
        float y = load(x, j, bf16);
        if (y >= thr && (ix[k - 1] < 0 || y > v[k - 1])) insert(v, ix, k, y, j);
    }
    if (ix[k - 1] < 0) /* NaN scores only: answer k distinct slots */
        for (int j = 0; j < k; j++) { v[j] = load(x, j, bf16); ix[j] = j; }
}

int camelot_topk_f32(const float *src, int64_t rows, int64_t n, int k, float *out_v, int64_t *out_i) {
    if (k < 1 || k > LANES || n < k) return 1;
    for (int64_t r = 0; r < rows; r++) topk_row(src + r * n, n, k, out_v + r * k, out_i + r * k, 0);
    return 0;
}

int camelot_topk_bf16(const uint16_t *src, int64_t rows, int64_t n, int k, float *out_v, int64_t *out_i) {
    if (k < 1 || k > LANES || n < k) return 1;
    for (int64_t r = 0; r < rows; r++) topk_row(src + r * n, n, k, out_v + r * k, out_i + r * k, 1);
    return 0;
}

int camelot_topk_max_k(void) { return LANES; }
