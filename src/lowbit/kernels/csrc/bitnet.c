/* BitNet layers: ternary (b1.58) or binary (1-bit) weight codes times int8 activations, fused.
 *
 * The arithmetic is lowbit.formats.bitnet's (the format's docstring defines it; its plain-torch
 * product is the reference these functions are tested against). For one token x [K] (a row of
 * the float32 input [M, K]):
 *
 *   norm:   ss = sum x_k^2 (float32, in at::sum's order, below); r = 1 / sqrtf(ss / K + eps);
 *           x_k = (x_k * r) * g_k                            (g: the gain, when stored)
 *   gamma:  gamma = max(max_k |x_k|, 1e-5)
 *   codes:  q_k = clamp(round_half_even((x_k * 127) / gamma), -127, 127)
 *   sum:    b1.58  acc = sum_k (u_k - 1) q_k = D - Q       (u = W~ + 1 in {0, 1, 2})
 *           1-bit  acc = sum_k (2 u_k - 1) q_k = 2 D - Q   (u = (W~ + 1) / 2 in {0, 1})
 *           with D = sum_k u_k q_k and Q = sum_k q_k, exact in int32
 *   output: y = (float)acc * ((beta * gamma) / 127)  (+ bias)
 *
 * each step one float32 operation as written (ISO C: no FMA contraction), so that without the
 * norm the output equals the reference bit for bit. A token whose (normed) input holds a NaN or
 * an infinity gets a NaN output row, as the reference does.
 *
 * The norm's sum of squares is computed in the order in which torch's CPU sum kernel adds a
 * contiguous float32 row (aten/src/ATen/native/cpu/SumKernel.cpp: vectors of 8 floats, 4 of them
 * in flight, a 4-level cascade, then the scalar tail and the 8 lanes), so that mean(x^2) is
 * torch's to the bit in the common case. That order is torch's internal choice, not a contract
 * (it differs e.g. when torch splits one very long row across threads), so with the norm the
 * kernel is held to the reference within a tolerance, not bit for bit.
 *
 * Weights (lb_bitnet_weight, the struct lowbit.kernels.bitnet builds): codes packed row by row
 * (lowbit.core.packing), row_bytes bytes a row; 2-bit codes: code 4k + j of a row at bits 2j of
 * byte k; 1-bit codes: code 8k + j at bit j of byte k.
 *
 * SIMD layout. The weight loop never unpacks codes into column order: a vector of V weight
 * bytes (chunk c of a row) shifted right by j*b bits and masked holds, in byte i, the code of
 * column (c*V + i)*S + j (S = 8/b codes a byte: "stream" j). Each token's int8 codes are
 * permuted once into that order (chunk c, stream j, byte i; permute_*), so the weight loop is
 * load, shift, mask, dot:
 *   AVX-512 VNNI  vpdpbusd (u8 x s8 -> int32). V = 64, or 32 (ymm, AVX-512 VL) when that leaves
 *                 less of a row's last chunk empty (K = 576: 144-byte rows). Shifts share a port
 *                 with vpdpbusd, so a vector is shifted once (its high nibble) and its codes are
 *                 masked in place: 2-bit masks 3 and 12 give u and 4u (two accumulators, the
 *                 second shifted back once per row), 1-bit masks 1, 2, 4, 8 give 2^e u (four).
 *   AVX2          V = 32; vpmaddubsw (u8 x s8 pair sums in int16: |u q| <= 3 * 127, no
 *                 saturation) summed in int16 over at most BN_FLUSH chunks, then vpmaddwd.
 *   scalar        the natural column order, byte by byte.
 * Four weight rows share each activation load and one joint horizontal sum. Columns past K hold
 * zero activations, so the bytes past a row's end in its last chunk (masked off, or the next
 * row's) add nothing. The weight rows are prefetched BN_PREFETCH bytes ahead.
 *
 * Threads (OpenMP, at most nthreads): output rows are split over threads (whole activation rows
 * when the layer has fewer row quads than threads); a layer under g_min_parallel_bytes of weights
 * runs on one thread. The per-token preparation runs in parallel over tokens when M > 1.
 *
 * Entry points (0 = done; 2 = bad arguments or out of memory; 3 = bit width other than 1 or 2):
 *   lb_bitnet_linear_w     the layer: float32 x [M, K] -> y [M, N] (+ bias)
 *   lb_bitnet_int_product  the integer product only: int8 codes [M, K] -> int32 acc [M, N] (tests)
 *   lb_bitnet_quantize     the activation codes [M, K] and gamma [M] of x (tests)
 * Code paths: scalar C, AVX2, AVX-512 VNNI (lb_bitnet_set_isa lowers the one in use).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lb_common.h"

#if defined(__x86_64__) || defined(__i386__)
#define LB_X86 1
#include <immintrin.h>
#else
#define LB_X86 0
#endif

/* Small copies in the per-row code stay inline loops (a libc call per row costs more than the
 * row's arithmetic on small layers). */
#pragma GCC optimize("no-tree-loop-distribute-patterns")

typedef struct {
    const uint8_t* qw;          /* [N, row_bytes] packed codes */
    const float* scale;         /* [1] beta */
    const float* norm_weight;   /* [K] the norm's gain, or NULL */
    int64_t K, N, row_bytes;
    int32_t bits;               /* bits per code: 2 (b1.58) or 1 (1-bit) */
    int32_t norm;               /* apply the RMSNorm first */
    float norm_eps;
} lb_bitnet_weight;

LB_ISA_EXPORTS(bitnet, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2) | LB_PATH(LB_ISA_AVX512VNNI))

void lb_bitnet_set_min_parallel_bytes(int64_t n) { g_min_parallel_bytes = n; }

#define BN_EPS 1e-5f          /* gamma's lower bound (lowbit.formats.bitnet.EPS) */
#define BN_MAX_K (1 << 21)    /* 2 * 127 * K < 2^31, and 8 * 127 * K / 4 (VNNI's 8-scaled 1-bit sums) */
#ifndef BN_PREFETCH
/* Software prefetch distance in the weight rows (bytes; 0: none). Measured on a 2048 x 5632
 * b1.58 layer (2.9 MB: weights from L3), one thread, AVX-512 VNNI: 1.3-1.4x faster with 4 KiB
 * than without; no change on layers whose weights stay in L2. */
#define BN_PREFETCH 4096
#endif
#define BN_FLUSH 8            /* AVX2: chunks summed in int16 before widening (8 * 4 * 2 * 3 * 127 < 2^15) */

/* grow-only scratch: the caller's per-call data, and each thread's per-token buffers */
static _Thread_local void* t_call = NULL;
static _Thread_local size_t t_call_n = 0;
static _Thread_local void* t_tok = NULL;
static _Thread_local size_t t_tok_n = 0;

#define PAD64(n) (((n) + 63) / 64 * 64)

/* ------------------------------------------------------------------------------------------ */
/* at::sum's order for one contiguous float32 row of n values (see the header)                 */
#define TS_W 8      /* floats in the Vectorized<float> the x86 sum kernel runs on */
#define TS_ILP 4    /* vectors in flight (row_sum's ilp_factor) */
#define TS_LEVELS 4 /* multi_row_sum's cascade levels */

static int64_t ts_ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll((unsigned long long)(x - 1)); }

/* multi_row_sum: `size` groups of TS_ILP elements of W lanes (element (i, k) at a + (i*TS_ILP + k)*W) */
static void ts_multi_row_sum(const float* a, int64_t size, int W, float out[TS_ILP][TS_W]) {
    int64_t lp = ts_ceil_log2(size) / TS_LEVELS;
    if (lp < 4) lp = 4;
    const int64_t step = (int64_t)1 << lp, mask = step - 1;
    float acc[TS_LEVELS][TS_ILP][TS_W];
    memset(acc, 0, sizeof acc);
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int k = 0; k < TS_ILP; k++)
                for (int l = 0; l < W; l++) acc[0][k][l] += a[(i * TS_ILP + k) * W + l];
        for (int j = 1; j < TS_LEVELS; ++j) {
            for (int k = 0; k < TS_ILP; k++)
                for (int l = 0; l < W; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (j * lp))) != 0) break;
        }
    }
    for (; i < size; ++i)
        for (int k = 0; k < TS_ILP; k++)
            for (int l = 0; l < W; l++) acc[0][k][l] += a[(i * TS_ILP + k) * W + l];
    for (int j = 1; j < TS_LEVELS; ++j)
        for (int k = 0; k < TS_ILP; k++)
            for (int l = 0; l < W; l++) acc[0][k][l] += acc[j][k][l];
    memcpy(out, acc[0], sizeof acc[0]);
}

/* row_sum: n elements of W lanes -> W lane sums */
static void ts_row_sum(const float* a, int64_t n, int W, float res[TS_W]) {
    const int64_t n_ilp = n / TS_ILP;
    float part[TS_ILP][TS_W];
    ts_multi_row_sum(a, n_ilp, W, part);
    for (int64_t i = n_ilp * TS_ILP; i < n; ++i)
        for (int l = 0; l < W; l++) part[0][l] += a[i * W + l];
    for (int k = 1; k < TS_ILP; ++k)
        for (int l = 0; l < W; l++) part[0][l] += part[k][l];
    memcpy(res, part[0], sizeof part[0]);
}

static float torch_row_sum(const float* a, int64_t n) {
    float v[TS_W];
    if (n < TS_W) { /* scalar_inner_sum */
        ts_row_sum(a, n, 1, v);
        return v[0];
    }
    const int64_t nv = n / TS_W; /* vectorized_inner_sum */
    ts_row_sum(a, nv, TS_W, v);
    float acc = 0.0f;
    for (int64_t k = nv * TS_W; k < n; ++k) acc += a[k];
    for (int l = 0; l < TS_W; l++) acc += v[l];
    return acc;
}

/* The RMSNorm of one token into xs [K] (lowbit.formats.bitnet.rms_norm, one float32 operation
 * at a time: x.pow(2), at::sum, / K, + eps, 1 / sqrt, x * r, * g). */
static void rms_norm_token(const lb_bitnet_weight* w, const float* x, float* xs) {
    const int64_t K = w->K;
    for (int64_t k = 0; k < K; k++) xs[k] = x[k] * x[k];
    const float mean = torch_row_sum(xs, K) / (float)K;
    const float r = 1.0f / sqrtf(mean + w->norm_eps);
    const float* g = w->norm_weight;
    if (g)
        for (int64_t k = 0; k < K; k++) {
            const float t = x[k] * r;
            xs[k] = t * g[k];
        }
    else
        for (int64_t k = 0; k < K; k++) xs[k] = x[k] * r;
}

/* ------------------------------------------------------------------------------------------ */
/* activation codes: a [K] -> q [Kp] (natural column order, zero past K), Q = sum q, gamma.     */
/* Each returns 1 (and writes nothing) when a holds a NaN or an infinity.                       */
static inline float round_even(float v) { /* exact for |v| < 2^22 in the default rounding mode */
    const float magic = 12582912.0f;     /* 1.5 * 2^23 */
    volatile float t = v + magic;        /* volatile: keep the two float32 roundings as written */
    return t - magic;
}

static int quant_scalar(const float* a, int64_t K, int8_t* q, int64_t Kp, float* gamma, int32_t* qsum) {
    float g = 0.0f;
    int bad = 0;
    for (int64_t k = 0; k < K; k++) {
        const float v = fabsf(a[k]);
        bad |= !(v <= FLT_MAX);
        g = v > g ? v : g;
    }
    if (bad) return 1;
    g = g < BN_EPS ? BN_EPS : g;
    int32_t s = 0;
    for (int64_t k = 0; k < K; k++) {
        const float t = (a[k] * 127.0f) / g;
        float v = round_even(t);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[k] = (int8_t)v;
        s += q[k];
    }
    for (int64_t k = K; k < Kp; k++) q[k] = 0;
    *gamma = g;
    *qsum = s;
    return 0;
}

#if LB_X86
#define TV __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TV_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"), always_inline)) static inline
#define T2 __attribute__((target("avx2,fma,f16c")))
#define T2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

TV static int quant_vnni(const float* a, int64_t K, int8_t* q, int64_t Kp, float* gamma, int32_t* qsum) {
    const __m512 fmax = _mm512_set1_ps(FLT_MAX);
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    int64_t k = 0;
    for (; k < K; k += 16) {
        const __mmask16 km = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(km, a + k));
        bad |= _mm512_cmp_ps_mask(v, fmax, _CMP_NLE_UQ); /* NaN or infinite */
        mx = _mm512_max_ps(mx, v);
    }
    if (bad) return 1;
    float g = _mm512_reduce_max_ps(mx);
    g = g < BN_EPS ? BN_EPS : g;
    const __m512 vg = _mm512_set1_ps(g), c127 = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    __m512i s = _mm512_setzero_si512();
    for (k = 0; k < K; k += 16) {
        const __mmask16 km = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 t = _mm512_div_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(km, a + k), c127), vg);
        t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        t = _mm512_min_ps(_mm512_max_ps(t, lo), c127);
        const __m512i i = _mm512_cvtps_epi32(t);
        s = _mm512_add_epi32(s, i);
        _mm512_mask_cvtepi32_storeu_epi8(q + k, km, i);
    }
    for (k = K; k < Kp; k++) q[k] = 0;
    *gamma = g;
    *qsum = _mm512_reduce_add_epi32(s);
    return 0;
}

T2 static int quant_avx2(const float* a, int64_t K, int8_t* q, int64_t Kp, float* gamma, int32_t* qsum) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), fmax = _mm256_set1_ps(FLT_MAX);
    __m256 mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 v = _mm256_and_ps(_mm256_loadu_ps(a + k), absm);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, fmax, _CMP_NLE_UQ));
        mx = _mm256_max_ps(mx, v);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float g = _mm_cvtss_f32(h);
    int nf = _mm256_movemask_ps(bad);
    for (; k < K; k++) {
        const float v = fabsf(a[k]);
        nf |= !(v <= FLT_MAX);
        g = v > g ? v : g;
    }
    if (nf) return 1;
    g = g < BN_EPS ? BN_EPS : g;
    const __m256 vg = _mm256_set1_ps(g), c127 = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    __m256i s = _mm256_setzero_si256();
    for (k = 0; k + 8 <= K; k += 8) {
        __m256 t = _mm256_div_ps(_mm256_mul_ps(_mm256_loadu_ps(a + k), c127), vg);
        t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        t = _mm256_min_ps(_mm256_max_ps(t, lo), c127);
        const __m256i i = _mm256_cvtps_epi32(t);
        s = _mm256_add_epi32(s, i);
        const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i*)(q + k), _mm_packs_epi16(p16, p16));
    }
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    int32_t qs = _mm_cvtsi128_si32(s4);
    for (; k < K; k++) {
        const float t = (a[k] * 127.0f) / g;
        float v = round_even(t);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[k] = (int8_t)v;
        qs += q[k];
    }
    for (k = K; k < Kp; k++) q[k] = 0;
    *gamma = g;
    *qsum = qs;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* the permutation: natural codes q [NC * V * S] -> stream order xp (chunk c, stream j, byte i
 * at xp[(c*S + j)*V + i] = q[(c*V + i)*S + j])                                                 */
TV static void permute_vnni(const int8_t* q, int64_t NC, int S, int8_t* xp) {
    if (S == 4) {
        /* 64 codes = 16 byte positions x 4 streams: gather byte j of every dword per 128-bit
         * lane, then dword j of every lane: 128-bit lane j = stream j */
        const __m512i sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
        const __m512i pm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        for (int64_t c = 0; c < NC; c++)
            for (int p = 0; p < 4; p++) {
                __m512i v = _mm512_loadu_si512(q + c * 256 + p * 64);
                v = _mm512_permutexvar_epi32(pm, _mm512_shuffle_epi8(v, sh));
                int8_t* o = xp + c * 256 + p * 16;
                _mm_storeu_si128((__m128i*)o, _mm512_castsi512_si128(v));
                _mm_storeu_si128((__m128i*)(o + 64), _mm512_extracti32x4_epi32(v, 1));
                _mm_storeu_si128((__m128i*)(o + 128), _mm512_extracti32x4_epi32(v, 2));
                _mm_storeu_si128((__m128i*)(o + 192), _mm512_extracti32x4_epi32(v, 3));
            }
        return;
    }
    /* S == 8: 64 codes = 8 byte positions x 8 streams: pair byte j of the two qwords of each
     * lane (word j), then word j of every lane: qword j = stream j */
    const __m512i sh = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15));
    static const int16_t pm16[32] = {0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27,
                                     4, 12, 20, 28, 5, 13, 21, 29, 6, 14, 22, 30, 7, 15, 23, 31};
    const __m512i pm = _mm512_loadu_si512(pm16); /* word 4j + l <- word 8l + j */
    for (int64_t c = 0; c < NC; c++)
        for (int p = 0; p < 8; p++) {
            __m512i v = _mm512_loadu_si512(q + c * 512 + p * 64);
            v = _mm512_permutexvar_epi16(pm, _mm512_shuffle_epi8(v, sh));
            int8_t* o = xp + c * 512 + p * 8;
            __m128i l0 = _mm512_castsi512_si128(v), l1 = _mm512_extracti32x4_epi32(v, 1),
                    l2 = _mm512_extracti32x4_epi32(v, 2), l3 = _mm512_extracti32x4_epi32(v, 3);
            _mm_storel_epi64((__m128i*)o, l0);
            _mm_storel_epi64((__m128i*)(o + 64), _mm_unpackhi_epi64(l0, l0));
            _mm_storel_epi64((__m128i*)(o + 128), l1);
            _mm_storel_epi64((__m128i*)(o + 192), _mm_unpackhi_epi64(l1, l1));
            _mm_storel_epi64((__m128i*)(o + 256), l2);
            _mm_storel_epi64((__m128i*)(o + 320), _mm_unpackhi_epi64(l2, l2));
            _mm_storel_epi64((__m128i*)(o + 384), l3);
            _mm_storel_epi64((__m128i*)(o + 448), _mm_unpackhi_epi64(l3, l3));
        }
}

T2 static void permute_avx2(const int8_t* q, int64_t NC, int S, int8_t* xp) {
    if (S == 4) {
        /* 32 codes = 8 byte positions x 4 streams: byte j of every dword per lane, then
         * dword j of both lanes: qword j = stream j */
        const __m256i sh = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        const __m256i pm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (int64_t c = 0; c < NC; c++)
            for (int p = 0; p < 4; p++) {
                __m256i v = _mm256_loadu_si256((const __m256i*)(q + c * 128 + p * 32));
                v = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(v, sh), pm);
                int8_t* o = xp + c * 128 + p * 8;
                const __m128i l0 = _mm256_castsi256_si128(v), l1 = _mm256_extracti128_si256(v, 1);
                _mm_storel_epi64((__m128i*)o, l0);
                _mm_storel_epi64((__m128i*)(o + 32), _mm_unpackhi_epi64(l0, l0));
                _mm_storel_epi64((__m128i*)(o + 64), l1);
                _mm_storel_epi64((__m128i*)(o + 96), _mm_unpackhi_epi64(l1, l1));
            }
        return;
    }
    /* S == 8: 32 codes = 4 byte positions x 8 streams: word j of each lane pairs byte j of its
     * two qwords; interleaving the two lanes' words gives dword j = stream j */
    const __m256i sh = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15,
                                        0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    for (int64_t c = 0; c < NC; c++)
        for (int p = 0; p < 8; p++) {
            const __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i*)(q + c * 256 + p * 32)), sh);
            const __m128i l0 = _mm256_castsi256_si128(v), l1 = _mm256_extracti128_si256(v, 1);
            const __m128i a = _mm_unpacklo_epi16(l0, l1), b = _mm_unpackhi_epi16(l0, l1);
            int32_t t[8];
            _mm_storeu_si128((__m128i*)t, a);
            _mm_storeu_si128((__m128i*)(t + 4), b);
            int8_t* o = xp + c * 256 + p * 4;
            for (int j = 0; j < 8; j++) memcpy(o + j * 32, t + j, 4);
        }
}
#endif /* LB_X86 */

/* ------------------------------------------------------------------------------------------ */
/* per-call data                                                                                */
typedef struct {
    int isa, bits, S;
    int64_t V, NC, Kp;   /* bytes a chunk, chunks a row, activation bytes a token (NC * V * S) */
    int64_t last;        /* bytes of a row in its last chunk (1 .. V) */
    int64_t safe_rows;   /* rows whose last chunk can be read in full without leaving the weight */
    int64_t M;
    int8_t* xp;          /* [M, Kp] codes: stream order (SIMD paths) or natural (scalar) */
    int32_t* qsum;       /* [M] Q */
    float* s;            /* [M] (beta * gamma) / 127, NaN for a non-finite token */
} bn_call;

static int setup(const lb_bitnet_weight* w, int64_t M, bn_call* A) {
    memset(A, 0, sizeof *A);
    if (!w || M < 0) return 2;
    if (w->bits != 1 && w->bits != 2) return 3;
    const int64_t K = w->K, N = w->N, rb = w->row_bytes;
    if (K <= 0 || K > BN_MAX_K || N < 0 || rb * (8 / w->bits) < K) return 2;
    A->isa = lb_bitnet_isa();
    A->bits = w->bits;
    A->S = 8 / w->bits;
    if (A->isa == LB_ISA_AVX512VNNI) /* 64-byte chunks, unless 32-byte ones leave less of the last one empty */
        A->V = (rb + 63) / 64 * 64 <= (rb + 31) / 32 * 32 ? 64 : 32;
    else
        A->V = A->isa == LB_ISA_AVX2 ? 32 : rb;
    A->NC = (rb + A->V - 1) / A->V;
    A->Kp = A->NC * A->V * A->S;
    A->last = rb - (A->NC - 1) * A->V;
    /* row r's last chunk ends at r*rb + NC*V <= N*rb */
    A->safe_rows = N * rb - A->NC * A->V < 0 ? 0 : (N * rb - A->NC * A->V) / rb + 1;
    if (A->safe_rows > N) A->safe_rows = N;
    A->M = M;
    if (M == 0) return 0;
    const size_t off_q = 0, off_s = off_q + PAD64((size_t)(M * A->Kp)), off_f = off_s + PAD64((size_t)M * 4),
                 total = off_f + PAD64((size_t)M * 4);
    uint8_t* base = (uint8_t*)lb_grow(&t_call, &t_call_n, total);
    if (!base) return 2;
    A->xp = (int8_t*)(base + off_q);
    A->qsum = (int32_t*)(base + off_s);
    A->s = (float*)(base + off_f);
    return 0;
}

/* the per-thread token buffers: normed input [K] floats, natural codes [Kp] */
static int token_buffers(const bn_call* A, int64_t K, float** xs, int8_t** q) {
    uint8_t* b = (uint8_t*)lb_grow(&t_tok, &t_tok_n, PAD64((size_t)K * 4) + PAD64((size_t)A->Kp));
    if (!b) return 2;
    *xs = (float*)b;
    *q = (int8_t*)(b + PAD64((size_t)K * 4));
    return 0;
}

/* natural codes of one token -> its slot of A->xp */
static void place(const bn_call* A, const int8_t* q, int8_t* dst) {
#if LB_X86
    if (A->isa == LB_ISA_AVX512VNNI) {
        if (A->V == 64) permute_vnni(q, A->NC, A->S, dst);
        else permute_avx2(q, A->NC, A->S, dst);
        return;
    }
    if (A->isa == LB_ISA_AVX2) { permute_avx2(q, A->NC, A->S, dst); return; }
#endif
    memcpy(dst, q, (size_t)A->Kp);
}

static int quantize_token(int isa, const float* a, int64_t K, int8_t* q, int64_t Kp, float* gamma, int32_t* qsum) {
#if LB_X86
    if (isa == LB_ISA_AVX512VNNI) return quant_vnni(a, K, q, Kp, gamma, qsum);
    if (isa == LB_ISA_AVX2) return quant_avx2(a, K, q, Kp, gamma, qsum);
#endif
    (void)isa;
    return quant_scalar(a, K, q, Kp, gamma, qsum);
}

/* one float token -> A->xp[m], A->qsum[m], A->s[m]; gamma_out (optional) gets gamma (NaN when
 * the token is not finite), codes_out (optional) the natural codes [K] */
static int prep_token(const lb_bitnet_weight* w, const bn_call* A, const float* x, int64_t m, float* gamma_out,
                      int8_t* codes_out) {
    const int64_t K = w->K;
    float* xs;
    int8_t* q;
    if (token_buffers(A, K, &xs, &q)) return 2;
    const float* a = x;
    if (w->norm) {
        rms_norm_token(w, x, xs);
        a = xs;
    }
    float g;
    int32_t qs;
    if (quantize_token(A->isa, a, K, q, A->Kp, &g, &qs)) { /* NaN or infinity: a NaN row */
        memset(q, 0, (size_t)A->Kp);
        A->qsum[m] = 0;
        A->s[m] = NAN;
        g = NAN;
    } else {
        const float bg = w->scale[0] * g;
        A->qsum[m] = qs;
        A->s[m] = bg / 127.0f;
    }
    if (gamma_out) gamma_out[m] = g;
    if (codes_out) memcpy(codes_out + m * K, q, (size_t)K);
    place(A, q, A->xp + m * A->Kp);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* integer products D = sum_k u_k q_k of RB weight rows with one token                          */
static void dot_scalar(const uint8_t* row, int64_t rb, const int8_t* q, int bits, int32_t* D) {
    int32_t acc = 0;
    if (bits == 2) {
        for (int64_t k = 0; k < rb; k++) {
            const unsigned b = row[k];
            const int8_t* a = q + 4 * k;
            acc += (int32_t)(b & 3) * a[0] + (int32_t)((b >> 2) & 3) * a[1] + (int32_t)((b >> 4) & 3) * a[2] +
                   (int32_t)(b >> 6) * a[3];
        }
    } else {
        for (int64_t k = 0; k < rb; k++) {
            const unsigned b = row[k];
            const int8_t* a = q + 8 * k;
            for (int j = 0; j < 8; j++) acc += (int32_t)((b >> j) & 1) * a[j];
        }
    }
    *D = acc;
}

#if LB_X86
/* AVX-512 VNNI. Shifts compete with vpdpbusd for the same port, so each weight vector is
 * shifted once (its high nibble) and its codes are masked in place: for 2-bit codes the masks 3
 * and 12 give u and 4u, summed into two accumulators (D_lo and 4 D_hi); for 1-bit codes the masks
 * 1, 2, 4, 8 give 2^e u, four accumulators. Each is shifted back (exact) once per row. */
TV_INLINE __m128i hsum4_512(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
    const __m512i t = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
    const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(t), _mm512_extracti64x4_epi64(t, 1));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

TV_INLINE __m128i hsum4_256(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
    const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(v0, v1), _mm256_unpackhi_epi32(v0, v1));
    const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(v2, v3), _mm256_unpackhi_epi32(v2, v3));
    const __m256i t = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
    return _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
}

#define NACC(BITS) ((BITS) == 2 ? 2 : 4)

/* one 64-byte chunk of RB rows (weights wv) against the token's streams at a */
TV_INLINE void chunk512(__m512i (*acc)[4], const __m512i* wv, const int8_t* a, const __m512i* mk, const int RB,
                        const int BITS) {
    const int NA = NACC(BITS);
    for (int i = 0; i < RB; i++) {
        const __m512i hi = _mm512_srli_epi16(wv[i], 4);
        for (int e = 0; e < NA; e++) {
            acc[i][e] = _mm512_dpbusd_epi32(acc[i][e], _mm512_and_si512(wv[i], mk[e]), _mm512_loadu_si512(a + e * 64));
            acc[i][e] = _mm512_dpbusd_epi32(acc[i][e], _mm512_and_si512(hi, mk[e]), _mm512_loadu_si512(a + (e + NA) * 64));
        }
    }
}

TV_INLINE void dot_vnni512(const uint8_t* const* p, const int8_t* xp, const bn_call* A, const int RB, const int BITS,
                           int32_t* D) {
    const int S = 8 / BITS, NA = NACC(BITS);
    __m512i mk[4], acc[4][4], wv[4];
    for (int e = 0; e < NA; e++) mk[e] = _mm512_set1_epi8((char)(((1 << BITS) - 1) << (e * BITS)));
    for (int i = 0; i < RB; i++)
        for (int e = 0; e < NA; e++) acc[i][e] = _mm512_setzero_si512();
    const int64_t NC = A->NC;
    int64_t c = 0;
    for (; c + 1 < NC; c++) {
        for (int i = 0; i < RB; i++) {
#if BN_PREFETCH
            _mm_prefetch((const char*)(p[i] + c * 64 + BN_PREFETCH), _MM_HINT_T0);
#endif
            wv[i] = _mm512_loadu_si512(p[i] + c * 64);
        }
        chunk512(acc, wv, xp + c * S * 64, mk, RB, BITS);
    }
    const __mmask64 km = A->last >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << A->last) - 1);
    for (int i = 0; i < RB; i++) wv[i] = _mm512_maskz_loadu_epi8(km, p[i] + c * 64);
    chunk512(acc, wv, xp + c * S * 64, mk, RB, BITS);
    __m512i v[4];
    for (int i = 0; i < RB; i++) {
        v[i] = acc[i][0];
        for (int e = 1; e < NA; e++) v[i] = _mm512_add_epi32(v[i], _mm512_srai_epi32(acc[i][e], e * BITS));
    }
    if (RB == 4) {
        _mm_storeu_si128((__m128i*)D, hsum4_512(v[0], v[1], v[2], v[3]));
    } else {
        for (int i = 0; i < RB; i++) D[i] = _mm512_reduce_add_epi32(v[i]);
    }
}

TV_INLINE void chunk256(__m256i (*acc)[4], const __m256i* wv, const int8_t* a, const __m256i* mk, const int RB,
                        const int BITS) {
    const int NA = NACC(BITS);
    for (int i = 0; i < RB; i++) {
        const __m256i hi = _mm256_srli_epi16(wv[i], 4);
        for (int e = 0; e < NA; e++) {
            acc[i][e] = _mm256_dpbusd_epi32(acc[i][e], _mm256_and_si256(wv[i], mk[e]),
                                            _mm256_loadu_si256((const __m256i*)(a + e * 32)));
            acc[i][e] = _mm256_dpbusd_epi32(acc[i][e], _mm256_and_si256(hi, mk[e]),
                                            _mm256_loadu_si256((const __m256i*)(a + (e + NA) * 32)));
        }
    }
}

TV_INLINE void dot_vnni256(const uint8_t* const* p, const int8_t* xp, const bn_call* A, const int RB, const int BITS,
                           int32_t* D) {
    const int S = 8 / BITS, NA = NACC(BITS);
    __m256i mk[4], acc[4][4], wv[4];
    for (int e = 0; e < NA; e++) mk[e] = _mm256_set1_epi8((char)(((1 << BITS) - 1) << (e * BITS)));
    for (int i = 0; i < RB; i++)
        for (int e = 0; e < NA; e++) acc[i][e] = _mm256_setzero_si256();
    const int64_t NC = A->NC;
    int64_t c = 0;
    for (; c + 1 < NC; c++) {
        for (int i = 0; i < RB; i++) {
#if BN_PREFETCH
            if (!(c & 1)) _mm_prefetch((const char*)(p[i] + c * 32 + BN_PREFETCH), _MM_HINT_T0);
#endif
            wv[i] = _mm256_loadu_si256((const __m256i*)(p[i] + c * 32));
        }
        chunk256(acc, wv, xp + c * S * 32, mk, RB, BITS);
    }
    const __mmask32 km = A->last >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << A->last) - 1);
    for (int i = 0; i < RB; i++) wv[i] = _mm256_maskz_loadu_epi8(km, p[i] + c * 32);
    chunk256(acc, wv, xp + c * S * 32, mk, RB, BITS);
    __m256i v[4];
    for (int i = 0; i < RB; i++) {
        v[i] = acc[i][0];
        for (int e = 1; e < NA; e++) v[i] = _mm256_add_epi32(v[i], _mm256_srai_epi32(acc[i][e], e * BITS));
    }
    if (RB == 4) {
        _mm_storeu_si128((__m128i*)D, hsum4_256(v[0], v[1], v[2], v[3]));
    } else {
        for (int i = 0; i < RB; i++) {
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v[i]), _mm256_extracti128_si256(v[i], 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            D[i] = _mm_cvtsi128_si32(s4);
        }
    }
}


/* AVX2: 32-byte chunks; int16 sums over BN_FLUSH chunks, then widened with vpmaddwd */
T2_INLINE __m256i load_last32(const uint8_t* p, int64_t n, int full) {
    if (full) return _mm256_loadu_si256((const __m256i*)p);
    uint8_t t[32] = {0};
    for (int64_t k = 0; k < n; k++) t[k] = p[k];
    return _mm256_loadu_si256((const __m256i*)t);
}

T2_INLINE void chunk_avx2(__m256i* a16, const __m256i* wv, const int8_t* a, const int RB, const int BITS) {
    const int S = 8 / BITS;
    const __m256i mask = _mm256_set1_epi8((char)((1 << BITS) - 1));
    for (int i = 0; i < RB; i++) {
        __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(wv[i], mask), _mm256_loadu_si256((const __m256i*)a));
        for (int j = 1; j < S; j++) {
            const __m256i u = _mm256_and_si256(_mm256_srli_epi16(wv[i], j * BITS), mask);
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i*)(a + j * 32))));
        }
        a16[i] = _mm256_add_epi16(a16[i], s);
    }
}

T2_INLINE void dot_avx2(const uint8_t* const* p, const int8_t* xp, const bn_call* A, const int RB, const int BITS,
                        int safe, int32_t* D) {
    const int S = 8 / BITS;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4], a16[4], wv[4];
    for (int i = 0; i < RB; i++) acc[i] = a16[i] = _mm256_setzero_si256();
    const int64_t NC = A->NC;
    int64_t c = 0;
    for (; c + 1 < NC; c++) {
        for (int i = 0; i < RB; i++) {
#if BN_PREFETCH
            if (!(c & 1)) _mm_prefetch((const char*)(p[i] + c * 32 + BN_PREFETCH), _MM_HINT_T0);
#endif
            wv[i] = _mm256_loadu_si256((const __m256i*)(p[i] + c * 32));
        }
        chunk_avx2(a16, wv, xp + c * S * 32, RB, BITS);
        if ((c + 1) % BN_FLUSH == 0)
            for (int i = 0; i < RB; i++) {
                acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(a16[i], ones));
                a16[i] = _mm256_setzero_si256();
            }
    }
    for (int i = 0; i < RB; i++) wv[i] = load_last32(p[i] + c * 32, A->last, safe);
    chunk_avx2(a16, wv, xp + c * S * 32, RB, BITS);
    for (int i = 0; i < RB; i++) {
        const __m256i v = _mm256_add_epi32(acc[i], _mm256_madd_epi16(a16[i], ones));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        D[i] = _mm_cvtsi128_si32(s4);
    }
}
#endif /* LB_X86 */

/* ------------------------------------------------------------------------------------------ */
/* rows [r0, r1) x tokens [m0, m1): acc (int32 [M, N]) or y (float [M, N])                      */
typedef struct {
    const lb_bitnet_weight* w;
    const bn_call* A;
    const float* bias;
    float* y;
    int32_t* acc;
} bn_out;

static inline void finish(const bn_out* o, int64_t r, int64_t m, int32_t d) {
    const bn_call* A = o->A;
    const int32_t t = A->bits == 2 ? d - A->qsum[m] : 2 * d - A->qsum[m];
    const int64_t N = o->w->N;
    if (o->acc) {
        o->acc[m * N + r] = t;
        return;
    }
    float v = (float)t * A->s[m]; /* NaN for a non-finite token */
    if (o->bias) v = v + o->bias[r];
    o->y[m * N + r] = v;
}

#define ROWS_FN(NAME, ATTR, DOT, BITS)                                                                 \
    ATTR static void NAME(const bn_out* o, int64_t r0, int64_t r1, int64_t m0, int64_t m1) {          \
        const lb_bitnet_weight* w = o->w;                                                             \
        const bn_call* A = o->A;                                                                      \
        const int64_t rb = w->row_bytes;                                                              \
        int64_t r = r0;                                                                               \
        for (; r + 4 <= r1; r += 4) {                                                                 \
            const uint8_t* p[4] = {w->qw + r * rb, w->qw + (r + 1) * rb, w->qw + (r + 2) * rb,        \
                                   w->qw + (r + 3) * rb};                                             \
            const int safe = r + 4 <= A->safe_rows;                                                   \
            (void)safe;                                                                               \
            for (int64_t m = m0; m < m1; m++) {                                                       \
                int32_t D[4];                                                                         \
                DOT(p, A->xp + m * A->Kp, A, 4, BITS, D);                                             \
                for (int i = 0; i < 4; i++) finish(o, r + i, m, D[i]);                                \
            }                                                                                         \
        }                                                                                             \
        for (; r < r1; r++) {                                                                         \
            const uint8_t* p[1] = {w->qw + r * rb};                                                   \
            const int safe = r + 1 <= A->safe_rows;                                                   \
            (void)safe;                                                                               \
            for (int64_t m = m0; m < m1; m++) {                                                       \
                int32_t D[1];                                                                         \
                DOT(p, A->xp + m * A->Kp, A, 1, BITS, D);                                             \
                finish(o, r, m, D[0]);                                                                \
            }                                                                                         \
        }                                                                                             \
    }

#if LB_X86
#define DOT_VNNI512(p, xp, A, RB, BITS, D) dot_vnni512(p, xp, A, RB, BITS, D)
#define DOT_VNNI256(p, xp, A, RB, BITS, D) dot_vnni256(p, xp, A, RB, BITS, D)
#define DOT_AVX2(p, xp, A, RB, BITS, D) dot_avx2(p, xp, A, RB, BITS, safe, D)
ROWS_FN(rows_vnni512_2, TV, DOT_VNNI512, 2)
ROWS_FN(rows_vnni512_1, TV, DOT_VNNI512, 1)
ROWS_FN(rows_vnni256_2, TV, DOT_VNNI256, 2)
ROWS_FN(rows_vnni256_1, TV, DOT_VNNI256, 1)
ROWS_FN(rows_avx2_2, T2, DOT_AVX2, 2)
ROWS_FN(rows_avx2_1, T2, DOT_AVX2, 1)
#endif

static void rows_scalar(const bn_out* o, int64_t r0, int64_t r1, int64_t m0, int64_t m1) {
    const lb_bitnet_weight* w = o->w;
    const bn_call* A = o->A;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t m = m0; m < m1; m++) {
            int32_t d;
            dot_scalar(w->qw + r * w->row_bytes, w->row_bytes, A->xp + m * A->Kp, A->bits, &d);
            finish(o, r, m, d);
        }
}

typedef void (*rows_fn)(const bn_out*, int64_t, int64_t, int64_t, int64_t);

static void product(const bn_out* o, int nthreads) {
    const bn_call* A = o->A;
    const int64_t N = o->w->N, M = A->M;
    rows_fn fn = rows_scalar;
#if LB_X86
    if (A->isa == LB_ISA_AVX512VNNI && A->V == 64) fn = A->bits == 2 ? rows_vnni512_2 : rows_vnni512_1;
    else if (A->isa == LB_ISA_AVX512VNNI) fn = A->bits == 2 ? rows_vnni256_2 : rows_vnni256_1;
    else if (A->isa == LB_ISA_AVX2) fn = A->bits == 2 ? rows_avx2_2 : rows_avx2_1;
#endif
    const int64_t wbytes = N * o->w->row_bytes * (M < 8 ? 1 : M / 8);
    const int nt = pick_threads(nthreads, wbytes, N > M ? N : M);
    if (nt <= 1) {
        fn(o, 0, N, 0, M);
        return;
    }
    /* split the output rows (in quads); tokens instead when there are too few row quads */
    const int by_tokens = (N + 3) / 4 < nt && M >= nt;
#pragma omp parallel num_threads(nt)
    {
        int64_t a0, a1;
        if (by_tokens) {
            thread_rows(M, nt, omp_get_thread_num(), 1, &a0, &a1);
            if (a0 < a1) fn(o, 0, N, a0, a1);
        } else {
            thread_rows(N, nt, omp_get_thread_num(), 4, &a0, &a1);
            if (a0 < a1) fn(o, a0, a1, 0, M);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* entry points                                                                                 */
static int prep_tokens(const lb_bitnet_weight* w, const bn_call* A, const float* x, int nthreads, float* gamma_out,
                       int8_t* codes_out) {
    const int64_t M = A->M, K = w->K;
    int nt = nthreads < 1 ? 1 : nthreads;
    if (nt > M) nt = (int)M;
    if (M * K < 32768) nt = 1; /* a few small tokens: waking threads costs more than it saves */
    int bad = 0;
    if (nt <= 1) {
        for (int64_t m = 0; m < M && !bad; m++) bad = prep_token(w, A, x + m * K, m, gamma_out, codes_out);
        return bad;
    }
#pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
    for (int64_t m = 0; m < M; m++) bad |= prep_token(w, A, x + m * K, m, gamma_out, codes_out);
    return bad;
}

/* y [M, N] = the BitNet layer of x [M, K] (+ bias [N]) */
int lb_bitnet_linear_w(const lb_bitnet_weight* w, const float* x, int64_t M, const float* bias, float* y,
                       int nthreads) {
    bn_call A;
    int rc = setup(w, M, &A);
    if (rc) return rc;
    if (M == 0 || w->N == 0) return 0;
    if (!x || !y || !w->qw || !w->scale || (w->norm_weight && !w->norm)) return 2;
    if (prep_tokens(w, &A, x, nthreads, NULL, NULL)) return 2;
    const bn_out o = {w, &A, bias, y, NULL};
    product(&o, nthreads);
    return 0;
}

/* acc [M, N] = W~ q for int8 codes q [M, K] (the integer product alone, on the path in use) */
int lb_bitnet_int_product(const lb_bitnet_weight* w, const int8_t* q, int64_t M, int32_t* acc, int nthreads) {
    bn_call A;
    int rc = setup(w, M, &A);
    if (rc) return rc;
    if (M == 0 || w->N == 0) return 0;
    if (!q || !acc || !w->qw) return 2;
    const int64_t K = w->K;
    for (int64_t m = 0; m < M; m++) {
        float* xs;
        int8_t* t;
        if (token_buffers(&A, K, &xs, &t)) return 2;
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += (t[k] = q[m * K + k]);
        for (int64_t k = K; k < A.Kp; k++) t[k] = 0;
        A.qsum[m] = s;
        A.s[m] = 1.0f;
        place(&A, t, A.xp + m * A.Kp);
    }
    const bn_out o = {w, &A, NULL, NULL, acc};
    product(&o, nthreads);
    return 0;
}

/* the activation codes [M, K] and gamma [M] of x (after the norm when w has one) */
int lb_bitnet_quantize(const lb_bitnet_weight* w, const float* x, int64_t M, int8_t* q, float* gamma) {
    bn_call A;
    int rc = setup(w, M, &A);
    if (rc) return rc;
    if (M == 0) return 0;
    if (!x || !q || !gamma || !w->scale) return 2;
    return prep_tokens(w, &A, x, 1, gamma, q);
}
