/* The eight-float vectors and the few operations on them that attnlab's kernels share
   (short_attention.c, beam_scores.c, decode_attention.c). */

#ifndef ATTNLAB_VEC8_H
#define ATTNLAB_VEC8_H

#include <stdint.h>

/* Eight floats, one AVX register where the machine has AVX (GCC's and Clang's vector extension);
   vf8u and vi8u are the same, loadable from any 4-byte-aligned address. */
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t vi8u __attribute__((vector_size(32), aligned(4)));

static inline vf8 load8(const float *p) { return *(const vf8u *)p; }
static inline void store8(float *p, vf8 x) { *(vf8u *)p = x; }
static inline vf8 splat8(float x) { return (vf8){x, x, x, x, x, x, x, x}; }
/* The larger of x and y, lane by lane (y where either is NaN). */
static inline vf8 max8(vf8 x, vf8 y) {
    const vi8 x_larger = x > y;
    return (vf8)((x_larger & (vi8)x) | (~x_larger & (vi8)y));
}

/* The largest and the sum of the eight lanes, as trees of depth 3 (a fixed order of addition). */
static inline float largest8(vf8 x) {
    const float a = x[0] > x[4] ? x[0] : x[4], b = x[1] > x[5] ? x[1] : x[5];
    const float c = x[2] > x[6] ? x[2] : x[6], d = x[3] > x[7] ? x[3] : x[7];
    const float ab = a > b ? a : b, cd = c > d ? c : d;
    return ab > cd ? ab : cd;
}

static inline float sum8(vf8 x) {
    return ((x[0] + x[4]) + (x[2] + x[6])) + ((x[1] + x[5]) + (x[3] + x[7]));
}

/* Σ a_d b_d over d < D: eight products at a time, then the lanes, then the rest one by one. */
static inline float dot_product(const float *a, const float *b, int D) {
    int d = 0;
    float sum = 0.0f;
    if (D >= 8) {
        vf8 acc = load8(a) * load8(b);
        for (d = 8; d + 8 <= D; d += 8) acc += load8(a + d) * load8(b + d);
        sum = sum8(acc);
    }
    for (; d < D; ++d) sum += a[d] * b[d];
    return sum;
}

/* exp(x) for x <= 0 (scores minus their row's maximum), to about 2 ulp: x = n ln2 + r with
   |r| <= ln2 / 2, exp(r) by its Taylor series to r^7 (truncation error below 1e-8), and 2^n
   written into the exponent bits.  Below -87 (e^-87 is near the smallest normal float) it is 0
   here, and -inf (a masked key) gives 0 too; NaN stays NaN. */
static inline vf8 exp8_nonpositive(vf8 x) {
    const vi8 keep = (x >= splat8(-87.0f)) | (x != x);
    x = (vf8)((vi8)x & keep);                       /* x = 0 where out of range: no overflow below */
    const vf8 shifter = splat8(12582912.0f);        /* 1.5 * 2^23: adding it rounds to an integer */
    const vf8 n = (x * splat8(1.44269504088896341f) + shifter) - shifter;
    const vf8 r = (x - n * splat8(0.693145751953125f)) - n * splat8(1.42860682030941723212e-6f);
    vf8 p = splat8(1.0f / 5040.0f);
    p = p * r + splat8(1.0f / 720.0f);
    p = p * r + splat8(1.0f / 120.0f);
    p = p * r + splat8(1.0f / 24.0f);
    p = p * r + splat8(1.0f / 6.0f);
    p = p * r + splat8(0.5f);
    p = p * r + splat8(1.0f);
    p = p * r + splat8(1.0f);
    const vi8 two_n = (__builtin_convertvector(n, vi8) + 127) << 23;
    return (vf8)((vi8)(p * (vf8)two_n) & keep);
}

#endif
