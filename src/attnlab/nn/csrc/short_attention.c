/* Multi-head self-attention over short sequences, forward and backward, for float32 on the CPU.

   The kernel behind attnlab.nn.attention._ShortSelfAttention wherever attnlab.nn.native could
   build it (attnlab computes the same with PyTorch's operations where it could not).  It reads
   the fused projection qkv (B, T, 3E) where the projection left it and writes the heads' outputs
   (B, T, E) and the gradient (B, T, 3E) where the projections want them, so nothing is reordered
   into (B, H, T, D) and back; those copies, and the per-matrix overhead of PyTorch's batched
   products of 24 x 32 matrices, were a third of that version's time at 128 x 24 tokens.

   For each (batch row b, head h), with Q, K, V the T x D blocks of qkv and s = scale:
       forward    W = softmax(s Q Kᵀ) over the keys the mask allows (a query with none: W = 0)
                  O = (W ⊙ kept) V                    (kept: dropout's scaled keep-mask, or 1)
       backward   dV = (W ⊙ kept)ᵀ dO
                  dP = (dO Vᵀ) ⊙ kept
                  dS = s W ⊙ (dP - rowsum(W ⊙ dP))   (the softmax's backward pass, and the scale)
                  dQ = dS K,  dK = dSᵀ Q
   The products run in register blocks of 6 x 16 (matmul below) over operands copied next to the
   kernel; every sum is written out in a fixed order, so plain -O3 vectorises it, without
   -ffast-math (which older compilers also let switch the whole process to flush-to-zero).

   The (b, h) pairs are shared out between `threads` OpenMP threads; each pair writes only its own
   rows and columns of the outputs.  Limits: T <= MAX_T, D <= MAX_D and a multiple of 8. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec8.h"

#define MAX_T 64
#define MAX_D 256

/* One block of C = A B: `rows` rows (at most 6) by `vecs` registers of 8 columns (at most 2),
   the sums held in registers across the whole of K, as in the 6 x 16 blocks of the usual AVX2
   matrix-product kernels: twelve independent sums hide the latency of each multiply-add.
   Inlined with constant rows and vecs, so that the loops unroll and c stays in registers.  With
   a_by_columns, A is read as stored column by column (A[r][k] at A[k * lda + r]): the product
   of a transposed matrix, without transposing it. */
static inline __attribute__((always_inline)) void block(int rows, int vecs, int a_by_columns, int K,
                                                        const float *A, int64_t lda, const float *B,
                                                        int64_t ldb, float *C, int64_t ldc) {
    vf8 c[6][2];
    for (int r = 0; r < rows; ++r)
        for (int u = 0; u < vecs; ++u) c[r][u] = splat8(0.0f);
    for (int k = 0; k < K; ++k) {
        vf8 b[2];
        for (int u = 0; u < vecs; ++u) b[u] = load8(B + k * ldb + 8 * u);
        for (int r = 0; r < rows; ++r) {
            const vf8 a = splat8(a_by_columns ? A[k * lda + r] : A[r * lda + k]);
            for (int u = 0; u < vecs; ++u) c[r][u] += a * b[u];
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int u = 0; u < vecs; ++u) store8(C + r * ldc + 8 * u, c[r][u]);
}

/* C = A B for row-major A (M x K, row stride lda), B (K x N, ldb), C (M x N, ldc); N a multiple
   of 8.  Blocks of 6 rows by 16 columns, then the edges.  With a_by_columns, A is given by its
   transpose (K x M, row stride lda). */
static inline __attribute__((always_inline)) void matmul_any(int a_by_columns, int M, int N, int K,
                                                             const float *A, int64_t lda,
                                                             const float *B, int64_t ldb, float *C,
                                                             int64_t ldc) {
    const int64_t a_row = a_by_columns ? 1 : lda; /* from one row of A to the next */
    for (int j = 0; j < N; j += 16) {
        const int two = j + 16 <= N;
        const float *Bj = B + j;
        float *Cj = C + j;
        int i = 0;
        for (; i + 6 <= M; i += 6) {
            if (two) block(6, 2, a_by_columns, K, A + i * a_row, lda, Bj, ldb, Cj + i * ldc, ldc);
            else block(6, 1, a_by_columns, K, A + i * a_row, lda, Bj, ldb, Cj + i * ldc, ldc);
        }
        for (; i < M; ++i) {
            if (two) block(1, 2, a_by_columns, K, A + i * a_row, lda, Bj, ldb, Cj + i * ldc, ldc);
            else block(1, 1, a_by_columns, K, A + i * a_row, lda, Bj, ldb, Cj + i * ldc, ldc);
        }
    }
}

static void matmul(int M, int N, int K, const float *A, int64_t lda, const float *B, int64_t ldb,
                   float *C, int64_t ldc) {
    matmul_any(0, M, N, K, A, lda, B, ldb, C, ldc);
}

/* C = Aᵀ B, A stored K x M (row stride lda). */
static void matmul_at(int M, int N, int K, const float *A, int64_t lda, const float *B, int64_t ldb,
                      float *C, int64_t ldc) {
    matmul_any(1, M, N, K, A, lda, B, ldb, C, ldc);
}

/* dst (cols x ld, zero beyond `rows`) = srcᵀ for src (rows x cols, row stride src_ld). */
static void transpose(int rows, int cols, const float *src, int64_t src_ld, float *dst, int ld) {
    for (int c = 0; c < cols; ++c) {
        for (int r = 0; r < rows; ++r) dst[c * ld + r] = src[r * src_ld + c];
        for (int r = rows; r < ld; ++r) dst[c * ld + r] = 0.0f;
    }
}

/* dst (rows x cols, contiguous) = src (rows x cols, row stride src_ld), cols a multiple of 8: a
   block of qkv brought next to the kernel once, where a product would otherwise read each of its
   rows from the far side of the cache several times. */
static void gather(int rows, int cols, const float *src, int64_t src_ld, float *dst) {
    for (int r = 0; r < rows; ++r)
        for (int c = 0; c < cols; c += 8) store8(dst + r * cols + c, load8(src + r * src_ld + c));
}

typedef struct {
    const float *qkv, *weights_in, *grad_out, *kept;
    float *weights, *out, *grad_qkv;
    const uint8_t *mask;
    int64_t mask_stride[4]; /* element strides of the mask over (b, h, query, key); 0 broadcasts */
    int B, T, H, D;
    float scale;
    int begin, end;         /* this worker's share of the (b, h) pairs */
} Job;

static int forward_pairs(const Job *job) {
    const int T = job->T, H = job->H, D = job->D, E = H * D, row = 3 * E;
    const int Tp = (T + 7) & ~7; /* a row of scores, padded to whole registers */
    float *work = malloc(sizeof(float) * ((size_t)D * Tp + (size_t)T * D + (size_t)T * Tp + Tp));
    if (!work) return -2;
    float *kt = work, *vl = kt + D * Tp, *dropped = vl + T * D;
    int32_t *open = (int32_t *)(dropped + T * Tp); /* per key of the current mask row: all ones or 0 */
    const int64_t *ms = job->mask_stride;
    for (int pair = job->begin; pair < job->end; ++pair) {
        const int b = pair / H, h = pair % H;
        const float *q = job->qkv + (int64_t)b * T * row + h * D, *k = q + E, *v = q + 2 * E;
        float *s = job->weights + (int64_t)pair * T * Tp; /* the scores, then the weights, in place */
        transpose(T, D, k, row, kt, Tp);
        matmul(T, Tp, D, q, row, kt, Tp, s, Tp); /* S = Q Kᵀ */
        int keys = 0; /* how many keys the current query may attend to */
        for (int i = 0; i < T; ++i) {
            if (i == 0 || (job->mask && ms[2] != 0)) { /* a new row of the mask */
                const uint8_t *allow = job->mask ? job->mask + b * ms[0] + h * ms[1] + i * ms[2] : NULL;
                keys = 0;
                for (int j = 0; j < Tp; ++j) {
                    const int may = j < T && (!allow || allow[j * ms[3]]);
                    open[j] = may ? -1 : 0;
                    keys += may;
                }
            }
            float *si = s + i * Tp;
            if (keys == 0) { /* no key to attend to: zero weights, zero output */
                memset(si, 0, sizeof(float) * Tp);
                continue;
            }
            vf8 top8 = splat8(-INFINITY);
            for (int j = 0; j < Tp; j += 8) {
                /* a closed key's score is replaced, never added to: an overflowing score stays out */
                const vi8 may = *(const vi8u *)(open + j);
                const vf8 x = (vf8)((may & (vi8)(load8(si + j) * splat8(job->scale))) |
                                    (~may & (vi8)splat8(-INFINITY)));
                store8(si + j, x);
                top8 = max8(x, top8);
            }
            /* A NaN score is passed over here and turns its whole row to NaN below, as in PyTorch. */
            const vf8 top = splat8(largest8(top8));
            vf8 total8 = splat8(0.0f);
            for (int j = 0; j < Tp; j += 8) {
                const vf8 e = exp8_nonpositive(load8(si + j) - top);
                store8(si + j, e);
                total8 += e;
            }
            const vf8 inv = splat8(1.0f / sum8(total8));
            for (int j = 0; j < Tp; j += 8) store8(si + j, load8(si + j) * inv);
        }
        const float *p = s;
        if (job->kept) { /* the weights that multiply V: dropout's kept, scaled */
            const float *keep = job->kept + (int64_t)pair * T * T;
            for (int i = 0; i < T; ++i)
                for (int j = 0; j < T; ++j) dropped[i * Tp + j] = s[i * Tp + j] * keep[i * T + j];
            p = dropped;
        }
        gather(T, D, v, row, vl);
        matmul(T, D, T, p, Tp, vl, D, job->out + (int64_t)b * T * E + h * D, E); /* O = W V */
    }
    free(work);
    return 0;
}

static int backward_pairs(const Job *job) {
    const int T = job->T, H = job->H, D = job->D, E = H * D, row = 3 * E;
    const int Tp = (T + 7) & ~7;
    float *work = malloc(sizeof(float) * ((size_t)D * Tp + 2 * (size_t)T * Tp + 3 * (size_t)T * D));
    if (!work) return -2;
    float *vt = work, *pt = vt + D * Tp, *ds = pt + T * Tp, *ql = ds + T * Tp, *kl = ql + T * D, *gl = kl + T * D;
    for (int pair = job->begin; pair < job->end; ++pair) {
        const int b = pair / H, h = pair % H;
        const float *q = job->qkv + (int64_t)b * T * row + h * D, *k = q + E, *v = q + 2 * E;
        const float *go = job->grad_out + (int64_t)b * T * E + h * D;
        float *gq = job->grad_qkv + (int64_t)b * T * row + h * D, *gk = gq + E, *gv = gq + 2 * E;
        const float *w = job->weights_in + (int64_t)pair * T * Tp;
        const float *keep = job->kept ? job->kept + (int64_t)pair * T * T : NULL;
        /* dV = (W ⊙ kept)ᵀ dO */
        const float *p = w;
        if (keep) {
            for (int i = 0; i < T; ++i)
                for (int j = 0; j < T; ++j) pt[i * Tp + j] = w[i * Tp + j] * keep[i * T + j];
            p = pt;
        }
        gather(T, D, go, E, gl);
        matmul_at(T, D, T, p, Tp, gl, D, gv, row);
        /* dP = dO Vᵀ (⊙ kept); dS = W ⊙ (dP - rowsum(W ⊙ dP)), times the scale */
        transpose(T, D, v, row, vt, Tp);
        matmul(T, Tp, D, gl, D, vt, Tp, ds, Tp);
        for (int i = 0; i < T; ++i) {
            float *dsi = ds + i * Tp;
            const float *wi = w + i * Tp;
            if (keep)
                for (int j = 0; j < T; ++j) dsi[j] *= keep[i * T + j];
            vf8 dot8 = splat8(0.0f);
            for (int j = 0; j < Tp; j += 8) dot8 += load8(wi + j) * load8(dsi + j);
            const vf8 dot = splat8(sum8(dot8));
            for (int j = 0; j < Tp; j += 8)
                store8(dsi + j, load8(wi + j) * (load8(dsi + j) - dot) * splat8(job->scale));
        }
        /* dQ = dS K, dK = dSᵀ Q */
        gather(T, D, k, row, kl);
        gather(T, D, q, row, ql);
        matmul(T, D, T, ds, Tp, kl, D, gq, row);
        matmul_at(T, D, T, ds, Tp, ql, D, gk, row);
    }
    free(work);
    return 0;
}

/* Runs `work` over all B x H pairs in `threads` contiguous shares.  Built with OpenMP, the shares
   run on the OpenMP runtime PyTorch has already loaded (the loader finds a library of that name
   in the process and uses it), so they take the threads PyTorch's own operations use; built
   without, one after the other.  Returns 0, or a share's error (-2: out of memory). */
static int run_split(Job job, int threads, int (*work)(const Job *)) {
    const int pairs = job.B * job.H;
    int status = 0;
    if (threads < 1) threads = 1;
    if (threads > pairs) threads = pairs;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) {
        Job share = job;
        share.begin = (int)((int64_t)pairs * t / threads);
        share.end = (int)((int64_t)pairs * (t + 1) / threads);
        const int failed = work(&share);
        if (failed) {
#pragma omp atomic write
            status = failed;
        }
    }
    return status;
}

static int shape_ok(int B, int T, int H, int D) {
    return B > 0 && H > 0 && T > 0 && T <= MAX_T && D > 0 && D <= MAX_D && D % 8 == 0;
}

/* Return 0, -1 for a shape the kernel does not take (the caller checks shapes first), or -2
   where memory for the kernel's workspace could not be had. */
int attnlab_short_attention_forward(const float *qkv, const uint8_t *mask, const int64_t *mask_stride,
                                    const float *kept, int B, int T, int H, int D, float scale,
                                    float *weights, float *out, int threads) {
    if (!shape_ok(B, T, H, D)) return -1;
    Job job = {0};
    job.qkv = qkv; job.mask = mask; job.kept = kept; job.weights = weights; job.out = out;
    if (mask) memcpy(job.mask_stride, mask_stride, sizeof job.mask_stride);
    job.B = B; job.T = T; job.H = H; job.D = D; job.scale = scale;
    return run_split(job, threads, forward_pairs);
}

int attnlab_short_attention_backward(const float *qkv, const float *weights, const float *kept,
                                     const float *grad_out, int B, int T, int H, int D, float scale,
                                     float *grad_qkv, int threads) {
    if (!shape_ok(B, T, H, D)) return -1;
    Job job = {0};
    job.qkv = qkv; job.weights_in = weights; job.kept = kept; job.grad_out = grad_out;
    job.grad_qkv = grad_qkv;
    job.B = B; job.T = T; job.H = H; job.D = D; job.scale = scale;
    return run_split(job, threads, backward_pairs);
}
