/* Dynamic-range int8 matmul: int8 x int8 -> int32, then one float rescale.

   Layout (nn.Linear): activations X [M, K] float32 row-major, weight codes W [N, K] int8 row-major
   (one row per output channel), output Y [M, N] = X W^T.

   lb_int8_quantize        X -> codes Q [M, K] in [-127, 127] and scales s [M]:
                           amax = max |X[m, :]| (per token) or max |X| (per tensor, every s[m] equal),
                           Q = round_half_even(X * (127 / amax)), s = amax / 127 (amax 0 -> inv 127, s 0).
   lb_int8_gemm            C[m, n] = sum_k A[m, k] * B[n, k] in int32 (exact: |sum| <= 127^2 K).
   lb_int8_dynamic_linear  the two fused: Y[m, n] = ((float)C[m, n] * s[m]) * ws[n] (+ bias[n]).

   The float arithmetic is written in exactly the order of the plain-torch reference
   (lowbit.kernels.dynamic_int8), one float32 operation at a time (ISO C: no FMA contraction), so
   the reference and this code agree bit for bit.

   Code paths, chosen at run time (the best the CPU has, lowered by lb_int8_gemm_set_isa for tests):
   scalar C, AVX2, AVX-512 VNNI (below).

   AVX2 product of two int8 vectors a, b (both in [-127, 127]):
       maddubs(|a|, sign(b, a)) = pairwise sums of a_i b_i in int16 (|pair| <= 2 * 127^2 < 2^15,
       never saturates), then madd with ones -> int32 sums of four products.
   The -128 code is excluded by construction (|a| would not fit the unsigned operand's sign trick).

   Return codes: 0 ok, 1 non-finite activation, 2 K too large for int32 accumulation,
   3 out of memory, 4 a code outside [-127, 127] in an int8 operand. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <float.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "lb_common.h"

#define AVX2 __attribute__((target("avx2")))
#define NC 16        /* weight rows per parallel work item (16 x K codes stay in L2) */
#define MAX_K 133000 /* 127^2 * K < 2^31 */
#define PAR_MIN_MACS (1 << 22) /* smaller products run on one thread: waking a team costs more */
#define MAX_K_VNNI 66000 /* (127 + 128) * 127 * K < 2^31 (offset operand, below) */

/* code paths: lb_int8_gemm_isa() (lb_common.h), lowered by lb_int8_gemm_set_isa */
LB_ISA_EXPORTS(int8_gemm, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2) | LB_PATH(LB_ISA_AVX512VNNI))
#define PATH_SCALAR LB_ISA_SCALAR
#define PATH_AVX2 LB_ISA_AVX2
#define PATH_VNNI LB_ISA_AVX512VNNI

/* ---- round half to even without libm: exact for |v| < 2^22 in the default rounding mode ---- */
static inline float round_even(float v) {
    const float magic = 12582912.0f; /* 1.5 * 2^23 */
    volatile float t = v + magic;    /* volatile: keep the two float32 roundings as written */
    return t - magic;
}

/* ---- per-row absmax; sets *bad on NaN/Inf ---- */
static float row_amax_scalar(const float *x, int64_t K, int *bad) {
    float m = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        float a = x[k] < 0 ? -x[k] : x[k];
        if (!(a <= FLT_MAX)) { *bad = 1; return 0.0f; }
        if (a > m) m = a;
    }
    return m;
}

AVX2 static float row_amax_avx2(const float *x, int64_t K, int *bad) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_loadu_ps(x + k);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        m = _mm256_max_ps(m, _mm256_and_ps(v, absmask));
    }
    float buf[8];
    _mm256_storeu_ps(buf, m);
    float r = 0.0f;
    for (int i = 0; i < 8; i++) if (buf[i] > r) r = buf[i];
    if (_mm256_movemask_ps(nan)) { *bad = 1; return 0.0f; }
    for (; k < K; k++) {
        float a = x[k] < 0 ? -x[k] : x[k];
        if (!(a <= FLT_MAX)) { *bad = 1; return 0.0f; }
        if (a > r) r = a;
    }
    if (!(r <= FLT_MAX)) { *bad = 1; return 0.0f; }
    return r;
}

static void quant_row_scalar(const float *x, int64_t K, float inv, int8_t *q) {
    for (int64_t k = 0; k < K; k++) {
        float p = x[k] * inv;
        q[k] = (int8_t)(int)round_even(p);
    }
}

AVX2 static void quant_row_avx2(const float *x, int64_t K, float inv, int8_t *q) {
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k), vinv),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), vinv),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 16), vinv),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + k + 24), vinv),
                                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* packs work within 128-bit lanes: [i0lo i1lo i0hi i1hi] -> bytes interleaved by lane;
           the final dword permutation restores the order 0..31 */
        __m256i s01 = _mm256_packs_epi32(i0, i1);
        __m256i s23 = _mm256_packs_epi32(i2, i3);
        __m256i b = _mm256_packs_epi16(s01, s23);
        b = _mm256_permutevar8x32_epi32(b, perm);
        _mm256_storeu_si256((__m256i *)(q + k), b);
    }
    for (; k < K; k++) {
        float p = x[k] * inv;
        q[k] = (int8_t)(int)round_even(p);
    }
}

static int quantize(const float *X, int64_t M, int64_t K, int per_tensor, int8_t *Q, float *s,
                    int nthreads, int avx) {
    float *amax = (float *)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (!amax) return 3;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(| : bad) if (M * K > 65536)
    for (int64_t m = 0; m < M; m++) {
        int b = 0;
        amax[m] = avx ? row_amax_avx2(X + m * K, K, &b) : row_amax_scalar(X + m * K, K, &b);
        bad |= b;
    }
    if (bad) { free(amax); return 1; }
    if (per_tensor) {
        float g = 0.0f;
        for (int64_t m = 0; m < M; m++) if (amax[m] > g) g = amax[m];
        for (int64_t m = 0; m < M; m++) amax[m] = g;
    }
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M * K > 65536)
    for (int64_t m = 0; m < M; m++) {
        float a = amax[m];
        float inv = 127.0f / (a > 0.0f ? a : 1.0f);
        if (avx) quant_row_avx2(X + m * K, K, inv, Q + m * K);
        else quant_row_scalar(X + m * K, K, inv, Q + m * K);
        s[m] = a / 127.0f;
    }
    free(amax);
    return 0;
}

int lb_int8_quantize(const float *X, int64_t M, int64_t K, int per_tensor, int8_t *Q, float *s, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    return quantize(X, M, K, per_tensor, Q, s, nthreads, lb_int8_gemm_isa() != PATH_SCALAR);
}

/* ---- GEMM ---------------------------------------------------------------------------------- */

typedef struct {
    const int8_t *A, *B;
    int64_t M, N, K;
    int32_t *C;           /* int32 output, or NULL */
    float *Y;             /* float output, or NULL */
    const float *sa, *sb, *bias;
    const int32_t *asum;  /* VNNI path: sum_k A[m, k] per activation row */
} Gemm;

static inline void emit(const Gemm *g, int64_t m, int64_t n, int32_t acc) {
    if (g->C) {
        g->C[m * g->N + n] = acc;
    } else {
        float t = (float)acc;
        t = t * g->sa[m];
        t = t * g->sb[n];
        if (g->bias) t = t + g->bias[n];
        g->Y[m * g->N + n] = t;
    }
}

static void block_scalar(const Gemm *g, int64_t n0, int64_t n1) {
    const int64_t K = g->K;
    for (int64_t m = 0; m < g->M; m++) {
        const int8_t *a = g->A + m * K;
        for (int64_t n = n0; n < n1; n++) {
            const int8_t *b = g->B + n * K;
            int32_t acc = 0;
            for (int64_t k = 0; k < K; k++) acc += (int32_t)a[k] * (int32_t)b[k];
            emit(g, m, n, acc);
        }
    }
}

AVX2 static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* a . b for 32 codes, int32 partial sums */
#define DOT32(acc, ax, a, b) \
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(b, a)), ones))

static inline int32_t dot_tail(const int8_t *a, const int8_t *b, int64_t k0, int64_t K) {
    int32_t acc = 0;
    for (int64_t k = k0; k < K; k++) acc += (int32_t)a[k] * (int32_t)b[k];
    return acc;
}

/* 2 activation rows x 4 weight rows */
AVX2 static void k2x4(const Gemm *g, int64_t m, int64_t n) {
    const int64_t K = g->K, K32 = K & ~(int64_t)31;
    const int8_t *a0 = g->A + m * K, *a1 = a0 + K;
    const int8_t *b0 = g->B + n * K, *b1 = b0 + K, *b2 = b1 + K, *b3 = b2 + K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00;
    __m256i c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    for (int64_t k = 0; k < K32; k += 32) {
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(b0 + k));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(b1 + k));
        __m256i w2 = _mm256_loadu_si256((const __m256i *)(b2 + k));
        __m256i w3 = _mm256_loadu_si256((const __m256i *)(b3 + k));
        __m256i x = _mm256_loadu_si256((const __m256i *)(a0 + k));
        __m256i ax = _mm256_sign_epi8(x, x);
        DOT32(c00, ax, x, w0); DOT32(c01, ax, x, w1); DOT32(c02, ax, x, w2); DOT32(c03, ax, x, w3);
        x = _mm256_loadu_si256((const __m256i *)(a1 + k));
        ax = _mm256_sign_epi8(x, x);
        DOT32(c10, ax, x, w0); DOT32(c11, ax, x, w1); DOT32(c12, ax, x, w2); DOT32(c13, ax, x, w3);
    }
    emit(g, m, n + 0, hsum(c00) + dot_tail(a0, b0, K32, K));
    emit(g, m, n + 1, hsum(c01) + dot_tail(a0, b1, K32, K));
    emit(g, m, n + 2, hsum(c02) + dot_tail(a0, b2, K32, K));
    emit(g, m, n + 3, hsum(c03) + dot_tail(a0, b3, K32, K));
    emit(g, m + 1, n + 0, hsum(c10) + dot_tail(a1, b0, K32, K));
    emit(g, m + 1, n + 1, hsum(c11) + dot_tail(a1, b1, K32, K));
    emit(g, m + 1, n + 2, hsum(c12) + dot_tail(a1, b2, K32, K));
    emit(g, m + 1, n + 3, hsum(c13) + dot_tail(a1, b3, K32, K));
}

/* 1 activation row x 4 weight rows (batch 1: streams the weight once) */
AVX2 static void k1x4(const Gemm *g, int64_t m, int64_t n) {
    const int64_t K = g->K, K32 = K & ~(int64_t)31;
    const int8_t *a0 = g->A + m * K;
    const int8_t *b0 = g->B + n * K, *b1 = b0 + K, *b2 = b1 + K, *b3 = b2 + K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < K32; k += 32) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(a0 + k));
        __m256i ax = _mm256_sign_epi8(x, x);
        DOT32(c0, ax, x, _mm256_loadu_si256((const __m256i *)(b0 + k)));
        DOT32(c1, ax, x, _mm256_loadu_si256((const __m256i *)(b1 + k)));
        DOT32(c2, ax, x, _mm256_loadu_si256((const __m256i *)(b2 + k)));
        DOT32(c3, ax, x, _mm256_loadu_si256((const __m256i *)(b3 + k)));
    }
    emit(g, m, n + 0, hsum(c0) + dot_tail(a0, b0, K32, K));
    emit(g, m, n + 1, hsum(c1) + dot_tail(a0, b1, K32, K));
    emit(g, m, n + 2, hsum(c2) + dot_tail(a0, b2, K32, K));
    emit(g, m, n + 3, hsum(c3) + dot_tail(a0, b3, K32, K));
}

AVX2 static void k1x1(const Gemm *g, int64_t m, int64_t n) {
    const int64_t K = g->K, K32 = K & ~(int64_t)31;
    const int8_t *a0 = g->A + m * K, *b0 = g->B + n * K;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i c0 = _mm256_setzero_si256();
    for (int64_t k = 0; k < K32; k += 32) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(a0 + k));
        DOT32(c0, _mm256_sign_epi8(x, x), x, _mm256_loadu_si256((const __m256i *)(b0 + k)));
    }
    emit(g, m, n, hsum(c0) + dot_tail(a0, b0, K32, K));
}

/* weight rows [n0, n1) against every activation row; the activation pair stays in L1 while it
   meets the block's weight rows, the block's weight rows stay in L2 */
AVX2 static void block_avx2(const Gemm *g, int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 2 <= g->M; m += 2) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) k2x4(g, m, n);
        for (; n < n1; n++) { k1x1(g, m, n); k1x1(g, m + 1, n); }
    }
    for (; m < g->M; m++) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) k1x4(g, m, n);
        for (; n < n1; n++) k1x1(g, m, n);
    }
}

/* ---- AVX-512 VNNI ---------------------------------------------------------------------------
   vpdpbusd multiplies unsigned by signed bytes, four products per int32 lane, without saturation.
   The weight code b in [-127, 127] is offset to the unsigned b + 128 (= b XOR 0x80), so
       sum_k (b + 128) a = sum_k a b + 128 sum_k a,
   and the second term is removed with the activation row sums. |partial sums| <= 255 * 127 * K
   stay below 2^31 for K <= MAX_K_VNNI, so every int32 step is exact. */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* the four horizontal sums of a[0..3], as one vector (transpose-and-add) */
VNNI static inline __m128i reduce4(const __m512i *a) {
    __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
    __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
    __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* emit() for four consecutive outputs n..n+3 of row m: the same float32 operations, 4 lanes wide */
VNNI static inline void emit4(const Gemm *g, int64_t m, int64_t n, __m128i acc, int32_t offset) {
    acc = _mm_sub_epi32(acc, _mm_set1_epi32(offset));
    if (g->C) {
        _mm_storeu_si128((__m128i *)(g->C + m * g->N + n), acc);
        return;
    }
    __m128 t = _mm_cvtepi32_ps(acc);
    t = _mm_mul_ps(t, _mm_set1_ps(g->sa[m]));
    t = _mm_mul_ps(t, _mm_loadu_ps(g->sb + n));
    if (g->bias) t = _mm_add_ps(t, _mm_loadu_ps(g->bias + n));
    _mm_storeu_ps(g->Y + m * g->N + n, t);
}

VNNI static inline __attribute__((always_inline)) void vtile(const Gemm *g, int64_t m, int64_t n, const int MR,
                                                             const int NR) {
    const int64_t K = g->K;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][4], b[4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        for (int j = 0; j < NR; j++)
            b[j] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(g->B + (n + j) * K + k)), flip);
        for (int i = 0; i < MR; i++) {
            __m512i a = _mm512_loadu_si512((const void *)(g->A + (m + i) * K + k));
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], b[j], a);
        }
    }
    if (k < K) { /* masked tail: a = 0 there, so the offset weight 128 contributes nothing */
        const __mmask64 msk = (~0ULL) >> (64 - (K - k));
        for (int j = 0; j < NR; j++)
            b[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(msk, g->B + (n + j) * K + k), flip);
        for (int i = 0; i < MR; i++) {
            __m512i a = _mm512_maskz_loadu_epi8(msk, g->A + (m + i) * K + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], b[j], a);
        }
    }
    if (NR == 4) {
        for (int i = 0; i < MR; i++) emit4(g, m + i, n, reduce4(acc[i]), 128 * g->asum[m + i]);
    } else {
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++)
                emit(g, m + i, n + j, _mm512_reduce_add_epi32(acc[i][j]) - 128 * g->asum[m + i]);
    }
}

VNNI static void v4x4(const Gemm *g, int64_t m, int64_t n) { vtile(g, m, n, 4, 4); }
VNNI static void v4x1(const Gemm *g, int64_t m, int64_t n) { vtile(g, m, n, 4, 1); }
VNNI static void v1x4(const Gemm *g, int64_t m, int64_t n) { vtile(g, m, n, 1, 4); }
VNNI static void v1x1(const Gemm *g, int64_t m, int64_t n) { vtile(g, m, n, 1, 1); }

VNNI static void block_vnni(const Gemm *g, int64_t n0, int64_t n1) {
    int64_t m = 0;
    for (; m + 4 <= g->M; m += 4) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) v4x4(g, m, n);
        for (; n < n1; n++) v4x1(g, m, n);
    }
    for (; m < g->M; m++) {
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) v1x4(g, m, n);
        for (; n < n1; n++) v1x1(g, m, n);
    }
}

static int run_gemm(Gemm *g, int nthreads, int path) {
    if (path == PATH_VNNI && g->K > MAX_K_VNNI) path = PATH_AVX2;
    int32_t *asum = NULL;
    if (path == PATH_VNNI) {
        asum = (int32_t *)malloc((size_t)(g->M > 0 ? g->M : 1) * sizeof(int32_t));
        if (!asum) return 3;
        for (int64_t m = 0; m < g->M; m++) {
            int32_t t = 0;
            for (int64_t k = 0; k < g->K; k++) t += g->A[m * g->K + k];
            asum[m] = t;
        }
        g->asum = asum;
    }
    const int64_t nblocks = (g->N + NC - 1) / NC;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nblocks > 1 && g->M * g->N * g->K >= PAR_MIN_MACS)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t n0 = b * NC, n1 = n0 + NC < g->N ? n0 + NC : g->N;
        if (path == PATH_VNNI) block_vnni(g, n0, n1);
        else if (path == PATH_AVX2) block_avx2(g, n0, n1);
        else block_scalar(g, n0, n1);
    }
    free(asum);
    return 0;
}

static int codes_ok(const int8_t *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) if (p[i] == -128) return 0;
    return 1;
}

int lb_int8_gemm(const int8_t *A, const int8_t *B, int64_t M, int64_t N, int64_t K, int32_t *C, int nthreads) {
    if (K > MAX_K) return 2;
    if (!codes_ok(A, M * K) || !codes_ok(B, N * K)) return 4;
    Gemm g = {A, B, M, N, K, C, NULL, NULL, NULL, NULL, NULL};
    return run_gemm(&g, nthreads < 1 ? 1 : nthreads, lb_int8_gemm_isa());
}

/* The weight codes are checked once when the weight is loaded (Python side), not per call. */
int lb_int8_dynamic_linear(const float *X, int64_t M, int64_t K, const int8_t *W, const float *ws,
                           const float *bias, int64_t N, int per_tensor, float *Y, int nthreads) {
    if (K > MAX_K) return 2;
    if (nthreads < 1) nthreads = 1;
    int path = lb_int8_gemm_isa();
    int8_t *Q = (int8_t *)malloc((size_t)(M * K > 0 ? M * K : 1));
    float *s = (float *)malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (!Q || !s) { free(Q); free(s); return 3; }
    int rc = quantize(X, M, K, per_tensor, Q, s, nthreads, path != PATH_SCALAR);
    if (rc == 0) {
        Gemm g = {Q, W, M, N, K, NULL, Y, s, ws, bias, NULL};
        rc = run_gemm(&g, nthreads, path);
    }
    free(Q);
    free(s);
    return rc;
}
