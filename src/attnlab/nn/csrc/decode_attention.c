/* The two attentions of one decoding step (attnlab.nn.fast_decode.decoder_step), one query per row,
   read where the step's products left their keys and values: nothing is copied into heads, gathered
   by row or grown, at any step.

   Self-attention.  Step p (p = 0 .. t) left its fused projection qkv_p, (N_p, 3E) with row stride
   3E: the query of row r at offset 0, its key at E, its value at 2E.  Rows move between steps (beam
   search reorders them, finished ones leave): row r of step p continues row parent_p[r] of step
   p - 1 (no parent_p: the same row).  So the keys row r of the newest step t attends to are those
   of rows slot_t = r, slot_(p-1) = parent_p[slot_p], one per step, read where they lie.  Per head:
       scores_p = scale · q · k_p,   out = Σ_p exp(scores_p - max) v_p / Σ_p exp(scores_p - max)

   Cross-attention.  memory holds the key and value of each source position the decoder may attend
   to, (P, 2E) with the key at offset 0 and the value at E, source b's positions from offsets[b] to
   offsets[b + 1]: one contiguous block per source, read as one stream.  Row r reads source
   sources[r] (none: source r).

   PyTorch's operations (fast_decode's other path, the reference in the tests) compute the same
   sums in another order: the results agree to float32 rounding. */

#include <math.h>
#include <stdint.h>

#include "vec8.h"

#ifdef __AVX__
#include <immintrin.h>
#endif

#define MAX_POSITIONS 4096 /* steps or source positions: the scores of one head stay on the stack */

/* scores_p = scale · q · k_p (D each) for p < n, k_p at places[p] + at: eight keys at a time, their
   eight sums of products added across lanes together. */
static void dots(const float *q, const float *const *places, int64_t at, int n, int D, float scale, float *scores) {
    int p = 0;
#ifdef __AVX__
    if (D % 8 == 0) {
        for (; p + 8 <= n; p += 8) {
            __m256 acc[8];
            for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) {
                const __m256 qd = _mm256_loadu_ps(q + d);
                for (int j = 0; j < 8; ++j)
                    acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(qd, _mm256_loadu_ps(places[p + j] + at + d)));
            }
            /* the eight vectors' lane sums as one vector: pairs, then quads, then the two halves */
            const __m256 a = _mm256_hadd_ps(acc[0], acc[1]), b = _mm256_hadd_ps(acc[2], acc[3]);
            const __m256 c = _mm256_hadd_ps(acc[4], acc[5]), e = _mm256_hadd_ps(acc[6], acc[7]);
            const __m256 ab = _mm256_hadd_ps(a, b), ce = _mm256_hadd_ps(c, e);
            const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(ab, ce, 0x20), _mm256_permute2f128_ps(ab, ce, 0x31));
            _mm256_storeu_ps(scores + p, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
        }
    }
#endif
    for (; p < n; ++p) scores[p] = scale * dot_product(q, places[p] + at, D);
}

/* e_p = exp(scores_p - max) in place, for n scores (n8 = n rounded up to 8, the rest -inf); their sum. */
static float exponentials(float *scores, int n, int n8) {
    float top = -INFINITY;
    for (int p = 0; p < n; ++p) top = scores[p] > top ? scores[p] : top;
    for (int p = n; p < n8; ++p) scores[p] = -INFINITY;
    vf8 sum8_ = splat8(0.0f);
    for (int p = 0; p < n8; p += 8) {
        const vf8 e = exp8_nonpositive(load8(scores + p) - splat8(top));
        store8(scores + p, e);
        sum8_ += e;
    }
    return sum8(sum8_);
}

/* out (D) = Σ_p weights_p v_p / total for p < n, v_p at places[p] + at. */
static void weighted_sum(const float *weights, const float *const *places, int64_t at, int n, float total, int D,
                         float *out) {
    const float inverse = 1.0f / total;
    int d = 0;
    for (; d + 32 <= D; d += 32) { /* four vectors at a time, each position's weight loaded once */
        vf8 acc0 = splat8(0.0f), acc1 = acc0, acc2 = acc0, acc3 = acc0;
        for (int p = 0; p < n; ++p) {
            const vf8 w = splat8(weights[p]);
            const float *v = places[p] + at + d;
            acc0 += w * load8(v);
            acc1 += w * load8(v + 8);
            acc2 += w * load8(v + 16);
            acc3 += w * load8(v + 24);
        }
        store8(out + d, acc0 * splat8(inverse));
        store8(out + d + 8, acc1 * splat8(inverse));
        store8(out + d + 16, acc2 * splat8(inverse));
        store8(out + d + 24, acc3 * splat8(inverse));
    }
    for (; d + 8 <= D; d += 8) {
        vf8 acc = splat8(0.0f);
        for (int p = 0; p < n; ++p) acc += splat8(weights[p]) * load8(places[p] + at + d);
        store8(out + d, acc * splat8(inverse));
    }
    for (; d < D; ++d) {
        float acc = 0.0f;
        for (int p = 0; p < n; ++p) acc += weights[p] * places[p][at + d];
        out[d] = acc * inverse;
    }
}

/* Where row r's key (and value, E floats later) lies at each step p < t1, newest first. */
static void locate_row(const float *const *steps, const int64_t *const *parents, int t1, int64_t r, int64_t E,
                       const float **keys) {
    int64_t slot = r;
    for (int p = t1 - 1; p >= 0; --p) {
        keys[p] = steps[p] + slot * 3 * E + E;
        if (p > 0 && parents[p] != 0) slot = parents[p][slot];
    }
}

/* Ask for the 2E floats (key and value) at each of n places into the cache (L2), ahead of their use:
   the rows' keys and values lie far apart, in tensors the size of the batch, so each row's reads
   would otherwise wait on memory one place at a time. */
static void prefetch_places(const float *const *places, int n, int64_t E) {
    for (int p = 0; p < n; ++p)
        for (int64_t f = 0; f < 2 * E; f += 16) __builtin_prefetch(places[p] + f, 0, 2);
}

/* steps[p]: qkv_p (N_p, 3E), p = 0 .. t1 - 1; parents[p]: (N_p,) or NULL (parents[0] unused);
   out (N, E) for the N = N_(t1-1) rows of the newest step.  Returns 0, or -1 for shapes out of range. */
int attnlab_decoder_self_attention(const float *const *steps, const int64_t *const *parents, int t1, int N, int H,
                                   int D, float scale, float *out, int threads) {
    if (t1 < 1 || t1 > MAX_POSITIONS || N < 0 || H < 1 || D < 1) return -1;
    if (threads < 1) threads = 1;
    const int64_t E = (int64_t)H * D;
    const int t8 = (t1 + 7) / 8 * 8;
#pragma omp parallel num_threads(threads) if (N * t1 * E > 32768)
    {
        const float *found[2][MAX_POSITIONS]; /* a row's keys at every step, and the next row's, being fetched */
        const float **now = found[0], **ahead = found[1];
        float scores[MAX_POSITIONS + 8];
        int ahead_row = -1; /* the row whose places ``ahead`` holds */
#pragma omp for schedule(static)
        for (int r = 0; r < N; ++r) {
            if (ahead_row == r) {
                const float **fetched = ahead;
                ahead = now, now = fetched;
            } else {
                locate_row(steps, parents, t1, r, E, now);
            }
            if (r + 1 < N) {
                locate_row(steps, parents, t1, r + 1, E, ahead);
                prefetch_places(ahead, t1, E);
                ahead_row = r + 1;
            }
            const float *q = steps[t1 - 1] + (int64_t)r * 3 * E;
            for (int h = 0; h < H; ++h) { /* head h: columns h·D of each key, E + h·D of each value */
                const int64_t at = (int64_t)h * D;
                dots(q + at, now, at, t1, D, scale, scores);
                const float total = exponentials(scores, t1, t8);
                weighted_sum(scores, now, E + at, t1, total, D, out + (int64_t)r * E + at);
            }
        }
    }
    return 0;
}

/* memory (P, 2E): the open positions of every source, source b's at offsets[b] .. offsets[b + 1] - 1 (at
   least one each: the search checks it); sources (N,) or NULL; q (N, E) with row stride q_stride; out
   (N, E).  Returns 0, or -1 for shapes out of range. */
int attnlab_decoder_cross_attention(const float *memory, const int64_t *offsets, const int64_t *sources, int N, int H,
                                    int D, const float *q, int64_t q_stride, float scale, float *out, int threads) {
    if (N < 0 || H < 1 || D < 1) return -1;
    for (int r = 0; r < N; ++r) { /* every row's source within the kernel's positions, before any work */
        const int64_t source = sources ? sources[r] : r, n = offsets[source + 1] - offsets[source];
        if (n < 1 || n > MAX_POSITIONS) return -1;
    }
    if (threads < 1) threads = 1;
    const int64_t E = (int64_t)H * D;
#pragma omp parallel num_threads(threads) if ((int64_t)N * (offsets[1] - offsets[0]) * E > 32768)
    {
        const float *places[MAX_POSITIONS]; /* each position's key, its value E floats on */
        float scores[MAX_POSITIONS + 8];
#pragma omp for schedule(static)
        for (int r = 0; r < N; ++r) {
            if (r + 1 < N) { /* the next row's keys and values, fetched while this row is computed */
                const int64_t next = sources ? sources[r + 1] : r + 1;
                const float *first = memory + offsets[next] * 2 * E, *end = memory + offsets[next + 1] * 2 * E;
                for (const float *f = first; f < end; f += 16) __builtin_prefetch(f, 0, 2);
            }
            const int64_t source = sources ? sources[r] : r;
            const int n = (int)(offsets[source + 1] - offsets[source]);
            const float *keys = memory + offsets[source] * 2 * E;
            for (int i = 0; i < n; ++i) places[i] = keys + (int64_t)i * 2 * E;
            const int n8 = (n + 7) / 8 * 8;
            for (int h = 0; h < H; ++h) {
                const int64_t at = (int64_t)h * D;
                dots(q + (int64_t)r * q_stride + at, places, at, n, D, scale, scores);
                const float total = exponentials(scores, n, n8);
                weighted_sum(scores, places, E + at, n, total, D, out + (int64_t)r * E + at);
            }
        }
    }
    return 0;
}
