/* The bookkeeping of a slot-bank write on CPU (camelot/memory/bank.py, `_write_segment`).
 *
 * The torch version works on [T, T] token-pair matrices and [S] slot vectors in ~80 small
 * tensor ops per layer; on CPU their data traffic, not the arithmetic, was a third of a camelot
 * segment's overhead at 2048 slots. Here each (batch row, KV head) is one loop over its T tokens
 * and one pass over its S slot counts and ages. The nearest-slot search stays in torch (a
 * matmul and a top-1); this file takes its answer.
 *
 * Semantics are those of the torch version, which stays the reference (tested against each
 * other): tokens at or above the threshold merge into their nearest slot by weighted average,
 * several at once (c K + sum k) / (c + n); every age grows by T, a merged slot's age is that of
 * its last merging token; novel tokens take free slots first (lowest index), then the oldest
 * slots not merged into (lower index first among equal ages); with more novel tokens than such
 * places the earliest are dropped. Arithmetic in float32 as torch does, sums in token order.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FREE_PRIORITY ((int64_t)1 << 40)

/* a candidate slot for a novel token: larger priority first, then lower index */
typedef struct { int64_t priority, slot; } cand;

static inline int before(cand a, cand b) {
    return a.priority > b.priority || (a.priority == b.priority && a.slot < b.slot);
}

/* keep the `need` best candidates in a heap whose root is the worst kept */
static void heap_push(cand *h, int64_t *n, int64_t need, cand c) {
    if (*n < need) {
        int64_t i = (*n)++;
        h[i] = c;
        while (i > 0) {
            int64_t p = (i - 1) / 2;
            if (!before(h[p], h[i])) break;
            cand t = h[p]; h[p] = h[i]; h[i] = t;
            i = p;
        }
        return;
    }
    if (!before(c, h[0])) return;
    h[0] = c;
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < *n && before(h[w], h[l])) w = l;
        if (r < *n && before(h[w], h[r])) w = r;
        if (w == i) break;
        cand t = h[w]; h[w] = h[i]; h[i] = t;
        i = w;
    }
}

static int by_order(const void *a, const void *b) {
    cand x = *(const cand *)a, y = *(const cand *)b;
    return before(x, y) ? -1 : before(y, x) ? 1 : 0;
}

/* rows: B*H. keys [rows, R, D], values [rows, R, DV], counts/ages [rows, R] with R >= S+1: the
 * write manages slots [0, S) and leaves the others untouched (the scratch slot, and the span
 * reserve of camelot/memory/spans.py, which the caller writes); k [rows, T, D], v [rows, T, DV]; best [rows, T] nearest
 * slot, sim [rows, T] its cosine (-inf: none), finite [rows, T]. telemetry[5] += merged, new,
 * evicted, dropped, skipped. Returns nonzero on a failed allocation (nothing written then). */
int camelot_consolidate_f32(int64_t rows, int64_t T, int64_t S, int64_t R, int64_t D, int64_t DV, float threshold,
                            float *keys, float *values, int64_t *counts, int64_t *ages,
                            const float *k, const float *v, const int64_t *best, const float *sim,
                            const uint8_t *finite, int64_t *telemetry) {
    int64_t *lead = malloc(sizeof(int64_t) * T), *n_add = malloc(sizeof(int64_t) * T);
    int64_t *last = malloc(sizeof(int64_t) * T);
    float *sum_k = malloc(sizeof(float) * T * D), *sum_v = malloc(sizeof(float) * T * DV);
    uint8_t *touched = malloc(S), *merge = malloc(T), *was_free = malloc(S);
    cand *heap = malloc(sizeof(cand) * (T + 1));
    int ok = lead && n_add && last && sum_k && sum_v && touched && merge && was_free && heap;
    for (int64_t r = 0; ok && r < rows; r++) {
        float *K = keys + r * R * D, *V = values + r * R * DV;
        int64_t *C = counts + r * R, *A = ages + r * R;
        const float *kr = k + r * T * D, *vr = v + r * T * DV, *sr = sim + r * T;
        const int64_t *br = best + r * T;
        const uint8_t *fr = finite + r * T;
        int64_t n_merge = 0, n_skip = 0, n_novel = 0;
        memset(touched, 0, S);
        /* merges: each group of tokens into one slot is summed at its first token (the lead) */
        for (int64_t t = 0; t < T; t++) {
            merge[t] = fr[t] && sr[t] >= threshold;
            n_skip += !fr[t];
            n_novel += fr[t] && !merge[t];
            if (!merge[t]) continue;
            n_merge++;
            int64_t l = t;
            for (int64_t u = 0; u < t; u++)
                if (merge[u] && br[u] == br[t]) { l = lead[u]; break; }
            lead[t] = l;
            if (l == t) {
                n_add[t] = 0;
                memset(sum_k + t * D, 0, sizeof(float) * D);
                memset(sum_v + t * DV, 0, sizeof(float) * DV);
            }
            n_add[l]++;
            last[l] = t;
            for (int64_t d = 0; d < D; d++) sum_k[l * D + d] += kr[t * D + d];
            for (int64_t d = 0; d < DV; d++) sum_v[l * DV + d] += vr[t * DV + d];
        }
        for (int64_t j = 0; j < S; j++) A[j] += T;
        for (int64_t t = 0; t < T; t++) {
            if (!merge[t] || lead[t] != t) continue;
            int64_t j = br[t], c = C[j], c_new = c + n_add[t];
            float cf = (float)c, den = (float)(c_new < 1 ? 1 : c_new);
            for (int64_t d = 0; d < D; d++) K[j * D + d] = (cf * K[j * D + d] + sum_k[t * D + d]) / den;
            for (int64_t d = 0; d < DV; d++) V[j * DV + d] = (cf * V[j * DV + d] + sum_v[t * DV + d]) / den;
            C[j] = c_new;
            A[j] = (T - 1) - last[t];
            touched[j] = 1;
        }
        /* novel tokens: the places they can take, best first */
        int64_t available = 0;
        for (int64_t j = 0; j < S; j++) available += !touched[j];
        int64_t n_drop = n_novel > available ? n_novel - available : 0, n_place = n_novel - n_drop, n_heap = 0;
        for (int64_t j = 0; j < S && n_place; j++) {
            was_free[j] = C[j] == 0;
            if (touched[j]) continue;
            int64_t p = C[j] == 0 ? FREE_PRIORITY : (A[j] < FREE_PRIORITY - 1 ? A[j] : FREE_PRIORITY - 1);
            heap_push(heap, &n_heap, n_place, (cand){p, j});
        }
        qsort(heap, n_heap, sizeof(cand), by_order);
        int64_t seen = 0, placed = 0, n_new = 0;
        for (int64_t t = 0; t < T; t++) {
            if (!fr[t] || merge[t]) continue;
            if (seen++ < n_drop) continue; /* overtaken by later novel tokens of this segment */
            int64_t j = heap[placed++].slot;
            n_new += was_free[j];
            memcpy(K + j * D, kr + t * D, sizeof(float) * D);
            memcpy(V + j * DV, vr + t * DV, sizeof(float) * DV);
            C[j] = 1;
            A[j] = (T - 1) - t;
        }
        telemetry[0] += n_merge;
        telemetry[1] += n_new;
        telemetry[2] += n_place - n_new;
        telemetry[3] += n_drop;
        telemetry[4] += n_skip;
    }
    free(lead); free(n_add); free(last); free(sum_k); free(sum_v); free(touched); free(merge); free(was_free);
    free(heap);
    return ok ? 0 : 1;
}
