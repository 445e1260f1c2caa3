/* Affine packed weights times int8-quantized activations (W4A8 / W8A8 / W2A8), batch 1 first.
 *
 * Weights are lowbit's affine layout, read in place (see cpu_linear.c): codes u (2, 4 or 8
 * bits) packed row by row, byte k of a row holding codes k*s .. k*s+s-1 (s = 8/b), code j at
 * bit j*b; one scale s_w per group of G consecutive input columns (fp16 or fp32); zero-point z
 * per group: packed integer (same bit width), float (fp16/fp32), or a constant `zconst`
 * (symmetric: the code offset).  W[r, c] = s_w * (u - z).
 *
 * Activations are quantized once per call, per row m and per block of 32 columns:
 *     amax = max |x| over the block
 *     amax == 0:  q = 0, sx = 0
 *     otherwise:  inv = 127.0f / amax, sx = amax / 127.0f   (float32 divisions)
 *                 q = clamp(nearbyint(x * inv), -127, 127)  (float32 product, ties to even)
 * and the output is
 *     y[m, r] = bias[r] + sum_g s_w[r, g] * ( sum_{b in g} sx_b * D_b  -  z[r, g] * sum_{b in g} sx_b * Q_b )
 * with D_b = sum_{c in b} u_c q_c and Q_b = sum_{c in b} q_c exact in int32.  Requirements:
 * K % 32 == 0, and G % 32 == 0 unless the weight has one group per row (per channel / tensor);
 * the last group of a row may be shorter (K % G != 0).
 *
 * SIMD layout.  The int8 activations are split into s streams, stream j holding q[k*s + j], so
 * that byte k of a weight row pairs with byte k of every stream: unpacking the codes of stream j
 * is a shift and a mask, no shuffle.  One 32-bit lane of a dot-product instruction (vpdpbusd:
 * u8 x s8 -> int32, or vpmaddubsw + vpmaddwd on AVX2) then sums 4*s consecutive codes, all in
 * one 32-column block and one group.  Per lane the int32 sum is converted to float and
 * multiplied by the lane's scale s_w * sx_b (per-lane tables built once per call), and
 * accumulated in float.  The zero-point term uses the per-block activation sums: for a constant
 * integer zero-point (symmetric weights) it is folded into the integer accumulator (which
 * starts at -z * Q_lane), otherwise a per-row pass over the groups subtracts
 * s_w * z * sum_b sx_b Q_b.  Four weight rows share every activation load and one joint
 * horizontal sum; the weight stream is prefetched A8_PREFETCH bytes ahead.
 *
 * Paths (chosen at run time; lb_affine_a8_set_isa lowers it for tests): AVX-512 F/BW/VL/VNNI
 * (64-byte chunks, vpdpbusd), AVX2 (32-byte chunks, vpmaddubsw/vpmaddwd; 8-bit codes are
 * centred to u - 128 with the sign trick so that the int16 pair sums cannot saturate),
 * portable scalar C.
 *
 * lb_affine_a8_linear_w returns 0 on success, a positive code when the case is not supported
 * (the caller then runs another path): 1 bit width, 2 bad arguments / out of memory,
 * 3 K not a multiple of 32, 4 group size not a multiple of 32.
 */
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

/* Small copies in the per-row code stay inline loops (a libc memcpy call per row costs more
 * than the row's arithmetic on the small layers). */
#pragma GCC optimize("no-tree-loop-distribute-patterns")

#define A8_SCALAR LB_ISA_SCALAR
#define A8_AVX2 LB_ISA_AVX2
#define A8_VNNI LB_ISA_AVX512VNNI
#define QB 32 /* activation block */
#ifndef A8_PREFETCH
/* Software prefetch distance (bytes) in the weight stream: the rows are contiguous, so this is
 * the same distance whatever the row length.  Measured on the 49152 x 576 output layer (one
 * thread, weights from memory): 1.7-1.9x faster with 8 KiB than without. */
#define A8_PREFETCH 8192
#endif

/* lb_affine_weight, the half conversions and the thread split come from lb_common.h */

/* ------------------------------------------------------------------------------------------ */
/* dispatch: lb_affine_a8_isa() (lb_common.h), lowered by lb_affine_a8_set_isa                   */
LB_ISA_EXPORTS(affine_a8, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2) | LB_PATH(LB_ISA_AVX512VNNI))

void lb_affine_a8_set_min_parallel_bytes(int64_t n) { g_min_parallel_bytes = n; }

/* ------------------------------------------------------------------------------------------ */
/* helpers                                                                                     */
static inline float weight_zero(const lb_affine_weight* w, int64_t r, int64_t g) {
    if (w->qz) return (float)lb_code_at(w->qz + r * w->qz_stride, w->bits, g);  /* packed like the codes */
    if (w->fz) return ld_f(w->fz, w->fz_f16, r * w->s_stride + g);
    return w->zconst;
}

/* grow-only scratch: one for the caller's per-call activation data, one per worker thread */
static _Thread_local void* t_act = NULL;
static _Thread_local size_t t_act_n = 0;
static _Thread_local float* t_row = NULL;
static _Thread_local size_t t_row_n = 0;

/* ------------------------------------------------------------------------------------------ */
/* activation quantization                                                                     */
static inline void quant_block_scalar(const float* x, int8_t* q, float* sx) {
    float amax = 0.0f;
    for (int i = 0; i < QB; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    if (amax == 0.0f) {
        memset(q, 0, QB);
        *sx = 0.0f;
        return;
    }
    float inv = 127.0f / amax;
    *sx = amax / 127.0f;
    for (int i = 0; i < QB; i++) {
        float v = nearbyintf(x[i] * inv);
        v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
        q[i] = (int8_t)v;
    }
}

#if LB_X86
#define TV __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define TV_INLINE __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"), always_inline)) static inline
#define T2 __attribute__((target("avx2,fma,f16c")))
#define T2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

TV static void quant_blocks_avx512(const float* x, int64_t nb, int8_t* q, float* sx) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t b = 0; b < nb; b++) {
        __m512 a0 = _mm512_loadu_ps(x + b * QB), a1 = _mm512_loadu_ps(x + b * QB + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
        if (!(amax > 0.0f)) { /* zero block (or NaN): the scalar rule */
            quant_block_scalar(x + b * QB, q + b * QB, sx + b);
            continue;
        }
        float inv = 127.0f / amax;
        sx[b] = amax / 127.0f;
        __m512 vi = _mm512_set1_ps(inv);
        /* cvtps rounds with MXCSR (nearest even), the same as nearbyintf */
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, vi)), i1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, vi));
        i0 = _mm512_min_epi32(_mm512_max_epi32(i0, lo), hi);
        i1 = _mm512_min_epi32(_mm512_max_epi32(i1, lo), hi);
        _mm_storeu_si128((__m128i*)(q + b * QB), _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128((__m128i*)(q + b * QB + 16), _mm512_cvtepi32_epi8(i1));
    }
}

T2 static void quant_blocks_avx2(const float* x, int64_t nb, int8_t* q, float* sx) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    for (int64_t b = 0; b < nb; b++) {
        const float* xb = x + b * QB;
        __m256 a[4], m;
        for (int i = 0; i < 4; i++) a[i] = _mm256_loadu_ps(xb + 8 * i);
        m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(a[0], absmask), _mm256_and_ps(a[1], absmask)),
                          _mm256_max_ps(_mm256_and_ps(a[2], absmask), _mm256_and_ps(a[3], absmask)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        float amax = _mm_cvtss_f32(h);
        if (!(amax > 0.0f)) {
            quant_block_scalar(xb, q + b * QB, sx + b);
            continue;
        }
        float inv = 127.0f / amax;
        sx[b] = amax / 127.0f;
        __m256 vi = _mm256_set1_ps(inv);
        __m256i c[4];
        for (int i = 0; i < 4; i++)
            c[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(a[i], vi)), lo), hi);
        /* int32 -> int16 -> int8 with saturating packs (values already in range); the packs
         * interleave 128-bit halves, a final permute restores the order */
        __m256i p01 = _mm256_packs_epi32(c[0], c[1]), p23 = _mm256_packs_epi32(c[2], c[3]);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(q + b * QB), p);
    }
}
#endif

#if LB_X86
/* AVX-512 path, one activation row: quantize every block and write the SIMD-side data directly:
 * the S code streams (stream j byte k = q[k*S + j]), the block scales sx and code sums qsb, and
 * the per-lane scales sxl (lane = 4*S consecutive codes, 8/S lanes per block). */
TV static void act_prep_vnni(const float* x, int64_t nb, int S, int8_t* qs, int64_t NCB, float* sx, int32_t* qsb,
                             float* sxl) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    const __m512i q4 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
    for (int64_t b = 0; b < nb; b++) {
        const float* xb = x + b * QB;
        __m512 a0 = _mm512_loadu_ps(xb), a1 = _mm512_loadu_ps(xb + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
        __m512i i0, i1;
        float s;
        if (amax > 0.0f) {
            float inv = 127.0f / amax;
            s = amax / 127.0f;
            __m512 vi = _mm512_set1_ps(inv);
            i0 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a0, vi)), lo), hi);
            i1 = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a1, vi)), lo), hi);
        } else { /* zero block (or NaN): the scalar rule */
            int8_t t[QB];
            quant_block_scalar(xb, t, &s);
            i0 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)t));
            i1 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(t + 16)));
        }
        sx[b] = s;
        qsb[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        if (S == 1) {
            _mm_storeu_si128((__m128i*)(qs + b * 32), _mm512_cvtepi32_epi8(i0));
            _mm_storeu_si128((__m128i*)(qs + b * 32 + 16), _mm512_cvtepi32_epi8(i1));
            _mm256_storeu_ps(sxl + b * 8, _mm256_set1_ps(s));
        } else if (S == 2) {
            _mm_storeu_si128((__m128i*)(qs + b * 16), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(i0, ev, i1)));
            _mm_storeu_si128((__m128i*)(qs + NCB + b * 16), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(i0, od, i1)));
            _mm_storeu_ps(sxl + b * 4, _mm_set1_ps(s));
        } else {
            for (int j = 0; j < 4; j++) {
                __m512i v = _mm512_permutex2var_epi32(i0, _mm512_add_epi32(q4, _mm512_set1_epi32(j)), i1);
                _mm_storel_epi64((__m128i*)(qs + j * NCB + b * 8), _mm512_cvtepi32_epi8(v));
            }
            sxl[b * 2] = s;
            sxl[b * 2 + 1] = s;
        }
    }
}
#endif

static void quant_blocks(int isa, const float* x, int64_t nb, int8_t* q, float* sx) {
#if LB_X86
    if (isa == A8_VNNI) { quant_blocks_avx512(x, nb, q, sx); return; }
    if (isa == A8_AVX2) { quant_blocks_avx2(x, nb, q, sx); return; }
#endif
    (void)isa;
    for (int64_t b = 0; b < nb; b++) quant_block_scalar(x + b * QB, q + b * QB, sx + b);
}

/* Quantize x [M, K] (K % 32 == 0) with the rule above: q [M, K] int8, sx [M, K/32]; for tests
 * and for callers that want the codes.  Returns 0, or 3 when K % 32 != 0. */
int lb_affine_a8_quantize(const float* x, int64_t M, int64_t K, int8_t* q, float* sx) {
    if (K <= 0 || K % QB || M < 0) return 3;
    for (int64_t m = 0; m < M; m++) quant_blocks(lb_affine_a8_isa(), x + m * K, K / QB, q + m * K, sx + m * (K / QB));
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* per-call activation data                                                                    */
typedef struct {
    int isa, S, CL, CB, mode, zi_fold;
    int64_t K, M, NL, NC, nb;   /* lanes per row (K / 4S), chunks per row, blocks per row */
    int64_t ngp;                /* n_groups rounded up to 16 (row stride of xs) */
    int64_t tail_rmax;          /* last row whose < 8 trailing scales/zero-points may be read 8-wide */
    int64_t nfull;              /* chunks fully inside a weight row's code bytes */
    int64_t code_bytes;         /* K / S */
    int8_t* q;                  /* [M, K] plain codes (scalar path) */
    float* sxb;                 /* [M, nb] block scales */
    int32_t* qsb;               /* [M, nb] block code sums */
    int8_t* qs;                 /* [M, S, NC*CB] streams */
    float* sxl;                 /* [M, NC*CL] lane scales */
    int32_t* zq;                /* [M, NC*CL] initial lane accumulators: (c - zi) * Q_lane */
    float* xs;                  /* [M, ngp]: sum_{b in g} sx_b Q_b, zero-padded */
    int32_t* g0;                /* [NC] first group of a chunk (mode 2) */
    int32_t* idx;               /* [NC, CL] group of a lane relative to g0 (mode 2) */
} a8_act;

#define PAD64(n) (((n) + 63) / 64 * 64)

/* ------------------------------------------------------------------------------------------ */
/* scalar path                                                                                 */
static void rows_scalar(const lb_affine_weight* w, const a8_act* A, const float* bias, float* y, int64_t r0,
                        int64_t r1) {
    const int64_t K = w->K, N = w->N, G = w->G, nb = A->nb, bpg = G / QB;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t* row = w->qw + r * w->row_bytes;
        for (int64_t m = 0; m < A->M; m++) {
            const int8_t* q = A->q + m * K;
            const float* sx = A->sxb + m * nb;
            const float* xs = A->xs + m * A->ngp;
            float acc = 0.0f;
            for (int64_t g = 0; g < w->n_groups; g++) {
                float s = ld_f(w->scales, w->scales_f16, r * w->s_stride + g);
                float z = weight_zero(w, r, g);
                int64_t b0 = w->n_groups == 1 ? 0 : g * bpg, b1 = w->n_groups == 1 ? nb : b0 + bpg;
                if (b1 > nb) b1 = nb;
                float t = 0.0f;
                for (int64_t b = b0; b < b1; b++) {
                    int32_t d = 0;
                    for (int64_t c = b * QB; c < (b + 1) * QB; c++) d += (int32_t)lb_code_at(row, w->bits, c) * q[c];
                    t += sx[b] * (float)d;
                }
                acc += s * (t - z * xs[g]);
            }
            y[m * N + r] = acc + (bias ? bias[r] : 0.0f);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* per-row pre-pass for the SIMD paths: the row's scales as floats (padded by 16 for the
 * per-chunk loads) and, when the zero-point is not folded, the zero-point term per activation row */
#if LB_X86
T2_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* the 8 zero-points of row r from group g (g + 8 <= n_groups) as floats */
T2_INLINE __m256 zeros8(const lb_affine_weight* w, int64_t r, int64_t g) {
    if (w->qz) {
        const int bits = w->bits;
        const uint8_t* p = w->qz + r * w->qz_stride + g * bits / 8;
        if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
        uint32_t v;
        __m256i sh;
        if (bits == 4) {
            memcpy(&v, p, 4);
            sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        } else {
            uint16_t t;
            memcpy(&t, p, 2);
            v = t;
            sh = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
        }
        return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)v), sh),
                                                   _mm256_set1_epi32((1 << bits) - 1)));
    }
    const int64_t o = r * w->s_stride + g;
    if (w->fz_f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)w->fz + o)));
    return _mm256_loadu_ps((const float*)w->fz + o);
}

/* Per-row pre-pass of the SIMD paths: the row's scales as floats in sc (the chunk loop reads up
 * to 7 past the last group but never uses those lanes; sc holds n_groups + 24 floats) and the
 * zero-point term
 * zt[m] = sum_g s_g z_g xs[m, g] unless it is folded into the integer accumulators.  Values
 * are used from registers, never re-read from sc here (a vector load of data just written by
 * narrower stores stalls). */
T2_INLINE void row_prepass(const lb_affine_weight* w, const a8_act* A, int64_t r, float* sc, float* zt) {
    const int64_t ng = w->n_groups, ngp = A->ngp;
    const int zterm = !A->zi_fold && (w->qz || w->fz) && A->M == 1;
    const uint16_t* h = (const uint16_t*)w->scales + r * w->s_stride;
    const float* f = (const float*)w->scales + r * w->s_stride;
    __m256 acc = _mm256_setzero_ps();
    float tail = 0.0f;
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        __m256 sv = w->scales_f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + g))) : _mm256_loadu_ps(f + g);
        _mm256_storeu_ps(sc + g, sv);
        if (zterm) acc = _mm256_fmadd_ps(_mm256_mul_ps(sv, zeros8(w, r, g)), _mm256_loadu_ps(A->xs + g), acc);
    }
    if (g < ng && r <= A->tail_rmax) { /* the last < 8 groups with full-width loads (into the next row) */
        __m256 sv = w->scales_f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + g))) : _mm256_loadu_ps(f + g);
        _mm256_storeu_ps(sc + g, sv); /* sc past n_groups: never used */
        if (zterm) {
            __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(ng - g)),
                                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
            acc = _mm256_fmadd_ps(_mm256_and_ps(_mm256_mul_ps(sv, zeros8(w, r, g)), live), _mm256_loadu_ps(A->xs + g), acc);
        }
        g = ng;
    }
    for (; g < ng; g++) {
        float sg = w->scales_f16 ? _cvtsh_ss(h[g]) : f[g];
        sc[g] = sg;
        if (zterm) tail += (sg * weight_zero(w, r, g)) * A->xs[g];
    }
    if (A->zi_fold) {
        for (int64_t m = 0; m < A->M; m++) zt[m] = 0.0f;
        return;
    }
    if (zterm) {
        zt[0] = hsum256(acc) + tail;
        return;
    }
    /* a non-integer constant zero-point, or several activation rows: scalar */
    for (int64_t m = 0; m < A->M; m++) {
        const float* xs = A->xs + m * ngp;
        float t = 0.0f;
        for (int64_t j = 0; j < ng; j++) t += (sc[j] * weight_zero(w, r, j)) * xs[j];
        zt[m] = t;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 VNNI: 64-byte chunks, 16 int32 lanes of 4*S codes each                             */
TV_INLINE __m512i vnni_dot(__m512i acc, __m512i wv, const int8_t* qs, int64_t sstride, const int BITS) {
    const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
    if (BITS == 8) return _mm512_dpbusd_epi32(acc, wv, _mm512_loadu_si512(qs));
    if (BITS == 4) {
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(wv, mask), _mm512_loadu_si512(qs));
        return _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask),
                                   _mm512_loadu_si512(qs + sstride));
    }
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(wv, mask), _mm512_loadu_si512(qs));
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(wv, 2), mask), _mm512_loadu_si512(qs + sstride));
    acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask),
                              _mm512_loadu_si512(qs + 2 * sstride));
    return _mm512_dpbusd_epi32(acc, _mm512_srli_epi16(_mm512_andnot_si512(_mm512_set1_epi8(0x3f), wv), 6),
                               _mm512_loadu_si512(qs + 3 * sstride));
}

/* rows r .. r+RB-1, activation row m; MODE 0: one group per row, 1: one group per chunk,
 * 2: several groups per chunk (per-lane table) */
TV_INLINE void vnni_rows(const lb_affine_weight* w, const a8_act* A, int64_t r, int64_t m, float** sc,
                         const float* zt, const float* bias, float* y, const int RB, const int BITS,
                         const int MODE) {
    const int S = 8 / BITS;
    const int64_t NCB = A->NC * 64;
    const int8_t* qs = A->qs + m * S * NCB;
    const float* sxl = A->sxl + m * A->NC * 16;
    const int32_t* zq = A->zq + m * A->NC * 16;
    const uint8_t* p[4];
    __m512 acc[4];
    for (int i = 0; i < RB; i++) {
        p[i] = w->qw + (r + i) * w->row_bytes;
        acc[i] = _mm512_setzero_ps();
    }
    const int64_t NC = A->NC, nfull = A->nfull;
    for (int64_t c = 0; c < NC; c++) {
        __m512i z0 = _mm512_load_si512(zq + c * 16);
        __m512 sxv = _mm512_load_ps(sxl + c * 16);
        __mmask64 km = 0;
        if (c >= nfull) {
            int64_t avail = A->code_bytes - c * 64;
            km = avail >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << avail) - 1);
        }
        int64_t gg = MODE ? A->g0[c] : 0;
        for (int i = 0; i < RB; i++) {
            _mm_prefetch((const char*)(p[i] + c * 64 + A8_PREFETCH), _MM_HINT_T0);
            __m512i wv = c < nfull ? _mm512_loadu_si512(p[i] + c * 64) : _mm512_maskz_loadu_epi8(km, p[i] + c * 64);
            __m512i ia = vnni_dot(z0, wv, qs + c * 64, NCB, BITS);
            __m512 f = _mm512_cvtepi32_ps(ia);
            if (MODE == 0) {
                acc[i] = _mm512_fmadd_ps(f, sxv, acc[i]);
            } else if (MODE == 1) {
                acc[i] = _mm512_fmadd_ps(f, _mm512_mul_ps(sxv, _mm512_set1_ps(sc[i][gg])), acc[i]);
            } else {
                __m512i ix = _mm512_load_si512(A->idx + c * 16);
                __m512 sw = _mm512_permutexvar_ps(ix, _mm512_castps256_ps512(_mm256_loadu_ps(sc[i] + gg)));
                acc[i] = _mm512_fmadd_ps(f, _mm512_mul_ps(sxv, sw), acc[i]);
            }
        }
    }
    if (RB == 4) { /* the four horizontal sums at once */
        __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(acc[0], acc[1]), _mm512_unpackhi_ps(acc[0], acc[1]));
        __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(acc[2], acc[3]), _mm512_unpackhi_ps(acc[2], acc[3]));
        __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
        __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)), _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
        __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        const int64_t M = A->M;
        if (MODE == 0) v = _mm_mul_ps(v, _mm_setr_ps(sc[0][0], sc[1][0], sc[2][0], sc[3][0]));
        v = _mm_sub_ps(v, _mm_setr_ps(zt[m], zt[M + m], zt[2 * M + m], zt[3 * M + m]));
        if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias + r));
        _mm_storeu_ps(y + m * w->N + r, v);
        return;
    }
    for (int i = 0; i < RB; i++) {
        float v = _mm512_reduce_add_ps(acc[i]);
        if (MODE == 0) v *= sc[i][0];
        y[m * w->N + r + i] = v - zt[i * A->M + m] + (bias ? bias[r + i] : 0.0f);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX2: 32-byte chunks, 8 int32 lanes of 4*S codes each                                      */
T2_INLINE __m256i avx2_dot(__m256i wv, const int8_t* qs, int64_t sstride, const int BITS) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p16;
    if (BITS == 8) { /* (u - 128) * q with the sign on q: |u - 128| <= 128, |q| <= 127, no saturation */
        __m256i ws = _mm256_xor_si256(wv, _mm256_set1_epi8((char)0x80));
        __m256i qv = _mm256_loadu_si256((const __m256i*)qs);
        p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(qv, ws));
    } else {
        const __m256i mask = _mm256_set1_epi8((char)((1 << BITS) - 1));
        p16 = _mm256_maddubs_epi16(_mm256_and_si256(wv, mask), _mm256_loadu_si256((const __m256i*)qs));
        for (int j = 1; j < 8 / BITS; j++) {
            __m256i u = _mm256_and_si256(_mm256_srli_epi16(wv, j * BITS), mask);
            p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i*)(qs + j * sstride))));
        }
    }
    return _mm256_madd_epi16(p16, ones);
}


T2_INLINE __m256i load32_u8(const uint8_t* p, int64_t avail) {
    if (avail >= 32) return _mm256_loadu_si256((const __m256i*)p);
    uint8_t t[32] = {0};
    memcpy(t, p, (size_t)avail);
    return _mm256_loadu_si256((const __m256i*)t);
}

T2_INLINE void avx2_rows(const lb_affine_weight* w, const a8_act* A, int64_t r, int64_t m, float** sc,
                         const float* zt, const float* bias, float* y, const int RB, const int BITS,
                         const int MODE) {
    const int S = 8 / BITS;
    const int64_t NCB = A->NC * 32;
    const int8_t* qs = A->qs + m * S * NCB;
    const float* sxl = A->sxl + m * A->NC * 8;
    const int32_t* zq = A->zq + m * A->NC * 8;
    const uint8_t* p[4];
    __m256 acc[4];
    for (int i = 0; i < RB; i++) {
        p[i] = w->qw + (r + i) * w->row_bytes;
        acc[i] = _mm256_setzero_ps();
    }
    const int64_t NC = A->NC, nfull = A->nfull;
    for (int64_t c = 0; c < NC; c++) {
        __m256i z0 = _mm256_load_si256((const __m256i*)(zq + c * 8));
        __m256 sxv = _mm256_load_ps(sxl + c * 8);
        int64_t gg = MODE ? A->g0[c] : 0;
        for (int i = 0; i < RB; i++) {
            if (!(c & 1)) _mm_prefetch((const char*)(p[i] + c * 32 + A8_PREFETCH), _MM_HINT_T0);
            __m256i wv = c < nfull ? _mm256_loadu_si256((const __m256i*)(p[i] + c * 32))
                                   : load32_u8(p[i] + c * 32, A->code_bytes - c * 32);
            __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(avx2_dot(wv, qs + c * 32, NCB, BITS), z0));
            if (MODE == 0) {
                acc[i] = _mm256_fmadd_ps(f, sxv, acc[i]);
            } else if (MODE == 1) {
                acc[i] = _mm256_fmadd_ps(f, _mm256_mul_ps(sxv, _mm256_set1_ps(sc[i][gg])), acc[i]);
            } else {
                __m256i ix = _mm256_load_si256((const __m256i*)(A->idx + c * 8));
                __m256 sw = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sc[i] + gg), ix);
                acc[i] = _mm256_fmadd_ps(f, _mm256_mul_ps(sxv, sw), acc[i]);
            }
        }
    }
    if (RB == 4) { /* the four horizontal sums at once */
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        __m128 v = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        const int64_t M = A->M;
        if (MODE == 0) v = _mm_mul_ps(v, _mm_setr_ps(sc[0][0], sc[1][0], sc[2][0], sc[3][0]));
        v = _mm_sub_ps(v, _mm_setr_ps(zt[m], zt[M + m], zt[2 * M + m], zt[3 * M + m]));
        if (bias) v = _mm_add_ps(v, _mm_loadu_ps(bias + r));
        _mm_storeu_ps(y + m * w->N + r, v);
        return;
    }
    for (int i = 0; i < RB; i++) {
        float v = hsum256(acc[i]);
        if (MODE == 0) v *= sc[i][0];
        y[m * w->N + r + i] = v - zt[i * A->M + m] + (bias ? bias[r + i] : 0.0f);
    }
}

/* Row drivers: for the thread's rows, every activation row; RB = 4 rows at a time (they share
 * every activation load; their four horizontal sums are done together), leftover rows one by
 * one.  The pre-pass of the next row quad runs before the current quad's chunk loop (two buffer
 * sets), so that the chunk loop's vector loads of a scale buffer never wait on the narrower
 * stores that filled it. */
#define ROWS_FN(NAME, INNER, ATTR, BITS, MODE)                                                          \
    ATTR static void NAME(const lb_affine_weight* w, const a8_act* A, const float* bias, float* y,      \
                          float* scr, int64_t r0, int64_t r1) {                                          \
        const int64_t sl = w->n_groups + 24, M = A->M;                                                   \
        float* sc[2][4];                                                                                 \
        float* zt[2];                                                                                    \
        for (int k = 0; k < 2; k++) {                                                                    \
            for (int i = 0; i < 4; i++) sc[k][i] = scr + (4 * k + i) * sl;                               \
            zt[k] = scr + 8 * sl + 4 * k * M; /* [4, M] */                                               \
        }                                                                                                \
        const int64_t nq = (r1 - r0) / 4;                                                                \
        if (nq > 0)                                                                                      \
            for (int i = 0; i < 4; i++) row_prepass(w, A, r0 + i, sc[0][i], zt[0] + i * M);              \
        int k = 0;                                                                                       \
        for (int64_t q = 0; q < nq; q++, k ^= 1) {                                                       \
            int64_t r = r0 + 4 * q;                                                                      \
            if (q + 1 < nq)                                                                              \
                for (int i = 0; i < 4; i++) row_prepass(w, A, r + 4 + i, sc[k ^ 1][i], zt[k ^ 1] + i * M); \
            for (int64_t m = 0; m < M; m++) INNER(w, A, r, m, sc[k], zt[k], bias, y, 4, BITS, MODE);     \
        }                                                                                                \
        for (int64_t r = r0 + 4 * nq; r < r1; r++) {                                                     \
            row_prepass(w, A, r, sc[0][0], zt[0]);                                                       \
            for (int64_t m = 0; m < M; m++) INNER(w, A, r, m, sc[0], zt[0], bias, y, 1, BITS, MODE);     \
        }                                                                                                \
    }

#define ROWS_ALL(P, INNER, ATTR)                                                                         \
    ROWS_FN(P##_2_0, INNER, ATTR, 2, 0) ROWS_FN(P##_2_1, INNER, ATTR, 2, 1) ROWS_FN(P##_2_2, INNER, ATTR, 2, 2) \
    ROWS_FN(P##_4_0, INNER, ATTR, 4, 0) ROWS_FN(P##_4_1, INNER, ATTR, 4, 1) ROWS_FN(P##_4_2, INNER, ATTR, 4, 2) \
    ROWS_FN(P##_8_0, INNER, ATTR, 8, 0) ROWS_FN(P##_8_1, INNER, ATTR, 8, 1) ROWS_FN(P##_8_2, INNER, ATTR, 8, 2)

ROWS_ALL(vnni, vnni_rows, TV)
ROWS_ALL(avx2, avx2_rows, T2)

typedef void (*rows_fn)(const lb_affine_weight*, const a8_act*, const float*, float*, float*, int64_t, int64_t);
/* [bits 2/4/8][mode] */
static const rows_fn VNNI_FNS[3][3] = {{vnni_2_0, vnni_2_1, vnni_2_2}, {vnni_4_0, vnni_4_1, vnni_4_2},
                                       {vnni_8_0, vnni_8_1, vnni_8_2}};
static const rows_fn AVX2_FNS[3][3] = {{avx2_2_0, avx2_2_1, avx2_2_2}, {avx2_4_0, avx2_4_1, avx2_4_2},
                                       {avx2_8_0, avx2_8_1, avx2_8_2}};

/* lane code sums in the SIMD lane layout, and the initial accumulators */
TV static void lane_sums_vnni(const int8_t* qs, int64_t NCB, int S, int64_t NC, int32_t* zq, int32_t zmul) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t c = 0; c < NC; c++) {
        __m512i s = _mm512_setzero_si512();
        for (int j = 0; j < S; j++) s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512(qs + j * NCB + c * 64));
        _mm512_store_si512(zq + c * 16, _mm512_mullo_epi32(s, _mm512_set1_epi32(zmul)));
    }
}
#endif /* LB_X86 */

/* ------------------------------------------------------------------------------------------ */
/* Several activation rows (prompts, evaluation): a register-blocked GEMM.                     */
/*
 * The row kernels above keep the decode layout (lanes along K, one activation row at a time),
 * which re-unpacks every weight chunk for each activation row and needs a horizontal sum per
 * output.  From A8_GEMM_MIN_ROWS rows on, the call runs this GEMM instead; same numbers (the
 * activation quantization is the same function, every D_b and Q_b the same exact integer),
 * only the float sums are ordered differently.
 *
 * Weight panels: GP consecutive output rows at a time are unpacked to one byte per code and
 * transposed to [K/4][GP][4] (4 consecutive codes of row r at int32 position kq*GP + r), so
 * that one vector holds 4 codes of GP/16 (AVX-512) or GP/8 (AVX2) rows, and the activation
 * is a broadcast int32 of 4 consecutive int8 codes: vpdpbusd (u8 codes x s8 activations)
 * accumulates the block's integer dot D_b of 16 rows in one instruction per 4 columns.  A tile
 * is GP rows x up to 4 activation rows; per 32-column block its integer accumulators are
 * converted once and multiplied by the activation's block scale, per group by the weight
 * scale, and the zero-point term subtracts s_w * z * xs_g (xs_g = sum_{b in g} sx_b Q_b).
 * AVX2 (no vpdpbusd): vpmaddubsw into int16 over a whole 32-column block (codes <= 15 times
 * |q| <= 127: 8 pair sums stay below 2^15), then vpmaddwd; 8-bit codes are stored as
 * u - 128 and use the sign trick (one vpmaddwd per 4 columns), their zero-point term takes
 * z - 128.  A panel is packed once and used for every activation row; packing is O(N K) for
 * an O(M N K) product.  The scalar path keeps the naive row loop.
 */
#ifndef A8_GEMM_MIN_ROWS
#define A8_GEMM_MIN_ROWS 8
#endif
static int64_t g_gemm_min_rows = A8_GEMM_MIN_ROWS;
/* rows from which a call runs the GEMM (tests lower/raise it to reach both paths) */
void lb_affine_a8_set_gemm_min_rows(int64_t n) { g_gemm_min_rows = n < 1 ? 1 : n; }

static _Thread_local void* t_pan = NULL;
static _Thread_local size_t t_pan_n = 0;

typedef struct {
    int64_t M, K, N, nb, ng, bpg;
    const int8_t* q;  /* [M, K] activation codes */
    const float* sx;  /* [M, nb] block scales */
    const float* xs;  /* [M, ng] sum_{b in g} sx_b Q_b */
} a8_gemm_act;

#if LB_X86
/* Pack rows r0 .. r0+GP-1 (rows past N: code 0, scale 0) into pan [K/4][GP][4] (flip: codes
 * stored as u ^ 0x80, i.e. u - 128 as int8), ps[g][GP] = s_w, psz[g][GP] = s_w * (z - centre),
 * pb[GP] = bias (or 0).  tmp holds 4 unpacked rows (4 K bytes). */
T2 static void pack_panel(const lb_affine_weight* w, const float* bias, int64_t r0, int GP, int flip, int centre,
                          uint8_t* tmp, uint8_t* pan, float* ps, float* psz, float* pb) {
    const int64_t K = w->K, N = w->N, ng = w->n_groups, nkq = K / 4;
    const __m128i fl = _mm_set1_epi8(flip ? (char)0x80 : 0);
    for (int rb = 0; rb < GP; rb += 4) {
        for (int i = 0; i < 4; i++) {
            int64_t r = r0 + rb + i;
            if (r < N) lb_unpack_codes(w->qw + r * w->row_bytes, w->bits, K, tmp + i * K);
            else memset(tmp + i * K, 0, (size_t)K);
        }
        for (int64_t kq = 0; kq < nkq; kq += 4) {
            __m128i t0 = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(tmp + 4 * kq)), fl);
            __m128i t1 = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(tmp + K + 4 * kq)), fl);
            __m128i t2 = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(tmp + 2 * K + 4 * kq)), fl);
            __m128i t3 = _mm_xor_si128(_mm_loadu_si128((const __m128i*)(tmp + 3 * K + 4 * kq)), fl);
            __m128i a = _mm_unpacklo_epi32(t0, t1), b = _mm_unpacklo_epi32(t2, t3);
            __m128i c = _mm_unpackhi_epi32(t0, t1), d = _mm_unpackhi_epi32(t2, t3);
            uint8_t* o = pan + (kq * GP + rb) * 4;
            _mm_storeu_si128((__m128i*)o, _mm_unpacklo_epi64(a, b));
            _mm_storeu_si128((__m128i*)(o + GP * 4), _mm_unpackhi_epi64(a, b));
            _mm_storeu_si128((__m128i*)(o + 2 * GP * 4), _mm_unpacklo_epi64(c, d));
            _mm_storeu_si128((__m128i*)(o + 3 * GP * 4), _mm_unpackhi_epi64(c, d));
        }
    }
    /* the tables: hardware half conversions and the zero-point's kind decided per row, not per
     * element (this was a third of the packing time at group size 32) */
    const float zc = w->zconst - (float)centre;
    for (int j = 0; j < GP; j++) {
        const int64_t r = r0 + j;
        pb[j] = bias && r < N ? bias[r] : 0.0f;
        if (r >= N) {
            for (int64_t g = 0; g < ng; g++) ps[g * GP + j] = psz[g * GP + j] = 0.0f;
            continue;
        }
        const int64_t so = r * w->s_stride;
        const uint16_t* sh = (const uint16_t*)w->scales + so;
        const float* sf = (const float*)w->scales + so;
        if (w->qz) {
            const uint8_t* zq = w->qz + r * w->qz_stride;
            for (int64_t g = 0; g < ng; g++) {
                const float sg = w->scales_f16 ? _cvtsh_ss(sh[g]) : sf[g];
                ps[g * GP + j] = sg;
                psz[g * GP + j] = sg * ((float)lb_code_at(zq, w->bits, g) - (float)centre);
            }
        } else if (w->fz) {
            const uint16_t* zh = (const uint16_t*)w->fz + so;
            const float* zf = (const float*)w->fz + so;
            for (int64_t g = 0; g < ng; g++) {
                const float sg = w->scales_f16 ? _cvtsh_ss(sh[g]) : sf[g];
                ps[g * GP + j] = sg;
                psz[g * GP + j] = sg * ((w->fz_f16 ? _cvtsh_ss(zh[g]) : zf[g]) - (float)centre);
            }
        } else {
            for (int64_t g = 0; g < ng; g++) {
                const float sg = w->scales_f16 ? _cvtsh_ss(sh[g]) : sf[g];
                ps[g * GP + j] = sg;
                psz[g * GP + j] = sg * zc;
            }
        }
    }
}

static inline int32_t ld_i32(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* AVX-512 VNNI tile: 32 rows (two vectors) x C activation rows from m0 */
#define GP_VNNI 32
TV_INLINE void vnni_tile(const uint8_t* pan, const float* ps, const float* psz, const float* pb,
                         const a8_gemm_act* A, int64_t m0, float* y, int64_t r0, const int C) {
    const int64_t K = A->K, nb = A->nb, ng = A->ng, bpg = A->bpg;
    __m512 o0[4], o1[4];
    const int8_t* q[4];
    for (int c = 0; c < C; c++) {
        o0[c] = _mm512_setzero_ps();
        o1[c] = _mm512_setzero_ps();
        q[c] = A->q + (m0 + c) * K;
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512 f0[4], f1[4];
        for (int c = 0; c < C; c++) {
            f0[c] = _mm512_setzero_ps();
            f1[c] = _mm512_setzero_ps();
        }
        const int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            __m512i a0[4], a1[4];
            for (int c = 0; c < C; c++) {
                a0[c] = _mm512_setzero_si512();
                a1[c] = _mm512_setzero_si512();
            }
            const uint8_t* pw = pan + b * 8 * GP_VNNI * 4;
            for (int k = 0; k < 8; k++) {
                __m512i w0 = _mm512_load_si512(pw + k * 128), w1 = _mm512_load_si512(pw + k * 128 + 64);
                for (int c = 0; c < C; c++) {
                    __m512i xb = _mm512_set1_epi32(ld_i32(q[c] + b * QB + 4 * k));
                    a0[c] = _mm512_dpbusd_epi32(a0[c], w0, xb);
                    a1[c] = _mm512_dpbusd_epi32(a1[c], w1, xb);
                }
            }
            for (int c = 0; c < C; c++) {
                __m512 s = _mm512_set1_ps(A->sx[(m0 + c) * nb + b]);
                f0[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0[c]), s, f0[c]);
                f1[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1[c]), s, f1[c]);
            }
        }
        __m512 s0 = _mm512_load_ps(ps + g * GP_VNNI), s1 = _mm512_load_ps(ps + g * GP_VNNI + 16);
        __m512 z0 = _mm512_load_ps(psz + g * GP_VNNI), z1 = _mm512_load_ps(psz + g * GP_VNNI + 16);
        for (int c = 0; c < C; c++) {
            __m512 xv = _mm512_set1_ps(A->xs[(m0 + c) * ng + g]);
            o0[c] = _mm512_fnmadd_ps(z0, xv, _mm512_fmadd_ps(f0[c], s0, o0[c]));
            o1[c] = _mm512_fnmadd_ps(z1, xv, _mm512_fmadd_ps(f1[c], s1, o1[c]));
        }
    }
    const int64_t nr = A->N - r0;
    const __mmask16 k0 = nr >= 16 ? 0xffff : (__mmask16)((1u << nr) - 1);
    const __mmask16 k1 = nr >= 32 ? 0xffff : (nr <= 16 ? 0 : (__mmask16)((1u << (nr - 16)) - 1));
    __m512 b0 = _mm512_load_ps(pb), b1v = _mm512_load_ps(pb + 16);
    for (int c = 0; c < C; c++) {
        float* yr = y + (m0 + c) * A->N + r0;
        _mm512_mask_storeu_ps(yr, k0, _mm512_add_ps(o0[c], b0));
        _mm512_mask_storeu_ps(yr + 16, k1, _mm512_add_ps(o1[c], b1v));
    }
}

TV static void vnni_panel_rows(const uint8_t* pan, const float* ps, const float* psz, const float* pb,
                               const a8_gemm_act* A, float* y, int64_t r0) {
    int64_t m = 0;
    for (; m + 4 <= A->M; m += 4) vnni_tile(pan, ps, psz, pb, A, m, y, r0, 4);
    switch (A->M - m) {
    case 3: vnni_tile(pan, ps, psz, pb, A, m, y, r0, 3); break;
    case 2: vnni_tile(pan, ps, psz, pb, A, m, y, r0, 2); break;
    case 1: vnni_tile(pan, ps, psz, pb, A, m, y, r0, 1); break;
    default: break;
    }
}

/* AVX2 tile: 8 rows (one vector) x C activation rows; SIGN: 8-bit codes stored as u - 128 */
#define GP_AVX2 8
T2_INLINE void avx2_tile(const uint8_t* pan, const float* ps, const float* psz, const float* pb,
                         const a8_gemm_act* A, int64_t m0, float* y, int64_t r0, const int C, const int SIGN) {
    const int64_t K = A->K, nb = A->nb, ng = A->ng, bpg = A->bpg;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 o[4];
    const int8_t* q[4];
    for (int c = 0; c < C; c++) {
        o[c] = _mm256_setzero_ps();
        q[c] = A->q + (m0 + c) * K;
    }
    /* 16 ymm registers: no per-group float partials (as the AVX-512 tile keeps); the weight
     * scale is folded into each block's factor instead (s_w * sx_b, one multiply per block) */
    for (int64_t g = 0; g < ng; g++) {
        const __m256 s = _mm256_load_ps(ps + g * GP_AVX2);
        const int64_t b1 = (g + 1) * bpg < nb ? (g + 1) * bpg : nb;
        for (int64_t b = g * bpg; b < b1; b++) {
            __m256i a[4];
            for (int c = 0; c < C; c++) a[c] = _mm256_setzero_si256();
            const uint8_t* pw = pan + b * 8 * GP_AVX2 * 4;
            for (int k = 0; k < 8; k++) {
                __m256i wv = _mm256_load_si256((const __m256i*)(pw + k * 32));
                if (SIGN) {
                    __m256i aw = _mm256_abs_epi8(wv);
                    for (int c = 0; c < C; c++) {
                        __m256i xb = _mm256_set1_epi32(ld_i32(q[c] + b * QB + 4 * k));
                        a[c] = _mm256_add_epi32(a[c], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xb, wv)), ones));
                    }
                } else {
                    for (int c = 0; c < C; c++) {
                        __m256i xb = _mm256_set1_epi32(ld_i32(q[c] + b * QB + 4 * k));
                        a[c] = _mm256_add_epi16(a[c], _mm256_maddubs_epi16(wv, xb));
                    }
                }
            }
            for (int c = 0; c < C; c++) {
                __m256i d = SIGN ? a[c] : _mm256_madd_epi16(a[c], ones);
                o[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(s, _mm256_set1_ps(A->sx[(m0 + c) * nb + b])), o[c]);
            }
        }
        const __m256 z = _mm256_load_ps(psz + g * GP_AVX2);
        for (int c = 0; c < C; c++) o[c] = _mm256_fnmadd_ps(z, _mm256_set1_ps(A->xs[(m0 + c) * ng + g]), o[c]);
    }
    const int64_t nr = A->N - r0;
    const __m256 bv = _mm256_load_ps(pb);
    for (int c = 0; c < C; c++) {
        float* yr = y + (m0 + c) * A->N + r0;
        __m256 v = _mm256_add_ps(o[c], bv);
        if (nr >= 8) {
            _mm256_storeu_ps(yr, v);
        } else {
            float t[8];
            _mm256_storeu_ps(t, v);
            for (int64_t j = 0; j < nr; j++) yr[j] = t[j];
        }
    }
}

#define AVX2_PANEL(NAME, SIGN)                                                                          \
    T2 static void NAME(const uint8_t* pan, const float* ps, const float* psz, const float* pb,         \
                        const a8_gemm_act* A, float* y, int64_t r0) {                                   \
        int64_t m = 0;                                                                                  \
        for (; m + 4 <= A->M; m += 4) avx2_tile(pan, ps, psz, pb, A, m, y, r0, 4, SIGN);                \
        switch (A->M - m) {                                                                             \
        case 3: avx2_tile(pan, ps, psz, pb, A, m, y, r0, 3, SIGN); break;                               \
        case 2: avx2_tile(pan, ps, psz, pb, A, m, y, r0, 2, SIGN); break;                               \
        case 1: avx2_tile(pan, ps, psz, pb, A, m, y, r0, 1, SIGN); break;                               \
        default: break;                                                                                 \
        }                                                                                               \
    }
AVX2_PANEL(avx2_panel_rows, 0)
AVX2_PANEL(avx2_panel_rows_sign, 1)

/* the GEMM; isa is A8_VNNI or A8_AVX2, the weight already validated by the entry point */
static int a8_gemm(const lb_affine_weight* w, const float* x, int64_t M, const float* bias, float* y, int nthreads,
                   int isa) {
    const int64_t K = w->K, N = w->N, ng = w->n_groups, nb = K / QB;
    const int GP = isa == A8_VNNI ? GP_VNNI : GP_AVX2;
    const int sign = isa == A8_AVX2 && w->bits == 8, centre = sign ? 128 : 0;
    a8_gemm_act A = {M, K, N, nb, ng, ng == 1 ? nb : w->G / QB, NULL, NULL, NULL};
    const size_t off_sx = PAD64(M * K), off_xs = off_sx + PAD64(M * nb * 4), total = off_xs + PAD64(M * ng * 4);
    uint8_t* base = (uint8_t*)lb_grow(&t_act, &t_act_n, total);
    if (!base) return 2;
    int8_t* q = (int8_t*)base;
    float* sx = (float*)(base + off_sx);
    float* xs = (float*)(base + off_xs);
    A.q = q;
    A.sx = sx;
    A.xs = xs;
    const int64_t npan = (N + GP - 1) / GP;
    const int nt = pick_threads(nthreads, N * w->row_bytes * (M / 4 + 1), npan);
    const size_t pan_b = PAD64(K * GP), tmp_b = PAD64(4 * K), tab_b = PAD64(ng * GP * 4);
    int bad = 0;
#pragma omp parallel num_threads(nt) reduction(| : bad)
    {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            int8_t* qm = q + m * K;
            float* sxm = sx + m * nb;
            quant_blocks(isa, x + m * K, nb, qm, sxm);
            for (int64_t g = 0; g < ng; g++) {
                const int64_t b1 = (g + 1) * A.bpg < nb ? (g + 1) * A.bpg : nb;
                float t = 0.0f;
                for (int64_t b = g * A.bpg; b < b1; b++) {
                    int32_t s = 0;
                    for (int i = 0; i < QB; i++) s += qm[b * QB + i];
                    t += sxm[b] * (float)s;
                }
                xs[m * ng + g] = t;
            }
        }
        int64_t p0, p1;
        thread_rows(npan, nt, omp_get_thread_num(), 1, &p0, &p1);
        if (p0 < p1) {
            uint8_t* s = (uint8_t*)lb_grow(&t_pan, &t_pan_n, pan_b + tmp_b + 2 * tab_b + 64 * 4);
            if (!s) {
                bad = 1;
            } else {
                uint8_t* pan = s;
                uint8_t* tmp = s + pan_b;
                float* ps = (float*)(s + pan_b + tmp_b);
                float* psz = (float*)(s + pan_b + tmp_b + tab_b);
                float* pb = (float*)(s + pan_b + tmp_b + 2 * tab_b);
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t r0 = p * GP;
                    pack_panel(w, bias, r0, GP, sign, centre, tmp, pan, ps, psz, pb);
                    if (p + 1 < p1) { /* the next panel's codes on their way to L2 while this one computes */
                        const uint8_t* nx = w->qw + (r0 + GP) * w->row_bytes;
                        const int64_t rows = N - r0 - GP < GP ? N - r0 - GP : GP;
                        for (int64_t o = 0; o < rows * w->row_bytes; o += 64) _mm_prefetch((const char*)(nx + o), _MM_HINT_T1);
                    }
                    if (isa == A8_VNNI) vnni_panel_rows(pan, ps, psz, pb, &A, y, r0);
                    else if (sign) avx2_panel_rows_sign(pan, ps, psz, pb, &A, y, r0);
                    else avx2_panel_rows(pan, ps, psz, pb, &A, y, r0);
                }
            }
        }
    }
    return bad ? 2 : 0;
}
#endif /* LB_X86 */

/* ------------------------------------------------------------------------------------------ */
/* entry point                                                                                 */
int lb_affine_a8_linear_w(const lb_affine_weight* w, const float* x, int64_t M, const float* bias, float* y,
                          int nthreads) {
    if (!w) return 2;
    const int bits = w->bits;
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    const int64_t K = w->K, N = w->N, G = w->G, ng = w->n_groups;
    if (M < 0 || K <= 0 || N < 0 || G <= 0 || ng <= 0 || (ng - 1) * G >= K || ng * G < K) return 2;
    if (w->row_bytes * 8 < K * bits) return 2;
    if (K % QB) return 3;
    if (ng > 1 && G % QB) return 4;
    if (M == 0 || N == 0) return 0;
    if (!x || !y || !w->qw || !w->scales) return 2;
#if LB_X86
    if (M >= g_gemm_min_rows) {
        const int isa = lb_affine_a8_isa();
        if (isa == A8_VNNI || isa == A8_AVX2) return a8_gemm(w, x, M, bias, y, nthreads, isa);
    }
#endif

#if LB_X86
    /* start the first weight bytes of every thread's share on their way from memory while the
     * activations are quantized (the chunk loops prefetch A8_PREFETCH bytes ahead from there) */
    {
        const int64_t span = N * w->row_bytes;
        const int nt0 = pick_threads(nthreads, span, N);
        const int64_t per = span / nt0;
        for (int t = 0; t < nt0; t++)
            for (int64_t o = 0; o < A8_PREFETCH && o < per; o += 64)
                _mm_prefetch((const char*)(w->qw + t * per + o), _MM_HINT_T0);
    }
#endif
    a8_act A;
    memset(&A, 0, sizeof A);
    A.isa = lb_affine_a8_isa();
    A.S = 8 / bits;
    A.K = K;
    A.M = M;
    A.nb = K / QB;
    A.code_bytes = K / A.S;
    A.CL = A.isa == A8_VNNI ? 16 : 8;
    A.CB = 4 * A.CL;
    A.NL = K / (4 * A.S);
    A.NC = (A.NL + A.CL - 1) / A.CL;
    A.nfull = A.code_bytes / A.CB;
    A.ngp = (ng + 15) / 16 * 16;
    /* The tensors are [N, n_groups] (zero-points [N, qz_stride] bytes): reading 8 scales (4/8/2
     * bytes of packed zero-points) from the last partial group block runs into the next row,
     * which is fine for every row but the last few. */
    A.tail_rmax = -1;
    if (ng % 8 && w->s_stride > 0) {
        const int64_t gt = ng / 8 * 8;
        int64_t rmax = (N * w->s_stride - gt - 8) / w->s_stride; /* r * s_stride + gt + 8 <= N * s_stride */
        if (N * w->s_stride - gt - 8 < 0) rmax = -1;
        if (w->qz) {
            const int64_t nbz = bits == 8 ? 8 : (bits == 4 ? 4 : 2), off = gt * bits / 8 + nbz;
            int64_t rz = w->qz_stride > 0 && N * w->qz_stride - off >= 0 ? (N * w->qz_stride - off) / w->qz_stride : -1;
            if (rz < rmax) rmax = rz;
        }
        A.tail_rmax = rmax;
    }
    const int64_t cpc = (int64_t)A.CB * A.S;
    A.mode = ng == 1 ? 0 : (G % cpc == 0 ? 1 : 2);
    /* centring of the integer dot on each path: AVX2 8-bit computes sum (u - 128) q */
    const int centre = (A.isa == A8_AVX2 && bits == 8) ? 128 : 0;
    int zi = 0;
    if (!w->qz && !w->fz && w->zconst == nearbyintf(w->zconst) && fabsf(w->zconst) <= 256.0f) {
        zi = (int)w->zconst;
        A.zi_fold = 1;
    }

    /* scratch layout (64-byte aligned pieces) */
    const int64_t NCB = A.NC * A.CB, NLP = A.NC * A.CL;
    size_t off_q = 0, off_sxb = off_q + PAD64(M * K), off_qsb = off_sxb + PAD64(M * A.nb * 4),
           off_qs = off_qsb + PAD64(M * A.nb * 4), off_sxl = off_qs + PAD64(M * A.S * NCB),
           off_zq = off_sxl + PAD64(M * NLP * 4), off_xs = off_zq + PAD64(M * NLP * 4),
           off_g0 = off_xs + PAD64(M * A.ngp * 4), off_idx = off_g0 + PAD64(A.NC * 4),
           total = off_idx + PAD64(A.NC * A.CL * 4);
    uint8_t* base = (uint8_t*)lb_grow(&t_act, &t_act_n, total);
    if (!base) return 2;
    A.q = (int8_t*)(base + off_q);
    A.sxb = (float*)(base + off_sxb);
    A.qsb = (int32_t*)(base + off_qsb);
    A.qs = (int8_t*)(base + off_qs);
    A.sxl = (float*)(base + off_sxl);
    A.zq = (int32_t*)(base + off_zq);
    A.xs = (float*)(base + off_xs);
    A.g0 = (int32_t*)(base + off_g0);
    A.idx = (int32_t*)(base + off_idx);

    const int64_t bpg = ng == 1 ? A.nb : G / QB;
    const int lpb = QB / (4 * A.S); /* lanes per block */
    const int32_t zmul = centre - (A.zi_fold ? zi : 0);
    for (int64_t m = 0; m < M; m++) {
        int8_t* q = A.q + m * K;
        float* sx = A.sxb + m * A.nb;
        int32_t* qsb = A.qsb + m * A.nb;
        int8_t* qs = A.qs + m * A.S * NCB;
        float* sxl = A.sxl + m * NLP;
        int32_t* zq = A.zq + m * NLP;
#if LB_X86
        if (A.isa == A8_VNNI) {
            act_prep_vnni(x + m * K, A.nb, A.S, qs, NCB, sx, qsb, sxl);
            for (int j = 0; j < A.S; j++) memset(qs + j * NCB + A.code_bytes, 0, (size_t)(NCB - A.code_bytes));
            for (int64_t l = A.NL; l < NLP; l++) sxl[l] = 0.0f;
            lane_sums_vnni(qs, NCB, A.S, A.NC, zq, zmul);
        } else
#endif
        {
            quant_blocks(A.isa, x + m * K, A.nb, q, sx);
            for (int64_t b = 0; b < A.nb; b++) {
                int32_t t = 0;
                for (int i = 0; i < QB; i++) t += q[b * QB + i];
                qsb[b] = t;
            }
            if (A.isa != A8_SCALAR) {
                /* streams: stream j byte k = q[k*S + j], zero beyond the row */
                for (int j = 0; j < A.S; j++) {
                    int8_t* o = qs + j * NCB;
                    for (int64_t k = 0; k < A.code_bytes; k++) o[k] = q[k * A.S + j];
                    memset(o + A.code_bytes, 0, (size_t)(NCB - A.code_bytes));
                }
                /* lane tables: lane l covers codes 4S*l .. 4S*l + 4S - 1, in block l / lpb */
                for (int64_t b = 0; b < A.nb; b++)
                    for (int i = 0; i < lpb; i++) sxl[b * lpb + i] = sx[b];
                for (int64_t l = A.NL; l < NLP; l++) sxl[l] = 0.0f;
                for (int64_t l = 0; l < NLP; l++) {
                    int32_t t = 0;
                    if (l < A.NL)
                        for (int i = 0; i < 4 * A.S; i++) t += q[l * 4 * A.S + i];
                    zq[l] = t * zmul;
                }
            }
        }
        float* xs = A.xs + m * A.ngp;
        for (int64_t g = ng; g < A.ngp; g++) xs[g] = 0.0f;
        for (int64_t g = 0, b = 0; g < ng; g++) {
            float t = 0.0f;
            int64_t b1 = (g + 1) * bpg < A.nb ? (g + 1) * bpg : A.nb;
            for (; b < b1; b++) t += sx[b] * (float)qsb[b];
            xs[g] = t;
        }
    }
    if (A.mode) { /* first group of each chunk (and, mode 2, each lane's group relative to it) */
        const int lc = 4 * A.S; /* codes per lane */
        for (int64_t c = 0; c < A.NC; c++) {
            int64_t code = c * cpc, gfirst = code / G, rel = 0, next = (gfirst + 1) * G;
            A.g0[c] = (int32_t)gfirst;
            for (int l = 0; l < A.CL; l++, code += lc) {
                if (code < K)
                    while (code >= next) { rel++; next += G; }
                A.idx[c * A.CL + l] = (int32_t)(code < K ? rel : 0);
            }
        }
    }

    const int64_t wbytes = N * w->row_bytes * (M < 8 ? 1 : M / 8);
    int nt = pick_threads(nthreads, wbytes, N);
    int bad = 0;
    if (A.isa == A8_SCALAR) {
#pragma omp parallel num_threads(nt)
        {
            int64_t r0, r1;
            thread_rows(N, nt, omp_get_thread_num(), 1, &r0, &r1);
            rows_scalar(w, &A, bias, y, r0, r1);
        }
        return 0;
    }
#if LB_X86
    const int bi = bits == 2 ? 0 : (bits == 4 ? 1 : 2);
    rows_fn fn = A.isa == A8_VNNI ? VNNI_FNS[bi][A.mode] : AVX2_FNS[bi][A.mode];
#pragma omp parallel num_threads(nt) reduction(| : bad)
    {
        int64_t r0, r1;
        thread_rows(N, nt, omp_get_thread_num(), 4, &r0, &r1);
        if (r0 < r1) {
            float* scr = (float*)lb_grow((void**)&t_row, &t_row_n, (size_t)(8 * (ng + 24) + 8 * M + 16) * sizeof(float));
            if (scr) fn(w, &A, bias, y, scr, r0, r1);
            else bad = 1;
        }
    }
#endif
    return bad ? 2 : 0;
}
