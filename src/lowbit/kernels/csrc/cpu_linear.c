/* Fast CPU linear layers y = x W^T + b on packed weights, fp32 activations.
 *
 * Formats (read in their stored layout, never copied):
 *   affine  codes u (2 to 8 bits, packed row by row as lowbit.core.packing does: for 2, 4, 8 bits
 *           byte k of a row holds codes k*(8/b) .. k*(8/b)+8/b-1, code j at bit j*b; for 3, 5, 6, 7
 *           bits a run of 8 codes is one little-endian integer of b bytes), one scale per group of
 *           G consecutive input columns (fp16 or fp32), zero-point per group: packed integer
 *           (same bit width), float (fp16/fp32), or a constant (symmetric: the code offset).
 *           W[r, c] = s * (u - z), computed as fma(u, s, -(z*s)).
 *           Ternary weights are this with b = 2, z = 1 and one fp32 scale per row or tensor.
 *   nf4     bitsandbytes layout: the weight flattened row-major, two codes per byte (first one in
 *           the high nibble), one absmax per block of `bs` values, optionally double-quantized
 *           (absmax = DYN[k] * nested[b / dqbs] + offset).  W = NF4[code] * absmax.
 *
 * Batch-1 and small batches run a fused kernel: each weight row is unpacked and dequantized
 * once in registers and multiplied with up to MB activation rows at a time.  The activations
 * are first rearranged (per call, O(M*K)) so that the codes of one byte position land in the
 * same SIMD lane: for a block of V bytes (one SIMD load) and s = 8/b codes per byte, stream j
 * of the block holds x[block*V*s + k*s + j] for k = 0..V-1.  Unpacking is then a shift and a
 * mask per stream, no shuffles.  Groups must be multiples of V*s codes for the SIMD paths
 * (the scalar path takes any group size); the last group of a row may be shorter.
 *
 * Instruction sets are chosen at run time (lb_cpu_linear_isa): AVX-512 (F+BW+VL) 16 lanes, AVX2+FMA+F16C
 * 8 lanes, portable scalar C otherwise.  Functions return 0 when they computed y, a positive
 * code when the case is not supported (the caller then runs the reference path).
 */
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

#define LB_SCALAR LB_ISA_SCALAR
#define LB_AVX2 LB_ISA_AVX2
#define LB_AVX512 LB_ISA_AVX512

/* ------------------------------------------------------------------------------------------ */
/* run-time dispatch: lb_cpu_linear_isa() (lb_common.h), lowered by lb_cpu_linear_set_isa     */
LB_ISA_EXPORTS(cpu_linear, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2) | LB_PATH(LB_ISA_AVX512))

/* Calls that read fewer bytes of weights than this run on one thread (lb_common.h). */
void lb_cpu_linear_set_min_parallel_bytes(int64_t n) { g_min_parallel_bytes = n; }

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                     */

typedef struct {
    const float* x;      /* [M, K] */
    int64_t M, K, N;
    const uint8_t* qw;   /* [N, row_bytes] */
    int64_t row_bytes;
    int bits;
    const void* scales;  /* [N or 1, n_groups] */
    int scales_f16;
    int64_t s_stride;    /* scales/zeros row stride in elements (0: one row for all) */
    int64_t G, n_groups;
    const uint8_t* qz;   /* packed integer zero-points or NULL */
    int64_t qz_stride;   /* bytes per row of qz (0: one row for all) */
    const void* fz;      /* float zero-points or NULL */
    int fz_f16;
    float zconst;
    const float* bias;
    float* y;            /* [M, N] */
} affine_args;

static inline float affine_zero(const affine_args* a, int64_t r, int64_t g) {
    if (a->qz) return (float)lb_code_at(a->qz + r * a->qz_stride, a->bits, g);  /* same packing as the codes */
    if (a->fz) return ld_f(a->fz, a->fz_f16, r * a->s_stride + g);
    return a->zconst;
}

/* Per-thread scratch for the rearranged activations (grows, never shrinks). */
static _Thread_local float* t_scratch = NULL;
static _Thread_local int64_t t_scratch_n = 0;

static float* scratch(int64_t n) {
    if (n > t_scratch_n) {
        free(t_scratch);
        t_scratch = (float*)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
        t_scratch_n = t_scratch ? n : 0;
    }
    return t_scratch;
}

/* xp[m, blk*cpi + j*V + k] = x[m, blk*cpi + k*s + j] (0 beyond K); cpi = V*s. */
static void rearrange(const float* x, int64_t M, int64_t K, int V, int s, float* xp, int64_t Kp) {
    int cpi = V * s;
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        float* o = xp + m * Kp;
        for (int64_t b = 0; b < Kp / cpi; b++) {
            int64_t base = b * cpi;
            if (base + cpi <= K) {
                for (int k = 0; k < V; k++)
                    for (int j = 0; j < s; j++) o[base + j * V + k] = xr[base + k * s + j];
            } else {
                for (int k = 0; k < V; k++)
                    for (int j = 0; j < s; j++) {
                        int64_t c = base + k * s + j;
                        o[base + j * V + k] = c < K ? xr[c] : 0.0f;
                    }
            }
        }
    }
}


/* ------------------------------------------------------------------------------------------ */
/* scalar path: any group size, any K                                                          */
static void affine_rows_scalar(const affine_args* a, int64_t r0, int64_t r1) {
    const int64_t K = a->K, N = a->N, M = a->M;
    float acc[8];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* row = a->qw + r * a->row_bytes;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            int mb = (int)(M - m0 < 8 ? M - m0 : 8);
            for (int i = 0; i < mb; i++) acc[i] = 0.0f;
            for (int64_t g = 0; g < a->n_groups; g++) {
                float s = ld_f(a->scales, a->scales_f16, r * a->s_stride + g);
                float nz = -(affine_zero(a, r, g) * s);
                int64_t c0 = g * a->G, c1 = c0 + a->G < K ? c0 + a->G : K;
                for (int64_t c = c0; c < c1; c++) {
                    float w = (float)lb_code_at(row, a->bits, c) * s + nz;
                    for (int i = 0; i < mb; i++) acc[i] += w * a->x[(m0 + i) * K + c];
                }
            }
            for (int i = 0; i < mb; i++) a->y[(m0 + i) * N + r] = acc[i] + (a->bias ? a->bias[r] : 0.0f);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX2 path: V = 8 bytes per load, 8 fp32 lanes                                              */
#if LB_X86
#define T2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

T2 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T2 __m256i load8_u8(const uint8_t* p, int64_t avail) {
    if (avail >= 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    uint64_t t = 0;
    memcpy(&t, p, (size_t)avail);
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)t));
}


/* ------------------------------------------------------------------------------------------ */
/* AVX-512 path: V = 16 bytes per load, 16 fp32 lanes                                         */
#define T5 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), always_inline)) static inline

T5 __m512i load16_u8(const uint8_t* p, int64_t avail) {
    if (avail >= 16) return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    __mmask16 k = (__mmask16)((1u << avail) - 1u);
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, p));
}

#endif /* LB_X86 */

/* ------------------------------------------------------------------------------------------ */
/* batch-1 kernels (GEMV), factorised per group:                                               */
/*   y[r] = sum_g s_g * (sum_{c in g} u_c x_c)  -  sum_g s_g z_g xsum_g  + b[r]                 */
/* Per row, a scalar pre-pass converts the row's scales and forms the zero-point term; the     */
/* vector loop then only accumulates (u - 2^(b-1)) * x per group, two rows at a time.          */
#if LB_X86
T2 void halves_to_floats(const uint16_t* h, float* f, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
    for (; i < n; i++) f[i] = _cvtsh_ss(h[i]);
}

T2 float affine_row_prepass(const affine_args* a, int64_t r, const float* xsum, float* sc) {
    float zt = 0.0f;
    const int64_t ng = a->n_groups;
    if (a->scales_f16) {
        halves_to_floats((const uint16_t*)a->scales + r * a->s_stride, sc, ng);
    } else {
        memcpy(sc, (const float*)a->scales + r * a->s_stride, (size_t)ng * sizeof(float));
    }
    /* the vector loop multiplies the centred codes u - mid (small, so that little cancels) */
    const float mid = (float)(1 << (a->bits - 1));
    if (!a->qz && !a->fz) {
        for (int64_t g = 0; g < ng; g++) zt += sc[g] * xsum[g];
        return zt * (a->zconst - mid);
    }
    for (int64_t g = 0; g < ng; g++) zt += ((affine_zero(a, r, g) - mid) * sc[g]) * xsum[g];
    return zt;
}

/* AVX-512: stream J of the codes as floats u - 2^(b-1), without a conversion instruction:
 * OR-ing u (< 2^23) into the mantissa of 2^23 gives the float 2^23 + u exactly (one ternary-logic
 * op does the mask and the OR), and subtracting 2^23 + 2^(b-1) is exact. */
#define GEMV_W_AVX512(BITS, v, J) _mm512_sub_ps(_mm512_castsi512_ps( \
    (BITS == 8 ? _mm512_or_si512(v, magic) \
               : ((J) == 8 / BITS - 1 ? _mm512_or_si512(_mm512_srli_epi32(v, (J) * BITS), magic) \
                                      : _mm512_ternarylogic_epi32(_mm512_srli_epi32(v, (J) * BITS), mask, magic, 0xEA)))), \
    magic_mid)

T5 void affine_gemv_avx512(const affine_args* a, const float* xp, const float* xsum, float* sc0, float* sc1,
                           int64_t r, const int RB, const int BITS) {
    const int S = 8 / BITS, CPI = 16 * S;
    const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1), magic = _mm512_set1_epi32(0x4B000000);
    const __m512 magic_mid = _mm512_set1_ps(8388608.0f + (float)(1 << (BITS - 1)));
    const int64_t K = a->K, G = a->G, rb = a->row_bytes;
    float z0 = affine_row_prepass(a, r, xsum, sc0), z1 = 0.0f;
    if (RB == 2) z1 = affine_row_prepass(a, r + 1, xsum, sc1);
    const uint8_t* p0 = a->qw + r * rb;
    const uint8_t* p1 = p0 + rb;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc0b = _mm512_setzero_ps(), acc1b = _mm512_setzero_ps();
    int64_t g = 0;
    if (G == CPI && K / G > 1) {  /* one block per group (4-bit g32): a product chain per group */
        const int64_t nfull = K / G;
        for (; g < nfull; g++) {
            const float* xb = xp + g * CPI;
            __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p0 + g * 16)));
            __m512i v1 = _mm512_setzero_si512();
            if (RB == 2) v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p1 + g * 16)));
            __m512 x0 = _mm512_loadu_ps(xb);
            __m512 t0 = _mm512_mul_ps(GEMV_W_AVX512(BITS, v0, 0), x0), t1 = _mm512_setzero_ps();
            if (RB == 2) t1 = _mm512_mul_ps(GEMV_W_AVX512(BITS, v1, 0), x0);
            for (int j = 1; j < S; j++) {
                __m512 xj = _mm512_loadu_ps(xb + j * 16);
                t0 = _mm512_fmadd_ps(GEMV_W_AVX512(BITS, v0, j), xj, t0);
                if (RB == 2) t1 = _mm512_fmadd_ps(GEMV_W_AVX512(BITS, v1, j), xj, t1);
            }
            if (g & 1) {
                acc0b = _mm512_fmadd_ps(t0, _mm512_set1_ps(sc0[g]), acc0b);
                if (RB == 2) acc1b = _mm512_fmadd_ps(t1, _mm512_set1_ps(sc1[g]), acc1b);
            } else {
                acc0 = _mm512_fmadd_ps(t0, _mm512_set1_ps(sc0[g]), acc0);
                if (RB == 2) acc1 = _mm512_fmadd_ps(t1, _mm512_set1_ps(sc1[g]), acc1);
            }
        }
    }
    if (G % CPI == 0) {  /* full groups: whole blocks inside the row, no bounds to check */
        const int64_t nbg = G / CPI, nfull = K / G;
        for (; g < nfull; g++) {
            __m512 t0a = _mm512_setzero_ps(), t0b = _mm512_setzero_ps();
            __m512 t1a = _mm512_setzero_ps(), t1b = _mm512_setzero_ps();
            for (int64_t blk = g * nbg; blk < (g + 1) * nbg; blk++) {
                const float* xb = xp + blk * CPI;
                __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p0 + blk * 16)));
                __m512i v1 = _mm512_setzero_si512();
                if (RB == 2) v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p1 + blk * 16)));
                for (int j = 0; j < S; j++) {
                    __m512 xj = _mm512_loadu_ps(xb + j * 16);
                    __m512 w0 = GEMV_W_AVX512(BITS, v0, j);
                    if ((j + (S == 1 ? (int)blk : 0)) & 1) t0b = _mm512_fmadd_ps(w0, xj, t0b);
                    else t0a = _mm512_fmadd_ps(w0, xj, t0a);
                    if (RB == 2) {
                        __m512 w1 = GEMV_W_AVX512(BITS, v1, j);
                        if ((j + (S == 1 ? (int)blk : 0)) & 1) t1b = _mm512_fmadd_ps(w1, xj, t1b);
                        else t1a = _mm512_fmadd_ps(w1, xj, t1a);
                    }
                }
            }
            if (g & 1) {
                acc0b = _mm512_fmadd_ps(_mm512_add_ps(t0a, t0b), _mm512_set1_ps(sc0[g]), acc0b);
                if (RB == 2) acc1b = _mm512_fmadd_ps(_mm512_add_ps(t1a, t1b), _mm512_set1_ps(sc1[g]), acc1b);
            } else {
                acc0 = _mm512_fmadd_ps(_mm512_add_ps(t0a, t0b), _mm512_set1_ps(sc0[g]), acc0);
                if (RB == 2) acc1 = _mm512_fmadd_ps(_mm512_add_ps(t1a, t1b), _mm512_set1_ps(sc1[g]), acc1);
            }
        }
    }
    for (; g < a->n_groups; g++) {  /* the ragged last group, or groups not on block boundaries */
        __m512 t0a = _mm512_setzero_ps(), t0b = _mm512_setzero_ps();
        __m512 t1a = _mm512_setzero_ps(), t1b = _mm512_setzero_ps();
        int64_t c0 = g * G, c1 = c0 + G < K ? c0 + G : K;
        for (int64_t blk = c0 / CPI; blk * CPI < c1; blk++) {
            int64_t off = blk * 16, avail = rb - off;
            const float* xb = xp + blk * CPI;
            __m512i v0 = load16_u8(p0 + off, avail);
            __m512i v1 = _mm512_setzero_si512();
            if (RB == 2) v1 = load16_u8(p1 + off, avail);
            for (int j = 0; j < S; j++) {
                __m512 xj = _mm512_loadu_ps(xb + j * 16);
                __m512 w0 = GEMV_W_AVX512(BITS, v0, j);
                if (j & 1) t0b = _mm512_fmadd_ps(w0, xj, t0b); else t0a = _mm512_fmadd_ps(w0, xj, t0a);
                if (RB == 2) {
                    __m512 w1 = GEMV_W_AVX512(BITS, v1, j);
                    if (j & 1) t1b = _mm512_fmadd_ps(w1, xj, t1b); else t1a = _mm512_fmadd_ps(w1, xj, t1a);
                }
            }
        }
        if (g & 1) {  /* two accumulators per row: consecutive groups do not wait on each other */
            acc0b = _mm512_fmadd_ps(_mm512_add_ps(t0a, t0b), _mm512_set1_ps(sc0[g]), acc0b);
            if (RB == 2) acc1b = _mm512_fmadd_ps(_mm512_add_ps(t1a, t1b), _mm512_set1_ps(sc1[g]), acc1b);
        } else {
            acc0 = _mm512_fmadd_ps(_mm512_add_ps(t0a, t0b), _mm512_set1_ps(sc0[g]), acc0);
            if (RB == 2) acc1 = _mm512_fmadd_ps(_mm512_add_ps(t1a, t1b), _mm512_set1_ps(sc1[g]), acc1);
        }
    }
    a->y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc0b)) - z0 + (a->bias ? a->bias[r] : 0.0f);
    if (RB == 2) a->y[r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(acc1, acc1b)) - z1 + (a->bias ? a->bias[r + 1] : 0.0f);
}

#define GEMV_W_AVX2(BITS, v, J) _mm256_cvtepi32_ps(GEMV_UNPACK_AVX2(BITS, v, J))
#define GEMV_UNPACK_AVX2(BITS, v, J) _mm256_sub_epi32( \
    (BITS == 8 ? (v) : ((J) == 8 / BITS - 1 ? _mm256_srli_epi32(v, (J) * BITS) \
                                             : _mm256_and_si256(_mm256_srli_epi32(v, (J) * BITS), mask))), mid)

T2 void affine_gemv_avx2(const affine_args* a, const float* xp, const float* xsum, float* sc0, float* sc1,
                         int64_t r, const int RB, const int BITS) {
    const int S = 8 / BITS, CPI = 8 * S;
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1), mid = _mm256_set1_epi32(1 << (BITS - 1));
    const int64_t K = a->K, G = a->G, rb = a->row_bytes;
    float z0 = affine_row_prepass(a, r, xsum, sc0), z1 = 0.0f;
    if (RB == 2) z1 = affine_row_prepass(a, r + 1, xsum, sc1);
    const uint8_t* p0 = a->qw + r * rb;
    const uint8_t* p1 = p0 + rb;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc0b = _mm256_setzero_ps(), acc1b = _mm256_setzero_ps();
    int64_t g = 0;
    if (G % CPI == 0) {  /* full groups: whole blocks inside the row, no bounds to check */
        const int64_t nbg = G / CPI, nfull = K / G;
        for (; g < nfull; g++) {
            __m256 t0a = _mm256_setzero_ps(), t0b = _mm256_setzero_ps();
            __m256 t1a = _mm256_setzero_ps(), t1b = _mm256_setzero_ps();
            for (int64_t blk = g * nbg; blk < (g + 1) * nbg; blk++) {
                const float* xb = xp + blk * CPI;
                __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p0 + blk * 8)));
                __m256i v1 = _mm256_setzero_si256();
                if (RB == 2) v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p1 + blk * 8)));
                for (int j = 0; j < S; j++) {
                    __m256 xj = _mm256_loadu_ps(xb + j * 8);
                    __m256 w0 = GEMV_W_AVX2(BITS, v0, j);
                    if ((j + (S == 1 ? (int)blk : 0)) & 1) t0b = _mm256_fmadd_ps(w0, xj, t0b);
                    else t0a = _mm256_fmadd_ps(w0, xj, t0a);
                    if (RB == 2) {
                        __m256 w1 = GEMV_W_AVX2(BITS, v1, j);
                        if ((j + (S == 1 ? (int)blk : 0)) & 1) t1b = _mm256_fmadd_ps(w1, xj, t1b);
                        else t1a = _mm256_fmadd_ps(w1, xj, t1a);
                    }
                }
            }
            if (g & 1) {
                acc0b = _mm256_fmadd_ps(_mm256_add_ps(t0a, t0b), _mm256_set1_ps(sc0[g]), acc0b);
                if (RB == 2) acc1b = _mm256_fmadd_ps(_mm256_add_ps(t1a, t1b), _mm256_set1_ps(sc1[g]), acc1b);
            } else {
                acc0 = _mm256_fmadd_ps(_mm256_add_ps(t0a, t0b), _mm256_set1_ps(sc0[g]), acc0);
                if (RB == 2) acc1 = _mm256_fmadd_ps(_mm256_add_ps(t1a, t1b), _mm256_set1_ps(sc1[g]), acc1);
            }
        }
    }
    for (; g < a->n_groups; g++) {  /* the ragged last group, or groups not on block boundaries */
        __m256 t0a = _mm256_setzero_ps(), t0b = _mm256_setzero_ps();
        __m256 t1a = _mm256_setzero_ps(), t1b = _mm256_setzero_ps();
        int64_t c0 = g * G, c1 = c0 + G < K ? c0 + G : K;
        int64_t blk = c0 / CPI;
        for (; blk * CPI < c1; blk++) {
            int64_t off = blk * 8, avail = rb - off;
            const float* xb = xp + blk * CPI;
            __m256i v0 = load8_u8(p0 + off, avail);
            __m256i v1 = _mm256_setzero_si256();
            if (RB == 2) v1 = load8_u8(p1 + off, avail);
            for (int j = 0; j < S; j++) {
                __m256 xj = _mm256_loadu_ps(xb + j * 8);
                __m256 w0 = _mm256_cvtepi32_ps(GEMV_UNPACK_AVX2(BITS, v0, j));
                if ((j + (S == 1 ? (int)blk : 0)) & 1) t0b = _mm256_fmadd_ps(w0, xj, t0b);
                else t0a = _mm256_fmadd_ps(w0, xj, t0a);
                if (RB == 2) {
                    __m256 w1 = _mm256_cvtepi32_ps(GEMV_UNPACK_AVX2(BITS, v1, j));
                    if ((j + (S == 1 ? (int)blk : 0)) & 1) t1b = _mm256_fmadd_ps(w1, xj, t1b);
                    else t1a = _mm256_fmadd_ps(w1, xj, t1a);
                }
            }
        }
        if (g & 1) {  /* two accumulators per row: consecutive groups do not wait on each other */
            acc0b = _mm256_fmadd_ps(_mm256_add_ps(t0a, t0b), _mm256_set1_ps(sc0[g]), acc0b);
            if (RB == 2) acc1b = _mm256_fmadd_ps(_mm256_add_ps(t1a, t1b), _mm256_set1_ps(sc1[g]), acc1b);
        } else {
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(t0a, t0b), _mm256_set1_ps(sc0[g]), acc0);
            if (RB == 2) acc1 = _mm256_fmadd_ps(_mm256_add_ps(t1a, t1b), _mm256_set1_ps(sc1[g]), acc1);
        }
    }
    a->y[r] = hsum256(_mm256_add_ps(acc0, acc0b)) - z0 + (a->bias ? a->bias[r] : 0.0f);
    if (RB == 2) a->y[r + 1] = hsum256(_mm256_add_ps(acc1, acc1b)) - z1 + (a->bias ? a->bias[r + 1] : 0.0f);
}

/* Small batches: RB weight rows x MB activation rows per pass. Each block of codes is unpacked,
 * centred and dequantized once in registers (w = (u - mid) * s - (z - mid) * s, one FMA) and
 * multiplied with MB activation rows; every activation load feeds RB rows. */
T2 void affine_row_scales(const affine_args* a, int64_t r, float* sc, float* nz) {
    const int64_t ng = a->n_groups;
    if (a->scales_f16) halves_to_floats((const uint16_t*)a->scales + r * a->s_stride, sc, ng);
    else memcpy(sc, (const float*)a->scales + r * a->s_stride, (size_t)ng * sizeof(float));
    const float mid = (float)(1 << (a->bits - 1));
    for (int64_t g = 0; g < ng; g++) nz[g] = -((affine_zero(a, r, g) - mid) * sc[g]);
}

#define BATCH_KERNEL(NAME, TGT, VEC, W, SET0, LOADX, FMA, SET1, RED, UNPACK_T, LOADB, CVT, SUBI, ANDI, SRLI, SETI)   \
    __attribute__((target(TGT), always_inline)) static inline void NAME(                                            \
        const affine_args* a, const float* xp, int64_t Kp, const float* sc, int64_t r, int64_t m0, const int RB,    \
        const int MB, const int BITS) {                                                                             \
        const int S = 8 / BITS, CPI = W * S;                                                                       \
        const UNPACK_T mask = SETI((1 << BITS) - 1), mid = SETI(1 << (BITS - 1));                                   \
        const int64_t K = a->K, G = a->G, rb = a->row_bytes, ng = a->n_groups;                                      \
        const uint8_t* p0 = a->qw + r * rb;                                                                         \
        VEC acc[2][8];                                                                                              \
        _Pragma("GCC unroll 2") for (int i = 0; i < RB; i++)                                                        \
            _Pragma("GCC unroll 8") for (int mm = 0; mm < MB; mm++) acc[i][mm] = SET0();                            \
        for (int64_t g = 0; g < ng; g++) {                                                                          \
            VEC vs[2], vnz[2];                                                                                      \
            _Pragma("GCC unroll 2") for (int i = 0; i < RB; i++) {                                                  \
                vs[i] = SET1(sc[i * 2 * ng + g]);                                                                   \
                vnz[i] = SET1(sc[i * 2 * ng + ng + g]);                                                             \
            }                                                                                                       \
            int64_t c0 = g * G, c1 = c0 + G < K ? c0 + G : K;                                                       \
            for (int64_t blk = c0 / CPI; blk * CPI < c1; blk++) {                                                   \
                int64_t off = blk * W, avail = rb - off;                                                            \
                UNPACK_T v[2];                                                                                      \
                _Pragma("GCC unroll 2") for (int i = 0; i < RB; i++) v[i] = LOADB(p0 + i * rb + off, avail);        \
                _Pragma("GCC unroll 4") for (int j = 0; j < S; j++) {                                               \
                    const float* xb = xp + m0 * Kp + blk * CPI + j * W;                                             \
                    VEC wj[2];                                                                                      \
                    _Pragma("GCC unroll 2") for (int i = 0; i < RB; i++) {                                          \
                        UNPACK_T cj = BITS == 8 ? v[i] : (j == S - 1 ? SRLI(v[i], j * BITS)                         \
                                                                   : ANDI(SRLI(v[i], j * BITS), mask));             \
                        wj[i] = FMA(CVT(SUBI(cj, mid)), vs[i], vnz[i]);                                             \
                    }                                                                                               \
                    _Pragma("GCC unroll 8") for (int mm = 0; mm < MB; mm++) {                                       \
                        VEC xv = LOADX(xb + mm * Kp);                                                               \
                        _Pragma("GCC unroll 2") for (int i = 0; i < RB; i++) acc[i][mm] = FMA(wj[i], xv, acc[i][mm]); \
                    }                                                                                               \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
        _Pragma("GCC unroll 2") for (int i = 0; i < RB; i++)                                                        \
            _Pragma("GCC unroll 8") for (int mm = 0; mm < MB; mm++)                                                 \
                a->y[(m0 + mm) * a->N + r + i] = RED(acc[i][mm]) + (a->bias ? a->bias[r + i] : 0.0f);               \
    }

BATCH_KERNEL(affine_batch_avx2, "avx2,fma,f16c", __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps,
             _mm256_set1_ps, hsum256, __m256i, load8_u8, _mm256_cvtepi32_ps, _mm256_sub_epi32, _mm256_and_si256,
             _mm256_srli_epi32, _mm256_set1_epi32)
BATCH_KERNEL(affine_batch_avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c", __m512, 16, _mm512_setzero_ps,
             _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_reduce_add_ps, __m512i, load16_u8,
             _mm512_cvtepi32_ps, _mm512_sub_epi32, _mm512_and_si512, _mm512_srli_epi32, _mm512_set1_epi32)

/* sc: per row of a pair, its scales [n_groups] then its -(z - mid) * s [n_groups]. AVX-512 runs
 * 2 weight rows x up to 8 activation rows (16 accumulators); AVX2 (16 registers) 2 x up to 4
 * when the batch has at most 4 rows, else 1 x 8. */
#define BATCH_CALL(FN, RB, MB, BITS) FN(a, xp, Kp, sc, r, m0, RB, MB, BITS)
#define BATCH_ROWS(ISA, BITS, FN, RBMAX)                                                                     \
    __attribute__((target(TGT_##ISA))) static void affine_batch_rows_##ISA##_##BITS(                        \
        const affine_args* a, const float* xp, int64_t Kp, float* sc, int64_t r0, int64_t r1) {             \
        const int64_t M = a->M, ng = a->n_groups;                                                           \
        for (int64_t r = r0; r < r1;) {                                                                     \
            const int two = r + 2 <= r1 && (RBMAX == 2 || M <= 4);                                          \
            affine_row_scales(a, r, sc, sc + ng);                                                           \
            if (two) affine_row_scales(a, r + 1, sc + 2 * ng, sc + 3 * ng);                                 \
            int64_t m0 = 0;                                                                                 \
            for (; m0 + 8 <= M; m0 += 8) {                                                                  \
                if (two) BATCH_CALL(FN, 2, 8, BITS); else BATCH_CALL(FN, 1, 8, BITS);                   \
            }                                                                                               \
            switch (M - m0) {                                                                               \
                case 7: if (two) BATCH_CALL(FN, 2, 7, BITS); else BATCH_CALL(FN, 1, 7, BITS); break;    \
                case 6: if (two) BATCH_CALL(FN, 2, 6, BITS); else BATCH_CALL(FN, 1, 6, BITS); break;    \
                case 5: if (two) BATCH_CALL(FN, 2, 5, BITS); else BATCH_CALL(FN, 1, 5, BITS); break;    \
                case 4: if (two) BATCH_CALL(FN, 2, 4, BITS); else BATCH_CALL(FN, 1, 4, BITS); break;    \
                case 3: if (two) BATCH_CALL(FN, 2, 3, BITS); else BATCH_CALL(FN, 1, 3, BITS); break;    \
                case 2: if (two) BATCH_CALL(FN, 2, 2, BITS); else BATCH_CALL(FN, 1, 2, BITS); break;    \
                case 1: if (two) BATCH_CALL(FN, 2, 1, BITS); else BATCH_CALL(FN, 1, 1, BITS); break;    \
                default: break;                                                                             \
            }                                                                                               \
            r += two ? 2 : 1;                                                                               \
        }                                                                                                   \
    }

#define TGT_1 "avx2,fma,f16c"
#define TGT_2 "avx512f,avx512bw,avx512vl,avx2,fma,f16c"
#define GEMV_ROWS(ISA, BITS)                                                                         \
    __attribute__((target(TGT_##ISA)))                                                              \
    static void affine_gemv_rows_##ISA##_##BITS(const affine_args* a, const float* xp,                  \
                                                 const float* xsum, float* sc, int64_t r0, int64_t r1) { \
        float* sc1 = sc + a->n_groups;                                                              \
        int64_t r = r0;                                                                             \
        for (; r + 2 <= r1; r += 2) {                                                               \
            if (ISA == 2) affine_gemv_avx512(a, xp, xsum, sc, sc1, r, 2, BITS);                      \
            else affine_gemv_avx2(a, xp, xsum, sc, sc1, r, 2, BITS);                                 \
        }                                                                                           \
        for (; r < r1; r++) {                                                                       \
            if (ISA == 2) affine_gemv_avx512(a, xp, xsum, sc, sc1, r, 1, BITS);                      \
            else affine_gemv_avx2(a, xp, xsum, sc, sc1, r, 1, BITS);                                 \
        }                                                                                           \
    }
GEMV_ROWS(1, 2)
GEMV_ROWS(1, 4)
GEMV_ROWS(1, 8)
GEMV_ROWS(2, 2)
GEMV_ROWS(2, 4)
GEMV_ROWS(2, 8)
BATCH_ROWS(1, 2, affine_batch_avx2, 1)
BATCH_ROWS(1, 4, affine_batch_avx2, 1)
BATCH_ROWS(1, 8, affine_batch_avx2, 1)
BATCH_ROWS(2, 2, affine_batch_avx512, 2)
BATCH_ROWS(2, 4, affine_batch_avx512, 2)
BATCH_ROWS(2, 8, affine_batch_avx512, 2)
#endif

/* ------------------------------------------------------------------------------------------ */
/* 3, 5, 6 and 7 bits: a run of 8 codes is one little-endian integer in `bits` bytes. The codes */
/* are read in their natural order, so the activations need no rearrangement (xp: x zero-padded */
/* to Kp). Per 16 codes (two runs, <= 14 bytes): one 16-byte load broadcast to every 128-bit     */
/* lane, one byte shuffle that puts the two bytes holding code j in the low half of 32-bit lane  */
/* j (zeros above), a per-lane shift ((j*b) mod 8) and a mask. AVX2 takes 8 codes per step.      */
typedef struct {
    uint8_t idx[64];   /* shuffle: 32-bit lane j <- bytes (j*b)/8 and the next, then two zeros */
    uint32_t sh[16];   /* right shift of lane j: (j*b) mod 8 */
} odd_tables;

static void odd_tables_init(odd_tables* t, int bits) {
    for (int j = 0; j < 16; j++) {
        int bit = j * bits, o = bit >> 3;
        t->idx[4 * j] = (uint8_t)o;
        t->idx[4 * j + 1] = (uint8_t)(o + 1);
        t->idx[4 * j + 2] = t->idx[4 * j + 3] = 0x80;  /* pshufb: zero */
        t->sh[j] = (uint32_t)(bit & 7);
    }
}

#if LB_X86
/* The 8 codes of the run at p as int32 lanes; `end` bounds the weight's bytes (a run is never cut) */
T2 __m256i odd_unpack_avx2(const uint8_t* p, const uint8_t* end, int bits, __m256i idx, __m256i sh, __m256i mask) {
    __m128i v;
    if (!end || end - p >= 16) {  /* end NULL: the caller knows 16 bytes are there */
        v = _mm_loadu_si128((const __m128i*)p);
    } else {
        uint8_t t[16] = {0};
        memcpy(t, p, (size_t)bits);
        v = _mm_loadu_si128((const __m128i*)t);
    }
    __m256i u = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(v), idx);
    return _mm256_and_si256(_mm256_srlv_epi32(u, sh), mask);
}

/* 16 codes (two runs) at p, each OR-ed into the mantissa of 2^23 (see GEMV_W_AVX512); bytes past
 * `end` read as zero */
T5 __m512i odd_unpack_avx512(const uint8_t* p, const uint8_t* end, __m512i idx, __m512i sh, __m512i mask,
                             __m512i magic) {
    int64_t avail = end ? end - p : 16;  /* end NULL: the caller knows 16 bytes are there */
    __m128i v = avail >= 16 ? _mm_loadu_si128((const __m128i*)p)
                            : _mm_maskz_loadu_epi8((__mmask16)((1u << avail) - 1u), p);
    __m512i u = _mm512_srlv_epi32(_mm512_shuffle_epi8(_mm512_broadcast_i32x4(v), idx), sh);
    return _mm512_ternarylogic_epi32(u, mask, magic, 0xEA);  /* (u & mask) | magic */
}

/* Batch 1, RB (1 or 2) rows: y[r] = sum_g s_g * sum_{c in g} (u_c - mid) x_c - zero term. */
T5 void odd_gemv_avx512(const affine_args* a, const odd_tables* tb, const float* xp, const float* xsum,
                        float* sc0, float* sc1, int64_t r, const int RB, const int BITS) {
    const __m512i idx = _mm512_loadu_si512(tb->idx), sh = _mm512_loadu_si512(tb->sh);
    const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1), magic = _mm512_set1_epi32(0x4B000000);
    const __m512 magic_mid = _mm512_set1_ps(8388608.0f + (float)(1 << (BITS - 1)));
    const int64_t K = a->K, G = a->G, rb = a->row_bytes;
    const uint8_t* p0 = a->qw + r * rb;
    const uint8_t* p1 = p0 + rb;
    const uint8_t* end = a->qw + a->N * rb;
    const int far = end - (p0 + (RB - 1) * rb) >= rb + 16;  /* a 16-byte load anywhere in the rows is inside */
    float z0 = affine_row_prepass(a, r, xsum, sc0), z1 = 0.0f;
    if (RB == 2) z1 = affine_row_prepass(a, r + 1, xsum, sc1);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc0b = _mm512_setzero_ps(), acc1b = _mm512_setzero_ps();
    for (int64_t g = 0; g < a->n_groups; g++) {
        __m512 t0a = _mm512_setzero_ps(), t0b = _mm512_setzero_ps();
        __m512 t1a = _mm512_setzero_ps(), t1b = _mm512_setzero_ps();
        int64_t c0 = g * G, c1 = c0 + G < K ? c0 + G : K;
        int64_t c = c0;
#define ODD_W512(P, OFF, E) _mm512_sub_ps(_mm512_castsi512_ps(odd_unpack_avx512((P) + (OFF), E, idx, sh, mask, magic)), \
                                          magic_mid)
        if (far) {  /* 16-byte loads stay inside the weight: no bounds to check */
            for (; c + 32 <= c1; c += 32) {
                int64_t off = (c >> 3) * BITS;
                __m512 xa = _mm512_loadu_ps(xp + c), xb = _mm512_loadu_ps(xp + c + 16);
                t0a = _mm512_fmadd_ps(ODD_W512(p0, off, NULL), xa, t0a);
                t0b = _mm512_fmadd_ps(ODD_W512(p0, off + 2 * BITS, NULL), xb, t0b);
                if (RB == 2) {
                    t1a = _mm512_fmadd_ps(ODD_W512(p1, off, NULL), xa, t1a);
                    t1b = _mm512_fmadd_ps(ODD_W512(p1, off + 2 * BITS, NULL), xb, t1b);
                }
            }
        }
        for (; c < c1; c += 16) {
            int64_t off = (c >> 3) * BITS;
            __m512 xv = _mm512_loadu_ps(xp + c);
            t0a = _mm512_fmadd_ps(ODD_W512(p0, off, end), xv, t0a);
            if (RB == 2) t1a = _mm512_fmadd_ps(ODD_W512(p1, off, end), xv, t1a);
        }
#undef ODD_W512
        if (g & 1) {
            acc0b = _mm512_fmadd_ps(_mm512_add_ps(t0a, t0b), _mm512_set1_ps(sc0[g]), acc0b);
            if (RB == 2) acc1b = _mm512_fmadd_ps(_mm512_add_ps(t1a, t1b), _mm512_set1_ps(sc1[g]), acc1b);
        } else {
            acc0 = _mm512_fmadd_ps(_mm512_add_ps(t0a, t0b), _mm512_set1_ps(sc0[g]), acc0);
            if (RB == 2) acc1 = _mm512_fmadd_ps(_mm512_add_ps(t1a, t1b), _mm512_set1_ps(sc1[g]), acc1);
        }
    }
    a->y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc0b)) - z0 + (a->bias ? a->bias[r] : 0.0f);
    if (RB == 2) a->y[r + 1] = _mm512_reduce_add_ps(_mm512_add_ps(acc1, acc1b)) - z1 + (a->bias ? a->bias[r + 1] : 0.0f);
}

T2 void odd_gemv_avx2(const affine_args* a, const odd_tables* tb, const float* xp, const float* xsum,
                      float* sc0, float* sc1, int64_t r, const int RB, const int BITS) {
    const __m256i idx = _mm256_loadu_si256((const __m256i*)tb->idx);
    const __m256i sh = _mm256_loadu_si256((const __m256i*)tb->sh), mask = _mm256_set1_epi32((1 << BITS) - 1);
    const __m256i mid = _mm256_set1_epi32(1 << (BITS - 1));
    const int64_t K = a->K, G = a->G, rb = a->row_bytes;
    const uint8_t* p0 = a->qw + r * rb;
    const uint8_t* p1 = p0 + rb;
    const uint8_t* end = a->qw + a->N * rb;
    const int far = end - (p0 + (RB - 1) * rb) >= rb + 16;  /* a 16-byte load anywhere in the rows is inside */
    float z0 = affine_row_prepass(a, r, xsum, sc0), z1 = 0.0f;
    if (RB == 2) z1 = affine_row_prepass(a, r + 1, xsum, sc1);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc0b = _mm256_setzero_ps(), acc1b = _mm256_setzero_ps();
    for (int64_t g = 0; g < a->n_groups; g++) {
        __m256 t0a = _mm256_setzero_ps(), t0b = _mm256_setzero_ps();
        __m256 t1a = _mm256_setzero_ps(), t1b = _mm256_setzero_ps();
        int64_t c0 = g * G, c1 = c0 + G < K ? c0 + G : K;
        int64_t c = c0;
#define ODD_W256(P, OFF, E) _mm256_cvtepi32_ps(_mm256_sub_epi32(odd_unpack_avx2((P) + (OFF), E, BITS, idx, sh, mask), mid))
        if (far) {  /* 16-byte loads stay inside the weight: no bounds to check */
            for (; c + 16 <= c1; c += 16) {
                int64_t off = (c >> 3) * BITS;
                __m256 xa = _mm256_loadu_ps(xp + c), xb = _mm256_loadu_ps(xp + c + 8);
                t0a = _mm256_fmadd_ps(ODD_W256(p0, off, NULL), xa, t0a);
                t0b = _mm256_fmadd_ps(ODD_W256(p0, off + BITS, NULL), xb, t0b);
                if (RB == 2) {
                    t1a = _mm256_fmadd_ps(ODD_W256(p1, off, NULL), xa, t1a);
                    t1b = _mm256_fmadd_ps(ODD_W256(p1, off + BITS, NULL), xb, t1b);
                }
            }
        }
        for (; c < c1; c += 8) {
            int64_t off = (c >> 3) * BITS;
            __m256 xv = _mm256_loadu_ps(xp + c);
            t0a = _mm256_fmadd_ps(ODD_W256(p0, off, end), xv, t0a);
            if (RB == 2) t1a = _mm256_fmadd_ps(ODD_W256(p1, off, end), xv, t1a);
        }
#undef ODD_W256
        if (g & 1) {
            acc0b = _mm256_fmadd_ps(_mm256_add_ps(t0a, t0b), _mm256_set1_ps(sc0[g]), acc0b);
            if (RB == 2) acc1b = _mm256_fmadd_ps(_mm256_add_ps(t1a, t1b), _mm256_set1_ps(sc1[g]), acc1b);
        } else {
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(t0a, t0b), _mm256_set1_ps(sc0[g]), acc0);
            if (RB == 2) acc1 = _mm256_fmadd_ps(_mm256_add_ps(t1a, t1b), _mm256_set1_ps(sc1[g]), acc1);
        }
    }
    a->y[r] = hsum256(_mm256_add_ps(acc0, acc0b)) - z0 + (a->bias ? a->bias[r] : 0.0f);
    if (RB == 2) a->y[r + 1] = hsum256(_mm256_add_ps(acc1, acc1b)) - z1 + (a->bias ? a->bias[r + 1] : 0.0f);
}

/* Small batches: one weight row x MB activation rows (xp [M, Kp] zero-padded); each step of codes
 * is unpacked and dequantized once (w = (u - mid) * s - (z - mid) * s) and used MB times. */
#define ODD_BATCH(NAME, TGT, VEC, W, SET0, LOADX, FMA, SET1, RED, UNPACK)                                   \
    __attribute__((target(TGT), always_inline)) static inline void NAME(                                   \
        const affine_args* a, const odd_tables* tb, const float* xp, int64_t Kp, const float* sc,          \
        const float* nz, int64_t r, int64_t m0, const int MB, const int BITS) {                            \
        const int64_t K = a->K, G = a->G, rb = a->row_bytes;                                               \
        const uint8_t* p0 = a->qw + r * rb;                                                                \
        const uint8_t* end = a->qw + a->N * rb;                                                            \
        VEC acc[8];                                                                                        \
        _Pragma("GCC unroll 8") for (int mm = 0; mm < MB; mm++) acc[mm] = SET0();                          \
        for (int64_t g = 0; g < a->n_groups; g++) {                                                        \
            VEC vs = SET1(sc[g]), vnz = SET1(nz[g]);                                                       \
            int64_t c0 = g * G, c1 = c0 + G < K ? c0 + G : K;                                              \
            for (int64_t c = c0; c < c1; c += W) {                                                         \
                VEC w = FMA(UNPACK, vs, vnz);                                                              \
                _Pragma("GCC unroll 8") for (int mm = 0; mm < MB; mm++)                                    \
                    acc[mm] = FMA(w, LOADX(xp + (m0 + mm) * Kp + c), acc[mm]);                             \
            }                                                                                              \
        }                                                                                                  \
        _Pragma("GCC unroll 8") for (int mm = 0; mm < MB; mm++)                                            \
            a->y[(m0 + mm) * a->N + r] = RED(acc[mm]) + (a->bias ? a->bias[r] : 0.0f);                     \
    }

ODD_BATCH(odd_batch_avx2, "avx2,fma,f16c", __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps,
          _mm256_set1_ps, hsum256,
          _mm256_cvtepi32_ps(_mm256_sub_epi32(odd_unpack_avx2(p0 + (c >> 3) * BITS, end, BITS,
              _mm256_loadu_si256((const __m256i*)tb->idx), _mm256_loadu_si256((const __m256i*)tb->sh),
              _mm256_set1_epi32((1 << BITS) - 1)), _mm256_set1_epi32(1 << (BITS - 1)))))
ODD_BATCH(odd_batch_avx512, "avx512f,avx512bw,avx512vl,avx2,fma,f16c", __m512, 16, _mm512_setzero_ps,
          _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_reduce_add_ps,
          _mm512_sub_ps(_mm512_castsi512_ps(odd_unpack_avx512(p0 + (c >> 3) * BITS, end,
              _mm512_loadu_si512(tb->idx), _mm512_loadu_si512(tb->sh), _mm512_set1_epi32((1 << BITS) - 1),
              _mm512_set1_epi32(0x4B000000))), _mm512_set1_ps(8388608.0f + (float)(1 << (BITS - 1)))))

/* One thread's rows [r0, r1) for one bit width (a compile-time constant in every kernel). */
#define ODD_ROWS(ISA, BITS)                                                                                \
    __attribute__((target(TGT_##ISA))) static void odd_rows_##ISA##_##BITS(                               \
        const affine_args* a, const odd_tables* tb, const float* xp, int64_t Kp, const float* xsum,       \
        float* sc, int64_t r0, int64_t r1) {                                                               \
        const int64_t M = a->M, ng = a->n_groups;                                                          \
        if (M == 1) {                                                                                      \
            int64_t r = r0;                                                                                \
            for (; r + 2 <= r1; r += 2) {                                                                  \
                if (ISA == 2) odd_gemv_avx512(a, tb, xp, xsum, sc, sc + ng, r, 2, BITS);                   \
                else odd_gemv_avx2(a, tb, xp, xsum, sc, sc + ng, r, 2, BITS);                              \
            }                                                                                              \
            if (r < r1) {                                                                                  \
                if (ISA == 2) odd_gemv_avx512(a, tb, xp, xsum, sc, sc + ng, r, 1, BITS);                   \
                else odd_gemv_avx2(a, tb, xp, xsum, sc, sc + ng, r, 1, BITS);                              \
            }                                                                                              \
            return;                                                                                        \
        }                                                                                                  \
        const int MBMAX = ISA == 2 ? 8 : 4;                                                                \
        for (int64_t r = r0; r < r1; r++) {                                                                \
            affine_row_scales(a, r, sc, sc + ng);                                                          \
            for (int64_t m0 = 0; m0 < M; m0 += MBMAX) {                                                    \
                int mb = (int)(M - m0 < MBMAX ? M - m0 : MBMAX);                                           \
                switch (mb) {                                                                              \
                    ODD_CASE(ISA, 8, BITS) ODD_CASE(ISA, 7, BITS) ODD_CASE(ISA, 6, BITS)                   \
                    ODD_CASE(ISA, 5, BITS) ODD_CASE(ISA, 4, BITS) ODD_CASE(ISA, 3, BITS)                   \
                    ODD_CASE(ISA, 2, BITS) ODD_CASE(ISA, 1, BITS)                                          \
                    default: break;                                                                        \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }
#define ODD_CASE(ISA, MB, BITS)                                                                            \
    case MB:                                                                                               \
        if (ISA == 2) odd_batch_avx512(a, tb, xp, Kp, sc, sc + ng, r, m0, MB, BITS);                      \
        else if (MB <= 4) odd_batch_avx2(a, tb, xp, Kp, sc, sc + ng, r, m0, MB, BITS);                    \
        break;
ODD_ROWS(1, 3)
ODD_ROWS(1, 5)
ODD_ROWS(1, 6)
ODD_ROWS(1, 7)
ODD_ROWS(2, 3)
ODD_ROWS(2, 5)
ODD_ROWS(2, 6)
ODD_ROWS(2, 7)
#endif

/* The odd-width entry (bits 3, 5, 6, 7), SIMD paths only (the scalar path takes every width). */
static int affine_linear_odd(const affine_args* a, int isa, int nt) {
#if LB_X86
    const int64_t M = a->M, K = a->K, ng = a->n_groups;
    const int V = isa == LB_AVX512 ? 16 : 8;
    const int64_t Kp = (K + V - 1) / V * V;
    odd_tables tb;
    odd_tables_init(&tb, a->bits);
    float* xp = scratch(M * Kp + M * ng);
    if (!xp) return 2;
    for (int64_t m = 0; m < M; m++) {
        memcpy(xp + m * Kp, a->x + m * K, (size_t)K * sizeof(float));
        memset(xp + m * Kp + K, 0, (size_t)(Kp - K) * sizeof(float));
    }
    float* xsum = xp + M * Kp;  /* [M, n_groups] (batch 1 uses it) */
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < ng; g++) {
            float t = 0.0f;
            for (int64_t c = g * a->G; c < (g + 1) * a->G && c < K; c++) t += a->x[m * K + c];
            xsum[m * ng + g] = t;
        }
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        int64_t r0, r1;
        thread_rows(a->N, nt, omp_get_thread_num(), 2, &r0, &r1);
        float* sc = (float*)malloc((size_t)(2 * ng) * sizeof(float));
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        } else if (r0 < r1) {
#define ODD_DISPATCH(ISA)                                                                 \
            switch (a->bits) {                                                            \
                case 3: odd_rows_##ISA##_3(a, &tb, xp, Kp, xsum, sc, r0, r1); break;      \
                case 5: odd_rows_##ISA##_5(a, &tb, xp, Kp, xsum, sc, r0, r1); break;      \
                case 6: odd_rows_##ISA##_6(a, &tb, xp, Kp, xsum, sc, r0, r1); break;      \
                default: odd_rows_##ISA##_7(a, &tb, xp, Kp, xsum, sc, r0, r1); break;     \
            }
            if (isa == LB_AVX512) { ODD_DISPATCH(2) } else { ODD_DISPATCH(1) }
#undef ODD_DISPATCH
        }
        free(sc);
    }
    return failed ? 2 : 0;
#else
    (void)a; (void)isa; (void)nt;
    return 1;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* entry point: affine                                                                         */
/* Returns 0 on success; 1 unsupported bit width; 2 bad arguments. */
static int affine_linear(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* qw, int64_t row_bytes,
                     int bits, const void* scales, int scales_f16, int64_t s_stride, int64_t G, int64_t n_groups,
                     const uint8_t* qz, int64_t qz_stride, const void* fz, int fz_f16, float zconst,
                     const float* bias, float* y, int nthreads) {
    if (bits < 2 || bits > 8) return 1;
    if (M < 0 || K <= 0 || N < 0 || G <= 0 || n_groups <= 0 || (n_groups - 1) * G >= K || n_groups * G < K) return 2;
    if (M == 0 || N == 0) return 0;
    affine_args a = {x, M, K, N, qw, row_bytes, bits, scales, scales_f16, s_stride, G, n_groups,
                     qz, qz_stride, fz, fz_f16, zconst, bias, y};
    int isa = lb_cpu_linear_isa();
    /* codes per byte position of one SIMD load: 8/b for 2, 4, 8 bits; the other widths are read
     * in their natural order, a SIMD step of 16 (AVX-512) or 8 (AVX2) codes */
    const int odd = bits != 2 && bits != 4 && bits != 8;
    int S = odd ? 1 : 8 / bits;
    /* the SIMD paths need group boundaries on load boundaries */
    if (isa == LB_AVX512 && n_groups > 1 && G % (16 * S)) isa = LB_AVX2;
    if (isa == LB_AVX2 && n_groups > 1 && G % (8 * S)) isa = LB_SCALAR;
    int nt = pick_threads(nthreads, N * row_bytes * (M < 8 ? 1 : M / 8), N);
    if (isa == LB_SCALAR) {
#pragma omp parallel num_threads(nt)
        {
            int64_t r0, r1;
            thread_rows(N, nt, omp_get_thread_num(), 1, &r0, &r1);
            affine_rows_scalar(&a, r0, r1);
        }
        return 0;
    }
    if (odd) return affine_linear_odd(&a, isa, nt);
#if LB_X86
    int V = isa == LB_AVX512 ? 16 : 8, cpi = V * S;
    int64_t Kp = (K + cpi - 1) / cpi * cpi;
    float* xp = scratch(M * Kp + M * n_groups);
    if (!xp) return 2;
    rearrange(x, M, K, V, S, xp, Kp);
    float* xsum = xp + M * Kp;  /* [M, n_groups]: sum of x over each group */
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < n_groups; g++) {
            float t = 0.0f;
            for (int64_t c = g * G; c < (g + 1) * G && c < K; c++) t += x[m * K + c];
            xsum[m * n_groups + g] = t;
        }
#pragma omp parallel num_threads(nt)
    {
        int64_t r0, r1;
        thread_rows(N, nt, omp_get_thread_num(), 2, &r0, &r1);
        float* sc = (float*)malloc((size_t)(4 * n_groups) * sizeof(float));
        if (r0 < r1 && sc) {
            if (M == 1) {
                if (isa == LB_AVX512) {
                    if (bits == 4) affine_gemv_rows_2_4(&a, xp, xsum, sc, r0, r1);
                    else if (bits == 8) affine_gemv_rows_2_8(&a, xp, xsum, sc, r0, r1);
                    else affine_gemv_rows_2_2(&a, xp, xsum, sc, r0, r1);
                } else {
                    if (bits == 4) affine_gemv_rows_1_4(&a, xp, xsum, sc, r0, r1);
                    else if (bits == 8) affine_gemv_rows_1_8(&a, xp, xsum, sc, r0, r1);
                    else affine_gemv_rows_1_2(&a, xp, xsum, sc, r0, r1);
                }
            } else if (isa == LB_AVX512) {
                if (bits == 4) affine_batch_rows_2_4(&a, xp, Kp, sc, r0, r1);
                else if (bits == 8) affine_batch_rows_2_8(&a, xp, Kp, sc, r0, r1);
                else affine_batch_rows_2_2(&a, xp, Kp, sc, r0, r1);
            } else {
                if (bits == 4) affine_batch_rows_1_4(&a, xp, Kp, sc, r0, r1);
                else if (bits == 8) affine_batch_rows_1_8(&a, xp, Kp, sc, r0, r1);
                else affine_batch_rows_1_2(&a, xp, Kp, sc, r0, r1);
            }
        }
        free(sc);
    }
#endif
    return 0;
}

/* The entry point: the weight's fields in one struct (lb_affine_weight, lb_common.h) that the
 * caller builds once per weight (keeps the per-call argument conversion short). */

int lb_affine_linear_w(const lb_affine_weight* w, const float* x, int64_t M, const float* bias, float* y,
                       int nthreads) {
    return affine_linear(x, M, w->K, w->N, w->qw, w->row_bytes, w->bits, w->scales, w->scales_f16, w->s_stride,
                            w->G, w->n_groups, w->qz, w->qz_stride, w->fz, w->fz_f16, w->zconst, bias, y, nthreads);
}

int lb_noop_w(const lb_affine_weight* w, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
    (void)w; (void)x; (void)M; (void)bias; (void)y; (void)nthreads;
    return 0;
}

/* Dequantize the affine weight into W [N, K] fp32 exactly as AffineWeight.dequantize does:
 * W = (u - z) * s in fp32, two roundings). */
static _Thread_local void* t_codes = NULL; /* affine_dequant's per-thread row of unpacked codes */
static _Thread_local size_t t_codes_n = 0;

static int affine_dequant(int64_t K, int64_t N, const uint8_t* qw, int64_t row_bytes, int bits, const void* scales,
                      int scales_f16, int64_t s_stride, int64_t G, int64_t n_groups, const uint8_t* qz,
                      int64_t qz_stride, const void* fz, int fz_f16, float zconst, float* W, int nthreads) {
    if (bits < 2 || bits > 8) return 1;
    if (K <= 0 || N < 0 || G <= 0 || n_groups <= 0 || (n_groups - 1) * G >= K || n_groups * G < K) return 2;
    affine_args a = {NULL, 0, K, N, qw, row_bytes, bits, scales, scales_f16, s_stride, G, n_groups,
                     qz, qz_stride, fz, fz_f16, zconst, NULL, NULL};
    int nt = pick_threads(nthreads, N * K, N);
    /* per row: the codes to one byte each (lb_unpack_codes), then (u - z) * s per group, a loop
     * the compiler vectorises: 2.4x the code-at-a-time loop at 4 bits */
    int bad = 0;
#pragma omp parallel num_threads(nt) reduction(| : bad)
    {
        uint8_t* u = (uint8_t*)lb_grow(&t_codes, &t_codes_n, (size_t)K + 64);
        if (!u) {
            bad = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < N; r++) {
                const uint8_t* row = qw + r * row_bytes;
                float* o = W + r * K;
                lb_unpack_codes(row, bits, K, u);
                for (int64_t g = 0; g < n_groups; g++) {
                    const float s = ld_f(scales, scales_f16, r * s_stride + g);
                    const float z = affine_zero(&a, r, g);
                    const int64_t c0 = g * G, c1 = c0 + G < K ? c0 + G : K;
                    for (int64_t c = c0; c < c1; c++) o[c] = ((float)u[c] - z) * s;
                }
            }
        }
    }
    return bad ? 2 : 0;
}

int lb_affine_dequant_w(const lb_affine_weight* w, float* W, int nthreads) {
    return affine_dequant(w->K, w->N, w->qw, w->row_bytes, w->bits, w->scales, w->scales_f16, w->s_stride, w->G,
                          w->n_groups, w->qz, w->qz_stride, w->fz, w->fz_f16, w->zconst, W, nthreads);
}

/* ------------------------------------------------------------------------------------------ */
/* NF4                                                                                         */
typedef struct {
    const float* x;
    int64_t M, K, N;
    const uint8_t* qw;       /* flat [ceil(N*K/2)] */
    const void* absmax;      /* float32 [nb] or uint8 [nb] (double-quantized) */
    int absmax_u8;
    const float* nested;     /* [ceil(nb / dqbs)] */
    int64_t dqbs;
    float offset;
    int64_t bs;
    const float* dyn;        /* 256 */
    const float* lut;        /* 16 */
    const float* bias;
    float* y;
    int bs_lg, dq_lg;        /* log2 of the (power-of-two) block sizes */
} nf4_args;

static inline float nf4_absmax(const nf4_args* a, int64_t b) {
    if (!a->absmax_u8) return ((const float*)a->absmax)[b];
    float d = a->dyn[((const uint8_t*)a->absmax)[b]] * a->nested[b >> a->dq_lg];
    return d + a->offset;
}

static void nf4_rows_scalar(const nf4_args* a, int64_t r0, int64_t r1) {
    const int64_t K = a->K, N = a->N, M = a->M;
    float acc[8];
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            int mb = (int)(M - m0 < 8 ? M - m0 : 8);
            for (int i = 0; i < mb; i++) acc[i] = 0.0f;
            for (int64_t c0 = 0; c0 < K; c0 += a->bs) {
                int64_t f0 = r * K + c0;
                float am = nf4_absmax(a, f0 >> a->bs_lg);
                for (int64_t c = c0; c < c0 + a->bs && c < K; c++) {
                    int64_t f = r * K + c;
                    uint8_t b = a->qw[f >> 1];
                    float w = a->lut[(f & 1) ? (b & 15) : (b >> 4)] * am;
                    for (int i = 0; i < mb; i++) acc[i] += w * a->x[(m0 + i) * K + c];
                }
            }
            for (int i = 0; i < mb; i++) a->y[(m0 + i) * N + r] = acc[i] + (a->bias ? a->bias[r] : 0.0f);
        }
    }
}

#if LB_X86
T2 void nf4_tile_avx2(const nf4_args* a, const float* xp, int64_t Kp, int64_t r, int64_t m0, const int RB,
                      const int MB) {
    const __m256 lo = _mm256_loadu_ps(a->lut), hi = _mm256_loadu_ps(a->lut + 8);
    const __m256i mask = _mm256_set1_epi32(15);
    __m256 acc[4][8];
    for (int i = 0; i < RB; i++)
        for (int j = 0; j < MB; j++) acc[i][j] = _mm256_setzero_ps();
    const int64_t K = a->K, bs = a->bs;
    for (int64_t c0 = 0; c0 < K; c0 += bs) {
        __m256 am[4];
        for (int i = 0; i < RB; i++) am[i] = _mm256_set1_ps(nf4_absmax(a, ((r + i) * K + c0) >> a->bs_lg));
        for (int64_t blk = c0 / 16; blk < (c0 + bs) / 16; blk++) {
            for (int i = 0; i < RB; i++) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(a->qw + (((r + i) * K) >> 1) + blk * 8)));
                for (int j = 0; j < 2; j++) {
                    __m256i cj = j == 0 ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, mask);
                    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(cj, 28));
                    __m256 q = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, cj), _mm256_permutevar8x32_ps(hi, cj), sel);
                    __m256 w = _mm256_mul_ps(q, am[i]);
                    for (int mm = 0; mm < MB; mm++)
                        acc[i][mm] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + (m0 + mm) * Kp + blk * 16 + j * 8), acc[i][mm]);
                }
            }
        }
    }
    for (int i = 0; i < RB; i++)
        for (int mm = 0; mm < MB; mm++)
            a->y[(m0 + mm) * a->N + r + i] = hsum256(acc[i][mm]) + (a->bias ? a->bias[r + i] : 0.0f);
}

__attribute__((target("avx2,fma,f16c"))) static void nf4_rows_avx2(const nf4_args* a, const float* xp, int64_t Kp,
                                                                  int64_t r0, int64_t r1) {
    const int64_t M = a->M;
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8)
        for (int64_t r = r0; r < r1; r++) nf4_tile_avx2(a, xp, Kp, r, m0, 1, 8);
    for (; m0 + 4 <= M; m0 += 4)
        for (int64_t r = r0; r < r1; r++) nf4_tile_avx2(a, xp, Kp, r, m0, 1, 4);
    for (; m0 + 2 <= M; m0 += 2) {
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) nf4_tile_avx2(a, xp, Kp, r, m0, 2, 2);
        for (; r < r1; r++) nf4_tile_avx2(a, xp, Kp, r, m0, 1, 2);
    }
    for (; m0 < M; m0++) {
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) nf4_tile_avx2(a, xp, Kp, r, m0, 4, 1);
        for (; r < r1; r++) nf4_tile_avx2(a, xp, Kp, r, m0, 1, 1);
    }
}

T5 void nf4_tile_avx512(const nf4_args* a, const float* xp, int64_t Kp, int64_t r, int64_t m0, const int RB,
                        const int MB) {
    const __m512 lut = _mm512_loadu_ps(a->lut);
    const __m512i mask = _mm512_set1_epi32(15);
    __m512 acc[4][8];
    for (int i = 0; i < RB; i++)
        for (int j = 0; j < MB; j++) acc[i][j] = _mm512_setzero_ps();
    const int64_t K = a->K, bs = a->bs;
    for (int64_t c0 = 0; c0 < K; c0 += bs) {
        __m512 am[4];
        for (int i = 0; i < RB; i++) am[i] = _mm512_set1_ps(nf4_absmax(a, ((r + i) * K + c0) >> a->bs_lg));
        for (int64_t blk = c0 / 32; blk < (c0 + bs) / 32; blk++) {
            for (int i = 0; i < RB; i++) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(a->qw + (((r + i) * K) >> 1) + blk * 16)));
                for (int j = 0; j < 2; j++) {
                    __m512i cj = j == 0 ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, mask);
                    __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(cj, lut), am[i]);
                    for (int mm = 0; mm < MB; mm++)
                        acc[i][mm] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp + (m0 + mm) * Kp + blk * 32 + j * 16), acc[i][mm]);
                }
            }
        }
    }
    for (int i = 0; i < RB; i++)
        for (int mm = 0; mm < MB; mm++)
            a->y[(m0 + mm) * a->N + r + i] = _mm512_reduce_add_ps(acc[i][mm]) + (a->bias ? a->bias[r + i] : 0.0f);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))) static void nf4_rows_avx512(
    const nf4_args* a, const float* xp, int64_t Kp, int64_t r0, int64_t r1) {
    const int64_t M = a->M;
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) {
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) nf4_tile_avx512(a, xp, Kp, r, m0, 2, 8);
        for (; r < r1; r++) nf4_tile_avx512(a, xp, Kp, r, m0, 1, 8);
    }
    for (; m0 + 4 <= M; m0 += 4) {
        int64_t r = r0;
        for (; r + 2 <= r1; r += 2) nf4_tile_avx512(a, xp, Kp, r, m0, 2, 4);
        for (; r < r1; r++) nf4_tile_avx512(a, xp, Kp, r, m0, 1, 4);
    }
    for (; m0 + 2 <= M; m0 += 2) {
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) nf4_tile_avx512(a, xp, Kp, r, m0, 4, 2);
        for (; r < r1; r++) nf4_tile_avx512(a, xp, Kp, r, m0, 1, 2);
    }
    for (; m0 < M; m0++) {
        int64_t r = r0;
        for (; r + 4 <= r1; r += 4) nf4_tile_avx512(a, xp, Kp, r, m0, 4, 1);
        for (; r < r1; r++) nf4_tile_avx512(a, xp, Kp, r, m0, 1, 1);
    }
}
#endif

/* Returns 0 on success; 1 when K is odd or not a multiple of the block size (blocks straddle
 * rows: the reference path handles that); 2 bad arguments. */
int lb_nf4_linear(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* qw, const void* absmax,
                  int absmax_u8, const float* nested, int64_t dqbs, float offset, int64_t bs, const float* dyn,
                  const float* lut, const float* bias, float* y, int nthreads) {
    if (M < 0 || K <= 0 || N < 0 || bs <= 0 || (bs & (bs - 1)) || (absmax_u8 && (dqbs <= 0 || (dqbs & (dqbs - 1)))))
        return 2;
    if ((K & 1) || K % bs) return 1;
    if (M == 0 || N == 0) return 0;
    nf4_args a = {x, M, K, N, qw, absmax, absmax_u8, nested, dqbs, offset, bs, dyn, lut, bias, y,
                  __builtin_ctzll((unsigned long long)bs), absmax_u8 ? __builtin_ctzll((unsigned long long)dqbs) : 0};
    int isa = lb_cpu_linear_isa();
    if (isa == LB_AVX512 && bs % 32) isa = LB_AVX2;
    if (isa == LB_AVX2 && bs % 16) isa = LB_SCALAR;
    int nt = pick_threads(nthreads, N * K / 2 * (M < 8 ? 1 : M / 8), N);
    if (isa == LB_SCALAR) {
#pragma omp parallel num_threads(nt)
        {
            int64_t r0, r1;
            thread_rows(N, nt, omp_get_thread_num(), 1, &r0, &r1);
            nf4_rows_scalar(&a, r0, r1);
        }
        return 0;
    }
#if LB_X86
    int V = isa == LB_AVX512 ? 16 : 8, cpi = 2 * V;
    int64_t Kp = K;  /* K is a multiple of bs, hence of cpi */
    float* xp = scratch(M * Kp);
    if (!xp) return 2;
    (void)cpi;
    rearrange(x, M, K, V, 2, xp, Kp);
#pragma omp parallel num_threads(nt)
    {
        int64_t r0, r1;
        thread_rows(N, nt, omp_get_thread_num(), 4, &r0, &r1);
        if (r0 < r1) {
            if (isa == LB_AVX512) nf4_rows_avx512(&a, xp, Kp, r0, r1);
            else nf4_rows_avx2(&a, xp, Kp, r0, r1);
        }
    }
#endif
    return 0;
}

/* The NF4 weight's fields in one struct built once per weight (the *_linear_w entry every kernel
 * row has, which the C decode step calls through a pointer). */
typedef struct {
    const uint8_t* qw;
    const void* absmax;
    const float* nested;
    const float* dyn;
    const float* lut;
    int64_t K, N, dqbs, bs;
    int32_t absmax_u8;
    float offset;
} lb_nf4_weight;

int lb_nf4_linear_w(const lb_nf4_weight* w, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
    return lb_nf4_linear(x, M, w->K, w->N, w->qw, w->absmax, w->absmax_u8, w->nested, w->dqbs, w->offset, w->bs,
                         w->dyn, w->lut, bias, y, nthreads);
}

/* A call that does nothing: measures the ctypes + library call overhead. */
int lb_noop(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* qw, int64_t row_bytes, int bits,
            const void* scales, int scales_f16, int64_t s_stride, int64_t G, int64_t n_groups, const uint8_t* qz,
            int64_t qz_stride, const void* fz, int fz_f16, float zconst, const float* bias, float* y, int nthreads) {
    (void)x; (void)M; (void)K; (void)N; (void)qw; (void)row_bytes; (void)bits; (void)scales; (void)scales_f16;
    (void)s_stride; (void)G; (void)n_groups; (void)qz; (void)qz_stride; (void)fz; (void)fz_f16; (void)zconst;
    (void)bias; (void)y; (void)nthreads;
    return 0;
}
