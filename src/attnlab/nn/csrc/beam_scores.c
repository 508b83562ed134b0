/* One step of beam search's scoring on the CPU: log-softmax, beam scores and the best 2K
   extensions of each sentence, in one pass over the logits.  (And greedy search's choice, at the
   end of this file.)

   For sentence s with R live rows of logits x_r (V each) and beam scores a_r, the candidates are
       a_r + log_softmax(x_r)_v = a_r + ((x_rv - m_r) - log Σ_v' exp(x_rv' - m_r)),   m_r = max_v x_rv,
   the same operations, in the same order, as PyTorch's log_softmax followed by the addition (only
   the sum of exponentials is formed differently: its own exp and a fixed order, within a few ulp).
   Of the R·V candidates the n largest, not counting the banned token ids, are written best first
   to values (S, n) and indices (S, n) as r·V + v.  Where two candidates are equal the one with the
   smaller index comes first.  A row whose beam score is -inf adds nothing; where fewer than n
   candidates are finite the rest are -inf at index 0.

   PyTorch's way (attnlab.decode.search, the reference for this kernel) writes the log-softmax,
   then the S x R·V candidates, then selects: three passes over memory where this reads the logits
   three times from the cache (maximum, sum of exponentials, selection), and the selection passes
   over each block of 64 logits whose largest cannot beat the n-th best candidate so far. */

#include <math.h>
#include <stdint.h>

#include "vec8.h"

#ifdef __AVX__
#include <immintrin.h>
#endif

#define MAX_N 64
#define BLOCK 64 /* logits tested together against the floor by their maximum */

static void sentence(const float *logits, const float *alive, int R, int V, int n, const int64_t *banned,
                     int nbanned, float *values, int64_t *indices) {
    float best[MAX_N];
    int64_t where[MAX_N];
    int have = 0;
    for (int r = 0; r < R; ++r) {
        const float *x = logits + (int64_t)r * V;
        const float a = alive[r];
        if (a == -INFINITY) continue;
        /* the maximum and the sum of exponentials, each with independent running values, so that
           one vector operation does not wait for the one before */
        int v = 0;
        vf8 top8[4] = {splat8(-INFINITY), splat8(-INFINITY), splat8(-INFINITY), splat8(-INFINITY)};
        for (; v + 32 <= V; v += 32)
            for (int u = 0; u < 4; ++u) top8[u] = max8(load8(x + v + 8 * u), top8[u]);
        for (; v + 8 <= V; v += 8) top8[0] = max8(load8(x + v), top8[0]);
        float top = largest8(max8(max8(top8[0], top8[1]), max8(top8[2], top8[3])));
        for (; v < V; ++v) top = x[v] > top ? x[v] : top;
        vf8 total8[2] = {splat8(0.0f), splat8(0.0f)};
        for (v = 0; v + 16 <= V; v += 16)
            for (int u = 0; u < 2; ++u) total8[u] += exp8_nonpositive(load8(x + v + 8 * u) - splat8(top));
        for (; v + 8 <= V; v += 8) total8[0] += exp8_nonpositive(load8(x + v) - splat8(top));
        float total = sum8(total8[0] + total8[1]);
        for (; v < V; ++v) total += expf(x[v] - top);
        const float log_total = logf(total);
        float floor = have == n ? best[n - 1] : -INFINITY; /* what a candidate must beat */
        for (int v0 = 0; v0 < V; v0 += BLOCK) {
            const int v1 = v0 + BLOCK <= V ? v0 + BLOCK : V;
            if (v1 - v0 == BLOCK && have == n) {
                /* A block whose largest logit cannot make a candidate above the floor is passed over:
                   its best candidate would be a + ((x - top) - log_total), which (within the margin
                   for rounding) is above the floor only if x is above this. */
                const float bar = floor - a + top + log_total;
                const float margin = 1e-5f * (fabsf(bar) + fabsf(a) + fabsf(top) + fabsf(log_total)) + 1e-30f;
                vf8 most = load8(x + v0);
                for (int u = v0 + 8; u < v1; u += 8) most = max8(load8(x + u), most);
                if (!(largest8(most) > bar - margin)) continue;
            }
            for (v = v0; v < v1; ++v) {
                const float c = a + ((x[v] - top) - log_total);
                if (!(c > floor)) continue;
                int is_banned = 0;
                for (int b = 0; b < nbanned; ++b) is_banned |= banned[b] == v;
                if (is_banned) continue;
                int at = have < n ? have++ : n - 1; /* insert, keeping best[] sorted, best first */
                while (at > 0 && best[at - 1] < c) {
                    best[at] = best[at - 1];
                    where[at] = where[at - 1];
                    --at;
                }
                best[at] = c;
                where[at] = (int64_t)r * V + v;
                if (have == n) floor = best[n - 1];
            }
        }
    }
    for (int j = 0; j < n; ++j) {
        values[j] = j < have ? best[j] : -INFINITY;
        indices[j] = j < have ? where[j] : 0;
    }
}

/* logits (S·R, V), alive (S, K) of which the first R columns are used, values and indices (S, n).
   Returns 0, or -1 where n is out of range (the caller checks first). */
int attnlab_beam_scores(const float *logits, const float *alive, int S, int R, int K, int V, int n,
                        const int64_t *banned, int nbanned, float *values, int64_t *indices, int threads) {
    if (n < 1 || n > MAX_N || R < 1 || R > K || V < 1) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int s = 0; s < S; ++s)
        sentence(logits + (int64_t)s * R * V, alive + (int64_t)s * K, R, V, n, banned, nbanned,
                 values + (int64_t)s * n, indices + (int64_t)s * n);
    return 0;
}

/* Greedy search's choice: for each of rows rows of V scores, the position of the largest score that
   is not a banned id, as PyTorch's argmax over the scores with the banned ids at -inf chooses it:
   the first of equal largest, a NaN before any number.  One vector pass for the maximum, then a
   scan for its first unbanned place; only where every place of the maximum is banned, a second
   search that skips them. */
static int banned_id(int64_t v, const int64_t *banned, int nbanned) {
    for (int b = 0; b < nbanned; ++b)
        if (banned[b] == v) return 1;
    return 0;
}

static int64_t pick_row(const float *x, int V, const int64_t *banned, int nbanned) {
    int v = 0;
    vf8 top8[4] = {splat8(-INFINITY), splat8(-INFINITY), splat8(-INFINITY), splat8(-INFINITY)};
    vi8 nan8 = {0};
    for (; v + 32 <= V; v += 32)
        for (int u = 0; u < 4; ++u) {
            const vf8 y = load8(x + v + 8 * u);
            nan8 |= y != y;
            top8[u] = max8(y, top8[u]);
        }
    float top = largest8(max8(max8(top8[0], top8[1]), max8(top8[2], top8[3])));
    int nan = 0;
    for (int lane = 0; lane < 8; ++lane) nan |= nan8[lane] != 0;
    for (; v < V; ++v) {
        nan |= x[v] != x[v];
        top = x[v] > top ? x[v] : top;
    }
    if (nan) /* the first NaN that may be chosen wins, as in argmax */
        for (int64_t w = 0; w < V; ++w)
            if (x[w] != x[w] && !banned_id(w, banned, nbanned)) return w;
    int64_t w = 0;
    for (; w + 8 <= V; w += 8) { /* eight at a time to the first block holding the maximum */
        const vi8 at = load8(x + w) == splat8(top);
#ifdef __AVX__
        if (!_mm256_movemask_ps((__m256)at)) continue;
#endif
        for (int lane = 0; lane < 8; ++lane)
            if (at[lane] && !banned_id(w + lane, banned, nbanned)) return w + lane;
    }
    for (; w < V; ++w)
        if (x[w] == top && !banned_id(w, banned, nbanned)) return w;
    /* the maximum lies at banned ids only (or the row is all -inf): the best of the rest */
    int64_t best = -1;
    float value = -INFINITY;
    for (w = 0; w < V; ++w)
        if (!banned_id(w, banned, nbanned) && (best < 0 || x[w] > value)) best = w, value = x[w];
    return best < 0 ? 0 : best;
}

int attnlab_greedy_pick(const float *scores, int64_t rows, int V, const int64_t *banned, int nbanned, int64_t *out,
                        int threads) {
    if (V < 1 || rows < 0) return -1;
    if (threads < 1) threads = 1;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * V > 65536)
    for (int64_t r = 0; r < rows; ++r) out[r] = pick_row(scores + r * V, V, banned, nbanned);
    return 0;
}

/* Greedy search's choice from an int8 screen (attnlab.nn.fast_decode.screened_pick): the same token
   as attnlab_greedy_pick over the float32 logits b_v + x · w_v, having computed only a few of them.

   approx (N, V) holds the output layer computed in int8 (attnlab's int8 product, int8_output.c), which
   is within e_v = half_step · l1_v + β · error_v + slack of the float32 logit of every token v, where
   half_step is half the row's activation quantization step (half_steps, (N,), with room for rounding),
   β = Σ_e |x_e| +
   E · half_step bounds the quantized row's sum of magnitudes, l1_v = Σ_e |w_ve|, error_v bounds each
   weight's quantization error (and the float32 rounding of the products), and slack the rounding of
   the biases.  So the best token's upper bound approx_v + e_v is at least every token's lower bound
   approx_u - e_u, and the best lies among the tokens whose upper bound reaches the largest lower bound:
   on the trained models about three a row.  Those are computed in float32 (rows holds w_v, (V, E)) and
   the best taken, the first of equals.  The banned ids' approximations are set to -inf first (approx
   is the caller's scratch).  Returns 0; 1 where a row holds a NaN or an infinity (or bans every id),
   for the caller to take the float32 logits instead; -1 for shapes out of range. */
typedef struct { /* the terms of the bound e_v for one row */
    const float *l1, *error;
    float half_step, beta, slack;
} Bound;

static inline vf8 bound8(const Bound *b, int v) {
    return splat8(b->half_step) * load8(b->l1 + v) + splat8(b->beta) * load8(b->error + v) + splat8(b->slack);
}

static inline float bound1(const Bound *b, int v) { return b->half_step * b->l1[v] + b->beta * b->error[v] + b->slack; }

static int screened_row(float *approx, const float *x, const float *rows, const float *bias, const float *l1,
                        const float *error, float half_step, float slack, int V, int E, const int64_t *banned,
                        int nbanned, int64_t *out) {
    float beta = 0.0f;
    for (int e = 0; e < E; ++e) beta += fabsf(x[e]);
    beta += (float)E * half_step;
    if (!isfinite(beta)) return 1;
    for (int k = 0; k < nbanned; ++k)
        if (banned[k] >= 0 && banned[k] < V) approx[banned[k]] = -INFINITY;
    const Bound e = {l1, error, half_step, beta, slack};
    /* the largest lower bound, four running maxima apart (a NaN is caught by bad8, so any max will do) */
    vf8 low8[4] = {splat8(-INFINITY), splat8(-INFINITY), splat8(-INFINITY), splat8(-INFINITY)};
    vi8 bad8 = (vi8){0, 0, 0, 0, 0, 0, 0, 0};
    int v = 0;
    for (; v + 32 <= V; v += 32)
        for (int u = 0; u < 4; ++u) {
            const int w = v + 8 * u;
            const vf8 a = load8(approx + w);
            bad8 |= a != a;
            low8[u] = max8(a - bound8(&e, w), low8[u]);
        }
    for (; v + 8 <= V; v += 8) {
        const vf8 a = load8(approx + v);
        bad8 |= a != a;
        low8[0] = max8(a - bound8(&e, v), low8[0]);
    }
    float low = largest8(max8(max8(low8[0], low8[1]), max8(low8[2], low8[3])));
    for (int k = 0; k < 8; ++k) if (bad8[k]) return 1;
    for (; v < V; ++v) {
        if (approx[v] != approx[v]) return 1;
        const float lower = approx[v] - bound1(&e, v);
        low = lower > low ? lower : low;
    }
    if (!isfinite(low)) return 1; /* an infinite approximation, or every id banned */
    int64_t best = -1;
    float value = -INFINITY;
    const vf8 low8_ = splat8(low);
    v = 0;
#ifdef __AVX__
    for (; v + 8 <= V; v += 8) { /* eight upper bounds at a time, against the largest lower bound */
        const vi8 reach = load8(approx + v) + bound8(&e, v) >= low8_;
        for (int lanes = _mm256_movemask_ps((__m256)reach); lanes; lanes &= lanes - 1) {
            const int w = v + __builtin_ctz(lanes);
            const float logit = bias[w] + dot_product(x, rows + (int64_t)w * E, E);
            if (logit != logit) return 1;
            if (best < 0 || logit > value) best = w, value = logit;
        }
    }
#endif
    for (; v < V; ++v) {
        if (approx[v] + bound1(&e, v) < low) continue;
        const float logit = bias[v] + dot_product(x, rows + (int64_t)v * E, E);
        if (logit != logit) return 1;
        if (best < 0 || logit > value) best = v, value = logit;
    }
    *out = best;
    return 0;
}

int attnlab_screened_pick(float *approx, const float *hidden, const float *rows, const float *bias, const float *l1,
                          const float *error, const float *half_steps, float slack, int64_t N, int V, int E,
                          const int64_t *banned, int nbanned, int64_t *out, int threads) {
    if (N < 0 || V < 1 || E < 1) return -1;
    if (threads < 1) threads = 1;
    int refused = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : refused) if (N * V > 65536)
    for (int64_t r = 0; r < N; ++r)
        refused |= screened_row(approx + r * V, hidden + r * E, rows, bias, l1, error, half_steps[r], slack, V, E,
                                banned, nbanned, out + r);
    return refused ? 1 : 0;
}
