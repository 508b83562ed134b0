/* One step of beam search's scoring on the CPU: log-softmax, beam scores and the best 2K
   extensions of each sentence, in one pass over the logits.

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
