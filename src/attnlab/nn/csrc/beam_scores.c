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
   then the S x R·V candidates, then selects: three passes over memory where this makes one read,
   exp included, and compares eight candidates at a time against the n-th best so far. */

#include <math.h>
#include <stdint.h>

#include "vec8.h"

#define MAX_N 64

static void sentence(const float *logits, const float *alive, int R, int V, int n, const int64_t *banned,
                     int nbanned, float *values, int64_t *indices) {
    float best[MAX_N];
    int64_t where[MAX_N];
    int have = 0;
    for (int r = 0; r < R; ++r) {
        const float *x = logits + (int64_t)r * V;
        const float a = alive[r];
        if (a == -INFINITY) continue;
        int v = 0;
        vf8 top8 = splat8(-INFINITY);
        for (; v + 8 <= V; v += 8) top8 = max8(load8(x + v), top8);
        float top = largest8(top8);
        for (; v < V; ++v) top = x[v] > top ? x[v] : top;
        vf8 total8 = splat8(0.0f);
        for (v = 0; v + 8 <= V; v += 8) total8 += exp8_nonpositive(load8(x + v) - splat8(top));
        float total = sum8(total8);
        for (; v < V; ++v) total += expf(x[v] - top);
        const float log_total = logf(total);
        float floor = have == n ? best[n - 1] : -INFINITY; /* what a candidate must beat */
        for (int v0 = 0; v0 < V; v0 += 8) {
            const int v1 = v0 + 8 <= V ? v0 + 8 : V;
            if (v1 - v0 == 8) { /* eight at a time: most blocks hold nothing above the floor */
                const vf8 c = splat8(a) + ((load8(x + v0) - splat8(top)) - splat8(log_total));
                const vi8 above = c > splat8(floor);
                if (!(above[0] | above[1] | above[2] | above[3] | above[4] | above[5] | above[6] | above[7]))
                    continue;
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
