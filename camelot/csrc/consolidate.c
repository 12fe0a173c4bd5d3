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
 * several at once (c K + sum k) / (c + n); every age grows by `grow` (the segment's tokens), a
 * merged slot's age is that of its last merging token (tok_age[t], or T-1-t where it is NULL:
 * tokens that joined the write from elsewhere, the span reserve's displaced ones, keep theirs);
 * novel tokens take free slots first (lowest index), then the oldest slots not merged into (lower
 * index first among equal ages); with more novel tokens than such places the earliest are
 * dropped. The telemetry counts only tokens from `first` on (those before it were counted when
 * they arrived). Arithmetic in float32 as torch does, sums in token order.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FREE_PRIORITY ((int64_t)1 << 40)

/* Eviction by use (evict="use" of camelot/memory/rules.py, `place_novel`), or by age where the
 * tokens carry their own ages: the untouched slots and the novel tokens compete for places,
 * ranked by (level, keep, index): free slots (level -1, keep 0) go first, then slots by score
 * and tokens by importance, or both by minus their age (level 0), slots before tokens
 * at equal keep, lower index first; the n_novel lowest lose: a losing token is dropped, a losing
 * slot is taken by a placed token (placed tokens in token order take the losing slots in rank
 * order). NaN keeps rank last, as torch's sort puts them. */
typedef struct { int level; double keep; int64_t idx; } rank_t;

static inline int rank_less(rank_t a, rank_t b) {
    if (a.level != b.level) return a.level < b.level;
    int an = isnan(a.keep), bn = isnan(b.keep);
    if (an != bn) return bn;
    if (!an && a.keep != b.keep) return a.keep < b.keep;
    return a.idx < b.idx;
}

/* keep the `need` lowest in a heap whose root is the highest kept */
static void lowest_push(rank_t *h, int64_t *n, int64_t need, rank_t c) {
    if (*n < need) {
        int64_t i = (*n)++;
        h[i] = c;
        while (i > 0) {
            int64_t p = (i - 1) / 2;
            if (!rank_less(h[p], h[i])) break;
            rank_t t = h[p]; h[p] = h[i]; h[i] = t;
            i = p;
        }
        return;
    }
    if (!rank_less(c, h[0])) return;
    h[0] = c;
    int64_t i = 0;
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < *n && rank_less(h[w], h[l])) w = l;
        if (r < *n && rank_less(h[w], h[r])) w = r;
        if (w == i) break;
        rank_t t = h[w]; h[w] = h[i]; h[i] = t;
        i = w;
    }
}

static int by_rank(const void *a, const void *b) {
    rank_t x = *(const rank_t *)a, y = *(const rank_t *)b;
    return rank_less(x, y) ? -1 : rank_less(y, x) ? 1 : 0;
}

/* rows: B*H. keys [rows, R, D], values [rows, R, DV], counts/ages [rows, R] with R >= S+1: the
 * write manages slots [0, S) and leaves the others untouched (the scratch slot, and the span
 * reserve of camelot/memory/spans.py, which the caller writes); k [rows, T, D], v [rows, T, DV]; best [rows, T] nearest
 * slot, sim [rows, T] its cosine (-inf: none), finite [rows, T]. telemetry[5] += merged, new,
 * evicted, dropped, skipped. score [rows, R] and importance [rows, T]: NULL for the paper's
 * eviction by age; given, eviction by use: scores are first multiplied by `decay`, then gather
 * their merged tokens' importance, and a placed token's score is its importance. Returns nonzero
 * on a failed allocation (nothing written then). */
static int consolidate(int64_t rows, int64_t T, int64_t S, int64_t R, int64_t D, int64_t DV, float threshold,
                       float *keys, float *values, int64_t *counts, int64_t *ages,
                       const float *k, const float *v, const int64_t *best, const float *sim,
                       const uint8_t *finite, int64_t *telemetry, float *score, const float *importance,
                       float decay, const int64_t *tok_age, int64_t grow, int64_t first) {
    int64_t *lead = malloc(sizeof(int64_t) * T), *n_add = malloc(sizeof(int64_t) * T);
    int64_t *last = malloc(sizeof(int64_t) * T);
    float *sum_k = malloc(sizeof(float) * T * D), *sum_v = malloc(sizeof(float) * T * DV);
    uint8_t *touched = malloc(S), *merge = malloc(T), *was_free = malloc(S);
    rank_t *lowest = malloc(sizeof(rank_t) * (T + 1));
    int64_t *taken = malloc(sizeof(int64_t) * (T + 1));
    uint8_t *lost_token = malloc(T);
    int ok = lead && n_add && last && sum_k && sum_v && touched && merge && was_free && lowest && taken
             && lost_token;
    for (int64_t r = 0; ok && r < rows; r++) {
        float *K = keys + r * R * D, *V = values + r * R * DV;
        int64_t *C = counts + r * R, *A = ages + r * R;
        const float *kr = k + r * T * D, *vr = v + r * T * DV, *sr = sim + r * T;
        const int64_t *br = best + r * T;
        const uint8_t *fr = finite + r * T;
        float *SC = score ? score + r * R : NULL;
        const float *ir = importance ? importance + r * T : NULL;
        int64_t n_novel = 0;
        int64_t tm_merge = 0, tm_skip = 0, tm_new = 0, tm_evict = 0, tm_drop = 0;  /* tokens from `first` */
        memset(touched, 0, S);
        /* merges: each group of tokens into one slot is summed at its first token (the lead) */
        for (int64_t t = 0; t < T; t++) {
            merge[t] = fr[t] && sr[t] >= threshold;
            n_novel += fr[t] && !merge[t];
            if (t >= first) { tm_skip += !fr[t]; tm_merge += merge[t]; }
            if (!merge[t]) continue;
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
        const int64_t *ar = tok_age ? tok_age + r * T : NULL;
        for (int64_t j = 0; j < S; j++) A[j] += grow;
        if (SC) {
            for (int64_t j = 0; j < S; j++) SC[j] *= decay;
            for (int64_t t = 0; t < T; t++)  /* in token order, as torch's scatter_add sums */
                if (merge[t]) SC[br[t]] += ir[t];
        }
        for (int64_t t = 0; t < T; t++) {
            if (!merge[t] || lead[t] != t) continue;
            int64_t j = br[t], c = C[j], c_new = c + n_add[t];
            float cf = (float)c, den = (float)(c_new < 1 ? 1 : c_new);
            for (int64_t d = 0; d < D; d++) K[j * D + d] = (cf * K[j * D + d] + sum_k[t * D + d]) / den;
            for (int64_t d = 0; d < DV; d++) V[j * DV + d] = (cf * V[j * DV + d] + sum_v[t * DV + d]) / den;
            C[j] = c_new;
            A[j] = ar ? ar[last[t]] : (T - 1) - last[t];
            touched[j] = 1;
        }
        int64_t n_place;
        if (SC || ar) {
            /* eviction by use, or by age where tokens bring their own ages (one may be older than
             * a slot): the n_novel lowest of (untouched slots, novel tokens) lose */
            int64_t n_low = 0;
            for (int64_t j = 0; j < S && n_novel; j++) {
                was_free[j] = C[j] == 0;
                if (touched[j]) continue;
                double keep = was_free[j] ? 0.0 : SC ? SC[j] : -(double)A[j];
                lowest_push(lowest, &n_low, n_novel, (rank_t){was_free[j] ? -1 : 0, keep, j});
            }
            for (int64_t t = 0; t < T && n_novel; t++)
                if (fr[t] && !merge[t])
                    lowest_push(lowest, &n_low, n_novel, (rank_t){0, SC ? ir[t] : -(double)ar[t], S + 1 + t});
            qsort(lowest, n_low, sizeof(rank_t), by_rank);
            memset(lost_token, 0, T);
            n_place = 0;
            for (int64_t i = 0; i < n_low; i++) {
                if (lowest[i].idx > S) lost_token[lowest[i].idx - S - 1] = 1;
                else taken[n_place++] = lowest[i].idx;
            }
            int64_t placed = 0;
            for (int64_t t = 0; t < T; t++) {
                if (!fr[t] || merge[t]) continue;
                if (lost_token[t]) { tm_drop += t >= first; continue; }
                int64_t j = taken[placed++];
                if (t >= first) { tm_new += was_free[j]; tm_evict += !was_free[j]; }
                memcpy(K + j * D, kr + t * D, sizeof(float) * D);
                memcpy(V + j * DV, vr + t * DV, sizeof(float) * DV);
                C[j] = 1;
                A[j] = ar ? ar[t] : (T - 1) - t;
                if (SC) SC[j] = ir[t];
            }
        } else {
            /* novel tokens: the places they can take, best first */
            int64_t available = 0;
            for (int64_t j = 0; j < S; j++) available += !touched[j];
            int64_t n_drop = n_novel > available ? n_novel - available : 0;
            n_place = n_novel - n_drop;
            int64_t n_low = 0;
            for (int64_t j = 0; j < S && n_place; j++) {
                was_free[j] = C[j] == 0;
                if (touched[j]) continue;
                /* larger priority first: its negation ranks low (exact in a double below 2^53) */
                int64_t p = C[j] == 0 ? FREE_PRIORITY : (A[j] < FREE_PRIORITY - 1 ? A[j] : FREE_PRIORITY - 1);
                lowest_push(lowest, &n_low, n_place, (rank_t){0, -(double)p, j});
            }
            qsort(lowest, n_low, sizeof(rank_t), by_rank);
            int64_t seen = 0, placed = 0;
            for (int64_t t = 0; t < T; t++) {
                if (!fr[t] || merge[t]) continue;
                if (seen++ < n_drop) { tm_drop += t >= first; continue; } /* overtaken by later novel tokens */
                int64_t j = lowest[placed++].idx;
                if (t >= first) { tm_new += was_free[j]; tm_evict += !was_free[j]; }
                memcpy(K + j * D, kr + t * D, sizeof(float) * D);
                memcpy(V + j * DV, vr + t * DV, sizeof(float) * DV);
                C[j] = 1;
                A[j] = ar ? ar[t] : (T - 1) - t;
            }
        }
        telemetry[0] += tm_merge;
        telemetry[1] += tm_new;
        telemetry[2] += tm_evict;
        telemetry[3] += tm_drop;
        telemetry[4] += tm_skip;
    }
    free(lead); free(n_add); free(last); free(sum_k); free(sum_v); free(touched); free(merge); free(was_free);
    free(lowest); free(taken); free(lost_token);
    return ok ? 0 : 1;
}

int camelot_consolidate_f32(int64_t rows, int64_t T, int64_t S, int64_t R, int64_t D, int64_t DV, float threshold,
                            float *keys, float *values, int64_t *counts, int64_t *ages,
                            const float *k, const float *v, const int64_t *best, const float *sim,
                            const uint8_t *finite, int64_t *telemetry, const int64_t *tok_age, int64_t grow,
                            int64_t first) {
    return consolidate(rows, T, S, R, D, DV, threshold, keys, values, counts, ages, k, v, best, sim, finite,
                       telemetry, NULL, NULL, 1.0f, tok_age, grow, first);
}

int camelot_consolidate_use_f32(int64_t rows, int64_t T, int64_t S, int64_t R, int64_t D, int64_t DV,
                                float threshold, float decay, float *keys, float *values, int64_t *counts,
                                int64_t *ages, float *score, const float *k, const float *v, const int64_t *best,
                                const float *sim, const uint8_t *finite, const float *importance,
                                int64_t *telemetry, const int64_t *tok_age, int64_t grow, int64_t first) {
    return consolidate(rows, T, S, R, D, DV, threshold, keys, values, counts, ages, k, v, best, sim, finite,
                       telemetry, score, importance, decay, tok_age, grow, first);
}
