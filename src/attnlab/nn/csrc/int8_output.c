/* A linear layer in int8 (attnlab.nn.fast_decode's int8 products), and the output layer in int8 with
   greedy search's choice made while the logits are formed (fast_decode.int8_pick).

   Weights: each output row w_v (E numbers) quantized symmetrically with its own step a_v = max|w_v| / 127
   to integers q_ve in [-127, 127], packed for the products below as (V16 / 16, E4 / 4, 16, 4): for each
   panel of 16 outputs and each group of 4 inputs, the 4 numbers of every output side by side, so that
   two 32-byte loads hold a group for all 16 (V16, E4: V and E rounded up to multiples of 16 and 4, the
   padding zero).  colsum_v = Σ_e q_ve.

   Activations: each row x (E numbers) quantized with its own step s = (max(x, 0) - min(x, 0)) / 127
   and zero point z = round(-min(x, 0) / s) to integers p_e = round(x_e / s) + z in [0, 127] (7 bits, so
   that the sum of two products p·q, at most 2 · 127 · 127, fits the 16 bits of AVX2's maddubs).

   Outputs: b_v + s · a_v · (Σ_e p_e q_ve - z · colsum_v), the integer sums exact in 32 bits, written
   to logits (N, V) where given.  With out given, each row's choice too: its largest output that
   neither closed (0, or -inf: the padding) nor the list of banned ids closes, the first of equals,
   found as the outputs of a block are formed, so that they need not be written.  Four rows at a time
   pass over a panel of weights, and the weights are read in chunks of CHUNK_BYTES, which stay in the
   L1 cache while every row passes over them.

   Returns 0; 1 where a row holds a NaN or an infinity, or a range beyond float32's, or where the ban
   closes every id (the caller then computes the whole call in float32); -1 for shapes out of range,
   -2 where the workspace could not be allocated. */

/* GCC's tuning for AMD's Zen 3 (what -march=native picks on this project's machines) loads all four
   rows' inputs ahead of their products in panel4 and so runs out of registers: one accumulator then
   goes through memory at every step, and a 64 x 256 x 8000 product took 2.0 ms against 1.5 ms tuned
   generically.  So this file is tuned generically (its instructions are still the machine's own). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("tune=generic")
#endif

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

#ifdef __AVX2__
#include <immintrin.h>
#endif

#define CHUNK_BYTES 16384 /* the weights every row passes over before the next ones: half the L1 cache */
#define ROWS 4       /* rows per tile of products */
#define MAX_E 16384  /* the integer sums stay within 2^31 */

typedef struct {
    const int8_t *weights;
    const int32_t *colsum;                    /* (V16,) */
    const float *scale, *bias, *ban;          /* (V16,) each; ban (NULL: no choice) 0, or -inf for closed ids */
    int V, E4;
} Table;

typedef struct { /* one row's activations, quantized, and the running best of each of its 8 lanes */
    const uint8_t *p;
    float step;
    int32_t zero;
    vf8 best;
    vi8 where;
} Row;

/* Quantize x (E) into p (E4, zero beyond E); 1 where x holds a NaN or an infinity.  Eight at a time
   where AVX2 is, with the same roundings as the scalar rest (to nearest, ties to even). */
static int quantize(const float *x, int E, int E4, uint8_t *p, float *step, int32_t *zero) {
    float lo = 0.0f, hi = 0.0f;
    int e = 0, nan = 0;
#ifdef __AVX2__
    if (E >= 8) {
        __m256 low = _mm256_setzero_ps(), high = low, unordered = low;
        for (; e + 8 <= E; e += 8) {
            const __m256 v = _mm256_loadu_ps(x + e);
            low = _mm256_min_ps(low, v);
            high = _mm256_max_ps(high, v);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        nan = _mm256_movemask_ps(unordered);
        for (int j = 0; j < 8; ++j) {
            lo = low[j] < lo ? low[j] : lo;
            hi = high[j] > hi ? high[j] : hi;
        }
    }
#endif
    for (; e < E; ++e) {
        nan |= x[e] != x[e];
        lo = x[e] < lo ? x[e] : lo;
        hi = x[e] > hi ? x[e] : hi;
    }
    float s = (hi - lo) / 127.0f;
    if (nan || !isfinite(lo) || !isfinite(hi) || !isfinite(s)) return 1;
    if (s < 1e-30f) s = 1e-30f; /* all zeros, or nearly: any step will do, and 1 / s stays finite */
    const float inverse = 1.0f / s;
    float z = nearbyintf(-lo * inverse);
    z = z < 0.0f ? 0.0f : z > 127.0f ? 127.0f : z;
    e = 0;
#ifdef __AVX2__
    const __m256i zero_point = _mm256_set1_epi32((int)z), smallest = _mm256_setzero_si256(),
                  largest = _mm256_set1_epi32(127);
    for (; e + 8 <= E; e += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + e), _mm256_set1_ps(inverse)));
        v = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(v, zero_point), smallest), largest);
        const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(p + e), _mm_packus_epi16(words, words));
    }
#endif
    for (; e < E; ++e) {
        float v = nearbyintf(x[e] * inverse) + z;
        v = v < 0.0f ? 0.0f : v > 127.0f ? 127.0f : v;
        p[e] = (uint8_t)v;
    }
    for (e = E; e < E4; ++e) p[e] = 0;
    *step = s;
    *zero = (int32_t)z;
    return 0;
}

/* The outputs of block b (8b .. 8b + 7) for one row from its integer sums; the choice updated where one
   is made, and the outputs stored where asked. */
static inline void finish(const Table *t, Row *row, vi8 sums, int b, float *logits) {
    const int v = 8 * b;
    const vi8 exact = sums - row->zero * *(const vi8u *)(t->colsum + v); /* Σ_e (p_e - z) q_ve */
    const vf8 f = __builtin_convertvector(exact, vf8);
    const vf8 logit = f * (splat8(row->step) * load8(t->scale + v)) + load8(t->bias + v);
    if (t->ban) {
        const vf8 candidate = logit + load8(t->ban + v);
        const vi8 better = candidate > row->best;
        row->best = (vf8)((better & (vi8)candidate) | (~better & (vi8)row->best));
        row->where = (better & ((vi8){0, 1, 2, 3, 4, 5, 6, 7} + v)) | (~better & row->where);
    }
    if (logits) {
        if (v + 8 <= t->V) {
            store8(logits + v, logit);
        } else {
            for (int j = 0; v + j < t->V; ++j) logits[v + j] = logit[j];
        }
    }
}

#ifdef __AVX2__
#define HOT_LOOP __attribute__((noinline)) /* the products' loops in functions of their own: all registers theirs */
#define ADD_PRODUCTS(acc, x, w) acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones))

static inline __m256i broadcast4(const uint8_t *p) {
    int32_t four;
    memcpy(&four, p, 4);
    return _mm256_set1_epi32(four);
}

/* Panel k (outputs 16k .. 16k + 15) against four rows: sixteen integer sums each, eight accumulators,
   written out so that they stay in registers. */
static HOT_LOOP void panel4(const Table *t, Row *rows, float *const *logits, int k) {
    const int groups = t->E4 / 4;
    const int8_t *w = t->weights + (int64_t)k * groups * 64;
    const uint8_t *p0 = rows[0].p, *p1 = rows[1].p, *p2 = rows[2].p, *p3 = rows[3].p;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0;
    for (int g = 0; g < groups; ++g, w += 64) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *)w), hi = _mm256_loadu_si256((const __m256i *)(w + 32));
        __m256i x = broadcast4(p0 + 4 * g);
        ADD_PRODUCTS(a0, x, lo);
        ADD_PRODUCTS(b0, x, hi);
        x = broadcast4(p1 + 4 * g);
        ADD_PRODUCTS(a1, x, lo);
        ADD_PRODUCTS(b1, x, hi);
        x = broadcast4(p2 + 4 * g);
        ADD_PRODUCTS(a2, x, lo);
        ADD_PRODUCTS(b2, x, hi);
        x = broadcast4(p3 + 4 * g);
        ADD_PRODUCTS(a3, x, lo);
        ADD_PRODUCTS(b3, x, hi);
    }
    finish(t, &rows[0], (vi8)a0, 2 * k, logits[0]);
    finish(t, &rows[0], (vi8)b0, 2 * k + 1, logits[0]);
    finish(t, &rows[1], (vi8)a1, 2 * k, logits[1]);
    finish(t, &rows[1], (vi8)b1, 2 * k + 1, logits[1]);
    finish(t, &rows[2], (vi8)a2, 2 * k, logits[2]);
    finish(t, &rows[2], (vi8)b2, 2 * k + 1, logits[2]);
    finish(t, &rows[3], (vi8)a3, 2 * k, logits[3]);
    finish(t, &rows[3], (vi8)b3, 2 * k + 1, logits[3]);
}

/* Panel k against one row, two groups of inputs at a time. */
static HOT_LOOP void panel1(const Table *t, Row *row, float *logits, int k) {
    const int groups = t->E4 / 4;
    const int8_t *w = t->weights + (int64_t)k * groups * 64;
    const uint8_t *p = row->p;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), b0 = a0, a1 = a0, b1 = a0;
    int g = 0;
    for (; g + 2 <= groups; g += 2, w += 128) {
        const __m256i x0 = broadcast4(p + 4 * g), x1 = broadcast4(p + 4 * g + 4);
        ADD_PRODUCTS(a0, x0, _mm256_loadu_si256((const __m256i *)w));
        ADD_PRODUCTS(b0, x0, _mm256_loadu_si256((const __m256i *)(w + 32)));
        ADD_PRODUCTS(a1, x1, _mm256_loadu_si256((const __m256i *)(w + 64)));
        ADD_PRODUCTS(b1, x1, _mm256_loadu_si256((const __m256i *)(w + 96)));
    }
    if (g < groups) {
        const __m256i x0 = broadcast4(p + 4 * g);
        ADD_PRODUCTS(a0, x0, _mm256_loadu_si256((const __m256i *)w));
        ADD_PRODUCTS(b0, x0, _mm256_loadu_si256((const __m256i *)(w + 32)));
    }
    finish(t, row, (vi8)_mm256_add_epi32(a0, a1), 2 * k, logits);
    finish(t, row, (vi8)_mm256_add_epi32(b0, b1), 2 * k + 1, logits);
}

static void panels(const Table *t, Row *rows, float *const *logits, int R, int first, int last) {
    for (int k = first; k < last; ++k) {
        if (R == ROWS) {
            panel4(t, rows, logits, k);
        } else {
            for (int r = 0; r < R; ++r) panel1(t, rows + r, logits[r], k);
        }
    }
}
#else
/* Without AVX2: the same integer sums, one output at a time. */
static void panels(const Table *t, Row *rows, float *const *logits, int R, int first, int last) {
    const int groups = t->E4 / 4;
    for (int r = 0; r < R; ++r)
        for (int k = first; k < last; ++k) {
            const int8_t *w = t->weights + (int64_t)k * groups * 64;
            for (int half = 0; half < 2; ++half) {
                vi8 sums = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int g = 0; g < groups; ++g)
                    for (int j = 0; j < 8; ++j)
                        for (int i = 0; i < 4; ++i)
                            sums[j] += (int32_t)rows[r].p[4 * g + i] * w[64 * g + 32 * half + 4 * j + i];
                finish(t, &rows[r], sums, 2 * k + half, logits[r]);
            }
        }
}
#endif

/* Rows first .. last - 1: quantized, then every chunk of outputs against every tile of rows.
   1 where a row cannot be quantized or bans every id. */
static int row_range(const Table *t, const float *x, int E, int64_t first, int64_t last, uint8_t *p, Row *rows,
                     float *logits, int64_t *out) {
    const int64_t n = last - first;
    for (int64_t i = 0; i < n; ++i) {
        Row *row = &rows[i];
        if (quantize(x + (first + i) * E, E, t->E4, p + i * t->E4, &row->step, &row->zero)) return 1;
        row->p = p + i * t->E4;
        row->best = splat8(-INFINITY);
        row->where = (vi8){0, 0, 0, 0, 0, 0, 0, 0};
    }
    const int npanels = (t->V + 15) / 16, panel_bytes = 16 * t->E4;
    const int chunk = CHUNK_BYTES > panel_bytes ? CHUNK_BYTES / panel_bytes : 1;
    for (int first_panel = 0; first_panel < npanels; first_panel += chunk) {
        const int last_panel = first_panel + chunk < npanels ? first_panel + chunk : npanels;
        for (int64_t i = 0; i < n; i += ROWS) {
            const int R = n - i < ROWS ? (int)(n - i) : ROWS;
            float *row_logits[ROWS] = {0};
            if (logits)
                for (int r = 0; r < R; ++r) row_logits[r] = logits + (first + i + r) * t->V;
            panels(t, rows + i, row_logits, R, first_panel, last_panel);
        }
    }
    for (int64_t i = 0; out && i < n; ++i) { /* each row's best lane: the largest, the first of equals */
        const Row *row = &rows[i];
        float best = -INFINITY;
        int32_t where = 0;
        for (int j = 0; j < 8; ++j)
            if (row->best[j] > best || (row->best[j] == best && row->where[j] < where)) {
                best = row->best[j];
                where = row->where[j];
            }
        if (best == -INFINITY) return 1;
        out[first + i] = where;
    }
    return 0;
}

/* Thread k's share of the N rows (of ``tiles`` tiles) among ``count``, with its own workspace. */
static inline int share(const Table *t, const float *x, int E, int64_t N, int64_t tiles, int k, int count,
                        float *logits, int64_t *out) {
    const int64_t first = ROWS * (tiles * k / count), last_tile = tiles * (k + 1) / count;
    const int64_t last = ROWS * last_tile < N ? ROWS * last_tile : N;
    if (last <= first) return 0;
    uint8_t *p = malloc((size_t)(last - first) * t->E4);
    Row *rows = aligned_alloc(32, (size_t)(last - first) * sizeof(Row));
    const int status = !p || !rows ? 2 : row_range(t, x, E, first, last, p, rows, logits, out);
    free(p);
    free(rows);
    return status;
}

int attnlab_int8_output(const float *x, int64_t N, int E, const int8_t *weights, const float *scale,
                        const int32_t *colsum, const float *bias, const int64_t *banned,
                        int nbanned, int V, float *logits, int64_t *out, int threads) {
    if (N < 0 || E < 1 || E > MAX_E || V < 1 || (!out && !logits)) return -1;
    if (threads < 1) threads = 1;
    const int V16 = (V + 15) / 16 * 16;
    float *ban = NULL; /* 0 for the ids that may be chosen, -inf for the padding and the banned ids */
    if (out) {
        ban = aligned_alloc(32, (size_t)V16 * sizeof(float));
        if (!ban) return -2;
        for (int v = 0; v < V16; ++v) ban[v] = v < V ? 0.0f : -INFINITY;
        for (int k = 0; k < nbanned; ++k)
            if (banned[k] >= 0 && banned[k] < V) ban[banned[k]] = -INFINITY;
    }
    const Table t = {weights, colsum, scale, bias, ban, V, (E + 3) / 4 * 4};
    int status = 0;
    /* the threads share the rows, in tiles; each quantizes its own (one thread: no OpenMP team) */
    const int64_t tiles = (N + ROWS - 1) / ROWS;
    if (threads > tiles) threads = tiles > 0 ? (int)tiles : 1;
    if (threads == 1) {
        status = share(&t, x, E, N, tiles, 0, 1, logits, out);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : status)
        for (int k = 0; k < threads; ++k) status |= share(&t, x, E, N, tiles, k, threads, logits, out);
    }
    free(ban);
    return status & 2 ? -2 : status;
}
