/* y = x W^T (+ b) for a weight stored as float16 or bfloat16, computed in float32.

   X [M, K] float32, W [N, K] 16-bit (IEEE half, or bfloat16 = the top 16 bits of a float32),
   Y [M, N] float32. Each weight vector is widened in registers (F16C vcvtph2ps, or a 16-bit shift
   for bfloat16) and multiplied with FMA into float32 accumulators, so the weight is read once in
   its 16-bit form and never written out as float32: at small batch this streams half the bytes of
   an fp32 matmul. Every widening is exact, so the result is the float32 product with the rounded
   weight, up to the summation order.

   For small batches (decode); large batches are better served by the float32 GEMM on the widened
   weight. Needs AVX2 + FMA + F16C: returns 5 when the CPU lacks them (the caller then widens the
   weight in torch). Return codes: 0 ok, 5 CPU unsupported (or lowered to scalar by lb_half_linear_set_isa). */

#include <stdint.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "lb_common.h"

#define HALF __attribute__((target("avx2,fma,f16c")))
#define NC 8 /* weight rows per parallel work item */
#define PAR_MIN_BYTES (48 * 1024)

/* code paths: AVX2 + FMA + F16C only (lb_half_linear_isa(), lb_common.h; "scalar" = unsupported) */
LB_ISA_EXPORTS(half_linear, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2))

HALF static inline __m256 widen(const uint16_t *p, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

HALF static inline float widen1(uint16_t v, int bf16) {
    if (bf16) {
        union { uint32_t u; float f; } c;
        c.u = (uint32_t)v << 16;
        return c.f;
    }
    return _cvtsh_ss(v);
}

HALF static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* one weight row against up to 4 activation rows; two accumulator phases hide FMA latency */
HALF static void row_x4(const float *X, int64_t K, int64_t m0, int mt, const uint16_t *w, int bf16, float *out) {
    __m256 a0[4], a1[4];
    for (int i = 0; i < 4; i++) { a0[i] = _mm256_setzero_ps(); a1[i] = _mm256_setzero_ps(); }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = widen(w + k, bf16), w1 = widen(w + k + 8, bf16);
        for (int i = 0; i < mt; i++) {
            const float *x = X + (m0 + i) * K + k;
            a0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), a0[i]);
            a1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + 8), a1[i]);
        }
    }
    for (int i = 0; i < mt; i++) {
        const float *x = X + (m0 + i) * K;
        float t = hsum8(_mm256_add_ps(a0[i], a1[i]));
        for (int64_t j = k; j < K; j++) t += widen1(w[j], bf16) * x[j];
        out[i] = t;
    }
}

HALF static void block(const float *X, int64_t M, int64_t K, const uint16_t *W, int64_t n0, int64_t n1,
                       const float *bias, float *Y, int64_t N, int bf16) {
    float out[4];
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t m = 0; m < M; m += 4) {
            int mt = M - m < 4 ? (int)(M - m) : 4;
            row_x4(X, K, m, mt, W + n * K, bf16, out);
            for (int i = 0; i < mt; i++) Y[(m + i) * N + n] = bias ? out[i] + bias[n] : out[i];
        }
    }
}

int lb_half_linear(const float *X, int64_t M, int64_t K, const uint16_t *W, int64_t N, const float *bias,
                   float *Y, int bf16, int nthreads) {
    if (lb_half_linear_isa() < LB_ISA_AVX2) return 5;
    if (nthreads < 1) nthreads = 1;
    const int64_t nblocks = (N + NC - 1) / NC;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nblocks > 1 && N * K * 2 >= PAR_MIN_BYTES)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * NC, n1 = n0 + NC < N ? n0 + NC : N;
        block(X, M, K, W, n0, n1, bias, Y, N, bf16);
    }
    return 0;
}
