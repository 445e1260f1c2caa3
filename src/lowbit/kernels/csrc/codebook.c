/* Linear layers y = x W^T + b on codebook-quantized weights, fp32 activations.
 *
 * E8P (QuIP#, lowbit.formats.e8p): W = U^T W~ V with W~ = s0 * decode(codes) (+ s1 * residual),
 * U and V randomized Hadamard transforms (or stored orthogonal matrices). Per call:
 *   1. each activation row is transformed once: x~ = V x = H (D_v x) / sqrt(K), H = H_b (x) H_p
 *      applied as a butterfly over the 2^r axis and a dense +-1 b x b product over the other;
 *   2. z = W~ x~ with W~ decoded into registers, never written out: per 8-vector a table load of
 *      its absolute pattern and an XOR with a sign mask from a 256-entry table, then one FMA per
 *      activation row (several rows share one decode);
 *   3. y = U^T z = D_u H^T z / sqrt(N), plus the bias.
 * The +-1/4 shift of every coordinate is not added per vector: sum_i (v_i + t) x~_i =
 * v . x~ + t * sum(x~ over the 8-vector), so each row adds 1/4 * sum(x~) and subtracts
 * 1/2 * the sums of the 8-vectors whose code has the shift bit set (a masked sum over the codes,
 * 8 or 16 at a time).
 *
 * Tables (built once by lowbit.kernels.codebook from lowbit.core.e8p, pointed to by the weight
 * struct): `patterns` [256][8] the absolute patterns with the 8th coordinate already negated when
 * the pattern's coordinate sum is odd; `signs` [256][8] sign-bit masks indexed by code >> 8:
 * lanes 0-6 the code's sign bits 8-14, lane 7 the parity of those seven bits (bit 7 of the index,
 * the shift, is ignored). XORed together they give the parity rule: the 8th coordinate is
 * negative exactly when parity(pattern sum) ^ popcount(7 signs) is odd. `pm1` [256][8]: the +-1
 * vector of a 3-bit residual's sign byte (bit i set: coordinate i is -1).
 *
 * Instruction sets are chosen at run time (lb_codebook_isa): AVX-512 (F+BW+VL) codes two at a
 * time in 16 lanes, AVX2+FMA one per 8 lanes, portable C; the avx512vbmi level (VNNI + VBMI) runs
 * the float kernels' AVX-512 code and the int8-table AQLM kernel's byte permutes. Functions return 0 when they computed
 * y, 2 for arguments they cannot read (the caller then runs the reference).
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

LB_ISA_EXPORTS(codebook, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2) | LB_PATH(LB_ISA_AVX512) | LB_PATH(LB_ISA_AVX512VBMI))

/* Calls that read fewer bytes of codes than this run on one thread (lb_common.h). */
void lb_codebook_set_min_parallel_bytes(int64_t n) { g_min_parallel_bytes = n; }

typedef struct {
    const int16_t* codes;     /* [N, K/8] E8P codes (the uint16's bits) */
    const void* residual;     /* [N, K/8]: int16 E8P codes (bits 4), uint8 sign bytes (bits 3), NULL (bits 2) */
    const float* scale;       /* [1] (bits 2) or [2] */
    const float* du;          /* [N] D of U, or NULL (identity) */
    const float* dv;          /* [K] D of V, or NULL */
    const float* hu;          /* [bu, bu] the +-1 base matrix of U's Hadamard, NULL when bu == 1 */
    const float* hv;          /* [bv, bv] */
    const float* u_dense;     /* [N, N] U's matrix M (orthogonal kind), or NULL (Hadamard kind) */
    const float* v_dense;     /* [K, K] */
    const float* patterns;    /* [256, 8] */
    const uint32_t* signs;    /* [256, 8] */
    const float* pm1;         /* [256, 8] */
    int64_t K, N;
    int64_t bu, pu, bv, pv;   /* N = bu * pu, K = bv * pv (Hadamard kind) */
    int32_t bits;
} lb_e8p_weight;

/* ------------------------------------------------------------------------------------------ */
/* transforms (plain C, inlined into each instruction set's wrapper so that they vectorise)   */
#define INL __attribute__((always_inline)) static inline

/* unnormalised Walsh-Hadamard transform of each of the b rows of v [b, p] */
INL void fwht_rows(float* v, int64_t b, int64_t p) {
    for (int64_t r = 0; r < b; r++) {
        float* a = v + r * p;
        for (int64_t h = 1; h < p; h *= 2)
            for (int64_t i = 0; i < p; i += 2 * h)
                for (int64_t k = i; k < i + h; k++) {
                    const float s = a[k], d = a[k + h];
                    a[k] = s + d;
                    a[k + h] = s - d;
                }
    }
}

/* v [b*p] <- (H_b (x) H_p) v / sqrt(b p), with H_b^T when `transpose`; tmp: b*p floats */
#if LB_X86
static int hadamard512(float* v, int64_t b, int64_t p, const float* Hb, int transpose, float* tmp);
#endif
INL void hadamard(float* v, int64_t b, int64_t p, const float* Hb, int transpose, float* tmp, int v512) {
#if LB_X86
    if (v512 && hadamard512(v, b, p, Hb, transpose, tmp)) return;
#else
    (void)v512;
#endif
    const int64_t n = b * p;
    const float s = (float)(1.0 / sqrt((double)n));
    if (p > 1) fwht_rows(v, b, p);
    if (b > 1) {
        for (int64_t i = 0; i < b; i++) {
            float* o = tmp + i * p;
            for (int64_t k = 0; k < p; k++) o[k] = 0.0f;
            for (int64_t j = 0; j < b; j++) {
                const float h = (transpose ? Hb[j * b + i] : Hb[i * b + j]) * s;
                const float* src = v + j * p;
                for (int64_t k = 0; k < p; k++) o[k] += h * src[k];
            }
        }
        memcpy(v, tmp, (size_t)n * sizeof(float));
    } else {
        for (int64_t k = 0; k < n; k++) v[k] *= s;
    }
}

#if LB_X86
/* `hadamard` with AVX-512 where p % 16 == 0 and every entry of H_b is +-1 (the same floats in the
 * same order, so the same bits): the butterfly stages h < 16 inside each 16-lane vector (the
 * partner lane by a permute, s + d kept where bit h of the lane is clear, s - d where set), the
 * larger ones over vectors; the b x b product as o_i = sum_j (+-1 * s) src_j with the +-1 applied
 * by a sign flip of s * src_j, 4 output rows at a time (independent add chains). Returns 0 (not
 * applicable: the caller runs the plain loops) or 1. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), noinline)) static int hadamard512(float* v, int64_t b,
                                                                                                   int64_t p, const float* Hb,
                                                                                                   int transpose, float* tmp) {
    if (p % 16 || b > 64) return 0;
    for (int64_t k = 0; k < b * b && b > 1; k++)
        if (Hb[k] != 1.0f && Hb[k] != -1.0f) return 0;
    const int64_t n = b * p;
    const float s = (float)(1.0 / sqrt((double)n));
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i x1 = _mm512_xor_si512(lane, _mm512_set1_epi32(1)), x2 = _mm512_xor_si512(lane, _mm512_set1_epi32(2));
    const __m512i x4 = _mm512_xor_si512(lane, _mm512_set1_epi32(4)), x8 = _mm512_xor_si512(lane, _mm512_set1_epi32(8));
    if (p > 1) {
        for (int64_t r = 0; r < b; r++) {
            float* a = v + r * p;
            for (int64_t k = 0; k < p; k += 16) {
                __m512 t = _mm512_loadu_ps(a + k), u;
                u = _mm512_permutexvar_ps(x1, t);
                t = _mm512_mask_blend_ps(0xAAAA, _mm512_add_ps(t, u), _mm512_sub_ps(u, t));
                u = _mm512_permutexvar_ps(x2, t);
                t = _mm512_mask_blend_ps(0xCCCC, _mm512_add_ps(t, u), _mm512_sub_ps(u, t));
                u = _mm512_permutexvar_ps(x4, t);
                t = _mm512_mask_blend_ps(0xF0F0, _mm512_add_ps(t, u), _mm512_sub_ps(u, t));
                u = _mm512_permutexvar_ps(x8, t);
                t = _mm512_mask_blend_ps(0xFF00, _mm512_add_ps(t, u), _mm512_sub_ps(u, t));
                _mm512_storeu_ps(a + k, t);
            }
            for (int64_t h = 16; h < p; h *= 2)
                for (int64_t i = 0; i < p; i += 2 * h)
                    for (int64_t k = i; k < i + h; k += 16) {
                        const __m512 x = _mm512_loadu_ps(a + k), y = _mm512_loadu_ps(a + k + h);
                        _mm512_storeu_ps(a + k, _mm512_add_ps(x, y));
                        _mm512_storeu_ps(a + k + h, _mm512_sub_ps(x, y));
                    }
        }
    }
    if (b == 1) {
        const __m512 sv = _mm512_set1_ps(s);
        for (int64_t k = 0; k < n; k += 16) _mm512_storeu_ps(v + k, _mm512_mul_ps(_mm512_loadu_ps(v + k), sv));
        return 1;
    }
    /* the +-1 entries as sign masks: sg[i * b + j] = sign bit of (H_b or H_b^T)[i, j] */
    uint32_t sg[64 * 64];
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < b; j++) sg[i * b + j] = (transpose ? Hb[j * b + i] : Hb[i * b + j]) < 0.0f ? 0x80000000u : 0u;
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t k = 0; k < n; k += 16) _mm512_storeu_ps(tmp + k, _mm512_mul_ps(_mm512_loadu_ps(v + k), sv)); /* s * src */
    for (int64_t k = 0; k < p; k += 16) {
        int64_t i = 0;
        for (; i + 4 <= b; i += 4) {
            __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
            for (int64_t j = 0; j < b; j++) {
                const __m512i x = _mm512_castps_si512(_mm512_loadu_ps(tmp + j * p + k));
                o0 = _mm512_add_ps(o0, _mm512_castsi512_ps(_mm512_xor_si512(x, _mm512_set1_epi32((int)sg[i * b + j]))));
                o1 = _mm512_add_ps(o1, _mm512_castsi512_ps(_mm512_xor_si512(x, _mm512_set1_epi32((int)sg[(i + 1) * b + j]))));
                o2 = _mm512_add_ps(o2, _mm512_castsi512_ps(_mm512_xor_si512(x, _mm512_set1_epi32((int)sg[(i + 2) * b + j]))));
                o3 = _mm512_add_ps(o3, _mm512_castsi512_ps(_mm512_xor_si512(x, _mm512_set1_epi32((int)sg[(i + 3) * b + j]))));
            }
            _mm512_storeu_ps(v + i * p + k, o0);
            _mm512_storeu_ps(v + (i + 1) * p + k, o1);
            _mm512_storeu_ps(v + (i + 2) * p + k, o2);
            _mm512_storeu_ps(v + (i + 3) * p + k, o3);
        }
        for (; i < b; i++) {
            __m512 o0 = _mm512_setzero_ps();
            for (int64_t j = 0; j < b; j++) {
                const __m512i x = _mm512_castps_si512(_mm512_loadu_ps(tmp + j * p + k));
                o0 = _mm512_add_ps(o0, _mm512_castsi512_ps(_mm512_xor_si512(x, _mm512_set1_epi32((int)sg[i * b + j]))));
            }
            _mm512_storeu_ps(v + i * p + k, o0);
        }
    }
    return 1;
}
#endif

/* out [K] = V x: x * D_v, then the Hadamard (or dense M: out = M (D_v x)); tmp: K floats */
INL void e8p_input(const lb_e8p_weight* w, const float* x, float* out, float* tmp, int v512) {
    const int64_t K = w->K;
    const float* d = w->dv;
    if (w->v_dense) {
        for (int64_t k = 0; k < K; k++) tmp[k] = d ? x[k] * d[k] : x[k];
        for (int64_t i = 0; i < K; i++) {
            const float* row = w->v_dense + i * K;
            float t = 0.0f;
            for (int64_t k = 0; k < K; k++) t += row[k] * tmp[k];
            out[i] = t;
        }
        return;
    }
    for (int64_t k = 0; k < K; k++) out[k] = d ? x[k] * d[k] : x[k];
    hadamard(out, w->bv, w->pv, w->hv, 0, tmp, v512);
}

/* z [N] <- U^T z (+ bias): the transposed Hadamard (or z M), then * D_u; tmp: N floats */
INL void e8p_output(const lb_e8p_weight* w, float* z, const float* bias, float* tmp, int v512) {
    const int64_t N = w->N;
    const float* d = w->du;
    if (w->u_dense) {
        for (int64_t k = 0; k < N; k++) tmp[k] = 0.0f;
        for (int64_t i = 0; i < N; i++) {
            const float zi = z[i];
            const float* row = w->u_dense + i * N;
            for (int64_t k = 0; k < N; k++) tmp[k] += zi * row[k];
        }
        memcpy(z, tmp, (size_t)N * sizeof(float));
    } else {
        hadamard(z, w->bu, w->pu, w->hu, 1, tmp, v512);
    }
    if (d)
        for (int64_t k = 0; k < N; k++) z[k] *= d[k];
    if (bias)
        for (int64_t k = 0; k < N; k++) z[k] += bias[k];
}

static void e8p_input_scalar(const lb_e8p_weight* w, const float* x, float* out, float* tmp) { e8p_input(w, x, out, tmp, 0); }
static void e8p_output_scalar(const lb_e8p_weight* w, float* z, const float* b, float* tmp) { e8p_output(w, z, b, tmp, 0); }
#if LB_X86
#define TGT2 __attribute__((target("avx2,fma,f16c")))
#define TGT5 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
TGT2 static void e8p_input_avx2(const lb_e8p_weight* w, const float* x, float* out, float* tmp) { e8p_input(w, x, out, tmp, 0); }
TGT2 static void e8p_output_avx2(const lb_e8p_weight* w, float* z, const float* b, float* tmp) { e8p_output(w, z, b, tmp, 0); }
TGT5 static void e8p_input_avx512(const lb_e8p_weight* w, const float* x, float* out, float* tmp) { e8p_input(w, x, out, tmp, 1); }
TGT5 static void e8p_output_avx512(const lb_e8p_weight* w, float* z, const float* b, float* tmp) { e8p_output(w, z, b, tmp, 1); }
#endif

/* ------------------------------------------------------------------------------------------ */
/* the product z = W~ x~ over output rows [r0, r1)                                             */
typedef struct {
    const lb_e8p_weight* w;
    const float* xt;    /* [M, K] transformed activations */
    const float* xs;    /* [M, KB] sum of each 8-vector of xt */
    const float* xtot;  /* [M] sum of each row of xt */
    int64_t M, KB;
    int res;            /* 0, 3 or 4: the residual kind (bits) */
    float ratio;        /* s1 / s0 */
    float* z;           /* [M, N] */
} e8p_ctx;

/* z[m, o] from the tile's sums: dot = sum v.x~ (both stages, the second times the ratio),
 * n1 / n2 = sums of x~'s 8-vectors whose stage-1 / stage-2 code has the shift bit set */
static inline void e8p_finish(const e8p_ctx* c, int64_t o, int64_t m0, int mt, const float* dot, const float* n1,
                              const float* n2) {
    const float s0 = c->w->scale[0];
    for (int i = 0; i < mt; i++) {
        const float tot = c->xtot[m0 + i];
        float t = dot[i] + 0.25f * tot - 0.5f * n1[i];
        if (c->res == 4) t += c->ratio * (0.25f * tot - 0.5f * n2[i]);
        c->z[(m0 + i) * c->w->N + o] = s0 * t;
    }
}

INL float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the 8 coordinates of an E8P code, without the shift */
INL void e8p_vec(const lb_e8p_weight* w, uint32_t code, float* v) {
    const uint32_t* p = (const uint32_t*)w->patterns + (code & 255u) * 8;
    const uint32_t* s = w->signs + (code >> 8) * 8;
    for (int i = 0; i < 8; i++) v[i] = u2f(p[i] ^ s[i]);
}

static void e8p_rows_scalar(const e8p_ctx* c, int64_t r0, int64_t r1) {
    const lb_e8p_weight* w = c->w;
    const int64_t K = w->K, KB = c->KB;
    float v[8], d[1], n1[1], n2[1];
    for (int64_t o = r0; o < r1; o++) {
        const uint16_t* cr = (const uint16_t*)w->codes + o * KB;
        for (int64_t m = 0; m < c->M; m++) {
            const float* x = c->xt + m * K;
            const float* xs = c->xs + m * KB;
            float dot = 0.0f, dot2 = 0.0f, a1 = 0.0f, a2 = 0.0f;
            for (int64_t j = 0; j < KB; j++) {
                e8p_vec(w, cr[j], v);
                for (int i = 0; i < 8; i++) dot += v[i] * x[j * 8 + i];
                if (cr[j] & 0x8000u) a1 += xs[j];
                if (c->res == 4) {
                    const uint16_t rc = ((const uint16_t*)w->residual)[o * KB + j];
                    e8p_vec(w, rc, v);
                    for (int i = 0; i < 8; i++) dot2 += v[i] * x[j * 8 + i];
                    if (rc & 0x8000u) a2 += xs[j];
                } else if (c->res == 3) {
                    const float* pm = w->pm1 + ((const uint8_t*)w->residual)[o * KB + j] * 8;
                    for (int i = 0; i < 8; i++) dot2 += pm[i] * x[j * 8 + i];
                }
            }
            d[0] = dot + c->ratio * dot2;
            n1[0] = a1;
            n2[0] = a2;
            e8p_finish(c, o, m, 1, d, n1, n2);
        }
    }
}

#if LB_X86
#define T2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
#define T5 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), always_inline)) static inline

T2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T2 __m256 dec8(const float* P, const float* S, uint32_t code) {
    __m256i p = _mm256_loadu_si256((const __m256i*)(P + (code & 255u) * 8));
    __m256i s = _mm256_loadu_si256((const __m256i*)(S + (code >> 8) * 8));
    return _mm256_castsi256_ps(_mm256_xor_si256(p, s));
}

/* sums of xs [MT rows, stride KB] over the 8-vectors whose code has bit 15 set */
T2 void shift_sums_avx2(const uint16_t* cr, int64_t KB, const float* xs, const int MT, float* out) {
    __m256 acc[8];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= KB; j += 8) {
        __m256i c32 = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)(cr + j)));
        __m256 mask = _mm256_castsi256_ps(_mm256_srai_epi32(c32, 31));
        for (int m = 0; m < MT; m++) acc[m] = _mm256_add_ps(acc[m], _mm256_and_ps(mask, _mm256_loadu_ps(xs + m * KB + j)));
    }
    for (int m = 0; m < MT; m++) {
        float t = hsum8(acc[m]);
        for (int64_t jj = j; jj < KB; jj++)
            if (cr[jj] & 0x8000u) t += xs[m * KB + jj];
        out[m] = t;
    }
}

/* one output row o against activation rows m0 .. m0+MT-1 (MT <= 4); RES the residual kind */
T2 void e8p_tile_avx2(const e8p_ctx* c, int64_t o, int64_t m0, const int MT, const int RES) {
    const lb_e8p_weight* w = c->w;
    const int64_t K = w->K, KB = c->KB;
    const float* P = w->patterns;
    const float* S = (const float*)w->signs;
    const uint16_t* cr = (const uint16_t*)w->codes + o * KB;
    const uint16_t* rr = (const uint16_t*)w->residual + o * KB;
    const uint8_t* rb = (const uint8_t*)w->residual + o * KB;
    const __m256 ratio = _mm256_set1_ps(c->ratio);
    const float* x = c->xt + m0 * K;
    __m256 a0[4], a1[4];
    for (int m = 0; m < MT; m++) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    int64_t j = 0;
    for (; j + 2 <= KB; j += 2) {
        __m256 v0 = dec8(P, S, cr[j]), v1 = dec8(P, S, cr[j + 1]);
        if (RES == 4) {
            v0 = _mm256_fmadd_ps(dec8(P, S, rr[j]), ratio, v0);
            v1 = _mm256_fmadd_ps(dec8(P, S, rr[j + 1]), ratio, v1);
        } else if (RES == 3) {
            v0 = _mm256_fmadd_ps(_mm256_loadu_ps(w->pm1 + rb[j] * 8), ratio, v0);
            v1 = _mm256_fmadd_ps(_mm256_loadu_ps(w->pm1 + rb[j + 1] * 8), ratio, v1);
        }
        for (int m = 0; m < MT; m++) {
            a0[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * K + j * 8), a0[m]);
            a1[m] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + m * K + j * 8 + 8), a1[m]);
        }
    }
    if (j < KB) {
        __m256 v0 = dec8(P, S, cr[j]);
        if (RES == 4) v0 = _mm256_fmadd_ps(dec8(P, S, rr[j]), ratio, v0);
        else if (RES == 3) v0 = _mm256_fmadd_ps(_mm256_loadu_ps(w->pm1 + rb[j] * 8), ratio, v0);
        for (int m = 0; m < MT; m++) a0[m] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + m * K + j * 8), a0[m]);
    }
    float d[4], n1[4], n2[4] = {0};
    for (int m = 0; m < MT; m++) d[m] = hsum8(_mm256_add_ps(a0[m], a1[m]));
    shift_sums_avx2(cr, KB, c->xs + m0 * KB, MT, n1);
    if (RES == 4) shift_sums_avx2(rr, KB, c->xs + m0 * KB, MT, n2);
    e8p_finish(c, o, m0, MT, d, n1, n2);
}

T5 __m512 dec16(const float* P, const float* S, uint32_t c0, uint32_t c1) {
    __m512i p = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(P + (c0 & 255u) * 8))),
                                   _mm256_loadu_si256((const __m256i*)(P + (c1 & 255u) * 8)), 1);
    __m512i s = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(S + (c0 >> 8) * 8))),
                                   _mm256_loadu_si256((const __m256i*)(S + (c1 >> 8) * 8)), 1);
    return _mm512_castsi512_ps(_mm512_xor_si512(p, s));
}

T5 __m512 pm16(const float* PM, uint32_t b0, uint32_t b1) {
    return _mm512_castsi512_ps(_mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(PM + b0 * 8))),
        _mm256_loadu_si256((const __m256i*)(PM + b1 * 8)), 1));
}

T5 void shift_sums_avx512(const uint16_t* cr, int64_t KB, const float* xs, const int MT, float* out) {
    __m512 acc[8];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < KB; j += 16) {
        const int64_t left = KB - j;
        const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        __mmask16 neg = _mm256_movepi16_mask(_mm256_maskz_loadu_epi16(live, cr + j));
        for (int m = 0; m < MT; m++) acc[m] = _mm512_mask_add_ps(acc[m], neg, acc[m], _mm512_maskz_loadu_ps(neg, xs + m * KB + j));
    }
    for (int m = 0; m < MT; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

/* one output row against activation rows m0 .. m0+MT-1 (MT <= 8), two codes per 16 lanes */
T5 void e8p_tile_avx512(const e8p_ctx* c, int64_t o, int64_t m0, const int MT, const int RES) {
    const lb_e8p_weight* w = c->w;
    const int64_t K = w->K, KB = c->KB;
    const float* P = w->patterns;
    const float* S = (const float*)w->signs;
    const uint16_t* cr = (const uint16_t*)w->codes + o * KB;
    const uint16_t* rr = (const uint16_t*)w->residual + o * KB;
    const uint8_t* rb = (const uint8_t*)w->residual + o * KB;
    const __m512 ratio = _mm512_set1_ps(c->ratio);
    const float* x = c->xt + m0 * K;
    __m512 a0[8], a1[8];
    for (int m = 0; m < MT; m++) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
    int64_t j = 0;
    for (; j + 4 <= KB; j += 4) {
        __m512 v0 = dec16(P, S, cr[j], cr[j + 1]), v1 = dec16(P, S, cr[j + 2], cr[j + 3]);
        if (RES == 4) {
            v0 = _mm512_fmadd_ps(dec16(P, S, rr[j], rr[j + 1]), ratio, v0);
            v1 = _mm512_fmadd_ps(dec16(P, S, rr[j + 2], rr[j + 3]), ratio, v1);
        } else if (RES == 3) {
            v0 = _mm512_fmadd_ps(pm16(w->pm1, rb[j], rb[j + 1]), ratio, v0);
            v1 = _mm512_fmadd_ps(pm16(w->pm1, rb[j + 2], rb[j + 3]), ratio, v1);
        }
        for (int m = 0; m < MT; m++) {
            a0[m] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + m * K + j * 8), a0[m]);
            a1[m] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + m * K + j * 8 + 16), a1[m]);
        }
    }
    for (; j < KB; j += 2) {  /* the last 1-3 codes: a pair, then maybe a single one (upper half masked off) */
        const int two = j + 2 <= KB;
        const uint32_t c1 = two ? cr[j + 1] : 0;
        __m512 v0 = dec16(P, S, cr[j], c1);
        if (RES == 4) v0 = _mm512_fmadd_ps(dec16(P, S, rr[j], two ? rr[j + 1] : 0), ratio, v0);
        else if (RES == 3) v0 = _mm512_fmadd_ps(pm16(w->pm1, rb[j], two ? rb[j + 1] : 0), ratio, v0);
        const __mmask16 live = two ? (__mmask16)0xffff : (__mmask16)0x00ff;
        for (int m = 0; m < MT; m++) a0[m] = _mm512_fmadd_ps(v0, _mm512_maskz_loadu_ps(live, x + m * K + j * 8), a0[m]);
    }
    float d[8], n1[8], n2[8] = {0};
    for (int m = 0; m < MT; m++) d[m] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
    shift_sums_avx512(cr, KB, c->xs + m0 * KB, MT, n1);
    if (RES == 4) shift_sums_avx512(rr, KB, c->xs + m0 * KB, MT, n2);
    e8p_finish(c, o, m0, MT, d, n1, n2);
}

/* e8p_rows_<isa>_<res>: rows [r0, r1), activation rows in tiles of MB */
#define E8P_ROWS(isa, TGT, RES, MB, TILE)                                                        \
    TGT static void e8p_rows_##isa##_##RES(const e8p_ctx* c, int64_t r0, int64_t r1) {          \
        for (int64_t o = r0; o < r1; o++)                                                       \
            for (int64_t m0 = 0; m0 < c->M; m0 += MB) {                                          \
                const int64_t left = c->M - m0;                                                  \
                switch (left < MB ? (int)left : MB) {                                            \
                    case 1: TILE(c, o, m0, 1, RES); break;                                       \
                    case 2: TILE(c, o, m0, 2, RES); break;                                       \
                    case 3: TILE(c, o, m0, 3, RES); break;                                       \
                    case 4: TILE(c, o, m0, 4, RES); break;                                       \
                    case 5: TILE(c, o, m0, 5 < MB ? 5 : MB, RES); break;                         \
                    case 6: TILE(c, o, m0, 6 < MB ? 6 : MB, RES); break;                         \
                    case 7: TILE(c, o, m0, 7 < MB ? 7 : MB, RES); break;                         \
                    default: TILE(c, o, m0, MB, RES); break;                                     \
                }                                                                                \
            }                                                                                    \
    }
E8P_ROWS(avx2, TGT2, 0, 4, e8p_tile_avx2)
E8P_ROWS(avx2, TGT2, 3, 4, e8p_tile_avx2)
E8P_ROWS(avx2, TGT2, 4, 4, e8p_tile_avx2)
E8P_ROWS(avx512, TGT5, 0, 8, e8p_tile_avx512)
E8P_ROWS(avx512, TGT5, 3, 8, e8p_tile_avx512)
E8P_ROWS(avx512, TGT5, 4, 8, e8p_tile_avx512)
#endif /* LB_X86 */

static int e8p_check(const lb_e8p_weight* w) {
    if (!w || !w->codes || !w->scale || !w->patterns || !w->signs || !w->pm1) return 2;
    if (w->K <= 0 || w->K % 8 || w->N <= 0) return 2;
    if (w->bits != 2 && w->bits != 3 && w->bits != 4) return 2;
    if (w->bits > 2 && !w->residual) return 2;
    if (!w->v_dense && (w->bv < 1 || w->pv < 1 || w->bv * w->pv != w->K || (w->bv > 1 && !w->hv))) return 2;
    if (!w->u_dense && (w->bu < 1 || w->pu < 1 || w->bu * w->pu != w->N || (w->bu > 1 && !w->hu))) return 2;
    return 0;
}

/* y [M, N] = x [M, K] W^T + bias. 0 ok, 2 bad arguments or out of memory. */
int lb_e8p_linear_w(const lb_e8p_weight* w, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
    if (e8p_check(w) || M < 0) return 2;
    if (M == 0) return 0;
    const int64_t K = w->K, N = w->N, KB = K / 8;
    const int64_t tmp_n = K > N ? K : N;
    float* buf = (float*)malloc((size_t)(M * K + M * KB + M + tmp_n) * sizeof(float));
    if (!buf) return 2;
    float *xt = buf, *xs = xt + M * K, *xtot = xs + M * KB, *tmp = xtot + M;
    const int isa = lb_codebook_isa();
    for (int64_t m = 0; m < M; m++) {
#if LB_X86
        if (isa >= LB_ISA_AVX512) e8p_input_avx512(w, x + m * K, xt + m * K, tmp);
        else if (isa == LB_ISA_AVX2) e8p_input_avx2(w, x + m * K, xt + m * K, tmp);
        else
#endif
            e8p_input_scalar(w, x + m * K, xt + m * K, tmp);
        float tot = 0.0f;
        for (int64_t j = 0; j < KB; j++) {
            const float* v = xt + m * K + j * 8;
            const float s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
            xs[m * KB + j] = s;
            tot += s;
        }
        xtot[m] = tot;
    }
    const int res = w->bits == 2 ? 0 : w->bits;
    e8p_ctx c = {w, xt, xs, xtot, M, KB, res, res ? w->scale[1] / w->scale[0] : 0.0f, y};
    const int64_t code_bytes = N * KB * (w->bits == 2 ? 2 : (w->bits == 3 ? 3 : 4));
    const int nt = pick_threads(nthreads, code_bytes * (M < 4 ? 1 : M / 4), N);
#pragma omp parallel num_threads(nt)
    {
        int64_t r0, r1;
        thread_rows(N, nt, omp_get_thread_num(), 1, &r0, &r1);
        if (r0 < r1) {
#if LB_X86
            if (isa >= LB_ISA_AVX512) {
                if (res == 0) e8p_rows_avx512_0(&c, r0, r1);
                else if (res == 3) e8p_rows_avx512_3(&c, r0, r1);
                else e8p_rows_avx512_4(&c, r0, r1);
            } else if (isa == LB_ISA_AVX2) {
                if (res == 0) e8p_rows_avx2_0(&c, r0, r1);
                else if (res == 3) e8p_rows_avx2_3(&c, r0, r1);
                else e8p_rows_avx2_4(&c, r0, r1);
            } else
#endif
                e8p_rows_scalar(&c, r0, r1);
        }
    }
    for (int64_t m = 0; m < M; m++) {
#if LB_X86
        if (isa >= LB_ISA_AVX512) e8p_output_avx512(w, y + m * N, bias, tmp);
        else if (isa == LB_ISA_AVX2) e8p_output_avx2(w, y + m * N, bias, tmp);
        else
#endif
            e8p_output_scalar(w, y + m * N, bias, tmp);
    }
    free(buf);
    return 0;
}

/* W~ [N, K] = s0 * decode(codes) (+ s1 * the residual's decode), exactly as
 * E8PWeight.transformed computes it (each term rounded once, then the sum). */
int lb_e8p_decode_w(const lb_e8p_weight* w, float* Wt, int nthreads) {
    if (e8p_check(w)) return 2;
    const int64_t K = w->K, N = w->N, KB = K / 8;
    const int nt = pick_threads(nthreads, N * K, N);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t o = 0; o < N; o++) {
        float v[8], r[8];
        const float s0 = w->scale[0], s1 = w->bits > 2 ? w->scale[1] : 0.0f;
        for (int64_t j = 0; j < KB; j++) {
            const uint32_t code = ((const uint16_t*)w->codes)[o * KB + j];
            e8p_vec(w, code, v);
            const float sh = code & 0x8000u ? -0.25f : 0.25f;
            float* out = Wt + o * K + j * 8;
            if (w->bits == 2) {
                for (int i = 0; i < 8; i++) out[i] = (v[i] + sh) * s0;
                continue;
            }
            if (w->bits == 4) {
                const uint32_t rc = ((const uint16_t*)w->residual)[o * KB + j];
                e8p_vec(w, rc, r);
                const float rsh = rc & 0x8000u ? -0.25f : 0.25f;
                for (int i = 0; i < 8; i++) r[i] += rsh;
            } else {
                memcpy(r, w->pm1 + ((const uint8_t*)w->residual)[o * KB + j] * 8, sizeof r);
            }
            for (int i = 0; i < 8; i++) {
                const float a = (v[i] + sh) * s0, b = r[i] * s1;
                out[i] = a + b;
            }
        }
    }
    return 0;
}

/* ============================================================================================ */
/* E8P nearest point: the code of the E8P point nearest to each 8-vector y (Euclidean), by
 * lowbit.core.e8p.encode's rule. For each shift h (+1/4, then -1/4) the target is t = y - h, and
 * for each of the 256 absolute patterns a the best signs are those of t; when the parity rule
 * forbids them (sum a + popcount(negative coordinates) odd: see below) the cheapest single flip,
 * which costs 4 min_i |t_i| a_i, is added. Up to the constant |t|^2 the squared distance is
 *     score(a) = |a|^2 - 2 sum_i |t_i| a_i  (+ 4 min_i |t_i| a_i when the parity is wrong),
 * and the products |t_i| a_i serve both sums. The patterns are read transposed (at[i][p] =
 * a_p[i]), so 8 (AVX2) or 16 (AVX-512) patterns are scored per instruction with the running
 * minimum and its pattern kept per lane; ties go to the lower pattern, then to the +1/4 shift.
 * Parity: with b_i = 2 a_i (odd integers), sum s_i a_i = sum a - sum_{neg} b_i, whose parity is
 * (sum a + popcount(neg)) mod 2; the point must have an even coordinate sum. */
typedef struct {
    float at[8][256];      /* at[i][p] = a_p[i] */
    float nrm[256];        /* |a_p|^2 */
    int32_t par[256];      /* -1 where sum a_p is odd, else 0 (a lane mask) */
    uint16_t par16[16];    /* the same, 16 patterns per mask */
    const float* a;        /* [256, 8] the patterns as given */
} e8p_enc_tab;

static void e8p_enc_tables(const float* patterns, e8p_enc_tab* T) {
    memset(T->par16, 0, sizeof T->par16);
    for (int p = 0; p < 256; p++) {
        float n = 0.0f;
        int s = 0;
        for (int i = 0; i < 8; i++) {
            const float v = patterns[p * 8 + i];
            T->at[i][p] = v;
            n += v * v;
            s += (int)lrintf(2.0f * v);
        }
        T->nrm[p] = n;
        T->par[p] = ((s / 2) & 1) ? -1 : 0;
        if (T->par[p]) T->par16[p >> 4] |= (uint16_t)(1u << (p & 15));
    }
    T->a = patterns;
}

/* the code for pattern p (its score won) of target magnitudes mag with negative mask neg */
INL uint32_t e8p_enc_code(const e8p_enc_tab* T, const float* mag, uint32_t neg, uint32_t par_bad, int p, uint32_t shift) {
    if (par_bad) {
        const float* a = T->a + p * 8;
        int at = 0;
        float best = mag[0] * a[0];
        for (int i = 1; i < 8; i++) {
            const float c = mag[i] * a[i];
            if (c < best) { best = c; at = i; }
        }
        neg ^= 1u << at;
    }
    return (uint32_t)p | ((neg & 0x7fu) << 8) | (shift << 15);
}

/* |t|, the sign mask and its parity of t = y - h */
INL void e8p_enc_target(const float* y, float h, float* mag, uint32_t* neg, float* mm) {
    uint32_t n = 0;
    float s = 0.0f;
    for (int i = 0; i < 8; i++) {
        const float t = y[i] - h;
        mag[i] = fabsf(t);
        s += mag[i] * mag[i];
        if (t < 0.0f) n |= 1u << i;
    }
    *neg = n;
    *mm = s;
}

static uint32_t e8p_enc_one_scalar(const e8p_enc_tab* T, const float* y) {
    float bd = INFINITY;
    uint32_t code = 0;
    for (uint32_t sh = 0; sh < 2; sh++) {
        float mag[8], mm;
        uint32_t neg;
        e8p_enc_target(y, sh ? -0.25f : 0.25f, mag, &neg, &mm);
        const int32_t pn = (__builtin_popcount(neg) & 1) ? -1 : 0;
        float best = INFINITY;
        int bp = 0;
        for (int p = 0; p < 256; p++) {
            float g = 0.0f, mn = INFINITY;
            for (int i = 0; i < 8; i++) {
                const float c = mag[i] * T->at[i][p];
                g += c;
                mn = c < mn ? c : mn;
            }
            float s = T->nrm[p] - 2.0f * g;
            if (T->par[p] ^ pn) s += 4.0f * mn;
            if (s < best) { best = s; bp = p; }
        }
        const float d = mm + best;
        if (d < bd) {
            bd = d;
            code = e8p_enc_code(T, mag, neg, (uint32_t)(T->par[bp] ^ pn), bp, sh);
        }
    }
    return code;
}

#if LB_X86
TGT2 static uint32_t e8p_enc_one_avx2(const e8p_enc_tab* T, const float* y) {
    float bd = INFINITY;
    uint32_t code = 0;
    for (uint32_t sh = 0; sh < 2; sh++) {
        float mag[8], mm;
        uint32_t neg;
        e8p_enc_target(y, sh ? -0.25f : 0.25f, mag, &neg, &mm);
        const int32_t pn = (__builtin_popcount(neg) & 1) ? -1 : 0;
        const __m256i pnv = _mm256_set1_epi32(pn);
        __m256 mb[8];
        for (int i = 0; i < 8; i++) mb[i] = _mm256_set1_ps(mag[i]);
        const __m256 two = _mm256_set1_ps(2.0f), four = _mm256_set1_ps(4.0f);
        __m256 best = _mm256_set1_ps(INFINITY);
        __m256i bidx = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i step = _mm256_set1_epi32(8);
        for (int p = 0; p < 256; p += 8) {
            __m256 c = _mm256_mul_ps(mb[0], _mm256_loadu_ps(&T->at[0][p]));
            __m256 g = c, mn = c;
            for (int i = 1; i < 8; i++) {
                c = _mm256_mul_ps(mb[i], _mm256_loadu_ps(&T->at[i][p]));
                g = _mm256_add_ps(g, c);
                mn = _mm256_min_ps(mn, c);
            }
            __m256 s = _mm256_fnmadd_ps(two, g, _mm256_loadu_ps(T->nrm + p));
            const __m256 bad = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(T->par + p)), pnv));
            s = _mm256_add_ps(s, _mm256_and_ps(bad, _mm256_mul_ps(four, mn)));
            const __m256 lt = _mm256_cmp_ps(s, best, _CMP_LT_OQ);
            best = _mm256_blendv_ps(best, s, lt);
            bidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bidx), _mm256_castsi256_ps(idx), lt));
            idx = _mm256_add_epi32(idx, step);
        }
        float bv[8];
        int32_t bi[8];
        _mm256_storeu_ps(bv, best);
        _mm256_storeu_si256((__m256i*)bi, bidx);
        float v = bv[0];
        int bp = bi[0];
        for (int l = 1; l < 8; l++)
            if (bv[l] < v || (bv[l] == v && bi[l] < bp)) { v = bv[l]; bp = bi[l]; }
        const float d = mm + v;
        if (d < bd) {
            bd = d;
            code = e8p_enc_code(T, mag, neg, (uint32_t)(T->par[bp] ^ pn), bp, sh);
        }
    }
    return code;
}

TGT5 static uint32_t e8p_enc_one_avx512(const e8p_enc_tab* T, const float* y) {
    float bd = INFINITY;
    uint32_t code = 0;
    for (uint32_t sh = 0; sh < 2; sh++) {
        float mag[8], mm;
        uint32_t neg;
        e8p_enc_target(y, sh ? -0.25f : 0.25f, mag, &neg, &mm);
        const int pn = __builtin_popcount(neg) & 1;
        const __mmask16 flip = pn ? (__mmask16)0xffff : (__mmask16)0;
        __m512 mb[8];
        for (int i = 0; i < 8; i++) mb[i] = _mm512_set1_ps(mag[i]);
        const __m512 two = _mm512_set1_ps(2.0f), four = _mm512_set1_ps(4.0f);
        __m512 best = _mm512_set1_ps(INFINITY);
        __m512i bidx = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        for (int p = 0; p < 256; p += 16) {
            __m512 c = _mm512_mul_ps(mb[0], _mm512_loadu_ps(&T->at[0][p]));
            __m512 g = c, mn = c;
            for (int i = 1; i < 8; i++) {
                c = _mm512_mul_ps(mb[i], _mm512_loadu_ps(&T->at[i][p]));
                g = _mm512_add_ps(g, c);
                mn = _mm512_min_ps(mn, c);
            }
            __m512 s = _mm512_fnmadd_ps(two, g, _mm512_loadu_ps(T->nrm + p));
            s = _mm512_mask_add_ps(s, (__mmask16)(T->par16[p >> 4] ^ flip), s, _mm512_mul_ps(four, mn));
            const __mmask16 lt = _mm512_cmp_ps_mask(s, best, _CMP_LT_OQ);
            best = _mm512_mask_mov_ps(best, lt, s);
            bidx = _mm512_mask_mov_epi32(bidx, lt, idx);
            idx = _mm512_add_epi32(idx, step);
        }
        const float v = _mm512_reduce_min_ps(best);
        const __mmask16 at = _mm512_cmp_ps_mask(best, _mm512_set1_ps(v), _CMP_EQ_OQ);
        const int bp = _mm512_mask_reduce_min_epi32(at, bidx);
        const float d = mm + v;
        if (d < bd) {
            bd = d;
            code = e8p_enc_code(T, mag, neg, (uint32_t)(T->par[bp] ^ (pn ? -1 : 0)), bp, sh);
        }
    }
    return code;
}
#endif

/* codes [n] (int32, 0..65535) of the E8P points nearest to y [n, 8]; patterns [256, 8]: the
 * absolute patterns (lowbit.core.e8p.abs_patterns). 0 ok, 2 bad arguments. y must be finite. */
int lb_e8p_encode(const float* patterns, const float* y, int64_t n, int32_t* codes, int nthreads) {
    if (!patterns || n < 0 || (n && (!y || !codes))) return 2;
    if (n == 0) return 0;
    e8p_enc_tab* T = (e8p_enc_tab*)malloc(sizeof(e8p_enc_tab));
    if (!T) return 2;
    e8p_enc_tables(patterns, T);
    const int isa = lb_codebook_isa();
    const int nt = n < 1024 ? 1 : (nthreads < 1 ? 1 : nthreads);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t v = 0; v < n; v++) {
        uint32_t c;
#if LB_X86
        if (isa >= LB_ISA_AVX512) c = e8p_enc_one_avx512(T, y + v * 8);
        else if (isa == LB_ISA_AVX2) c = e8p_enc_one_avx2(T, y + v * 8);
        else
#endif
            c = e8p_enc_one_scalar(T, y + v * 8);
        codes[v] = (int32_t)c;
    }
    free(T);
    return 0;
}

/* ============================================================================================ */
/* AQLM (lowbit.formats.aqlm): W[o, group j] = scale[o] * sum_m C_m[code[o, j, m]], groups of g
 * consecutive inputs, M codebooks of 2^B vectors (out_group_size 1).
 *
 * B <= 8 (1x8, 2x8, 3x8, 4x8, ...): a lookup table per activation row, LUT[j][m][k] = x_j . C_m[k]
 * (K * M * 2^B multiply-adds, a small GEMM against the transposed codebooks), then every output
 * is sum_j sum_m LUT[j][m][code] -- one table read and one add per code, no multiply per weight.
 * The table is built by all threads, then each thread sums its output rows, a tile of rows at a
 * time over chunks of groups whose table stays in L1. AVX2 / AVX-512 read the table with gathers
 * (8 / 16 codes at a time), the scalar path eight codes per 64-bit load.
 * B > 8 (1x16): a table per group would cost more than the product, so the codebook vectors are
 * read and multiplied with FMA (their sum over the M codebooks once for up to 4 activation rows).
 */
typedef struct {
    const void* codes;     /* [N, G, M] int8 (B <= 8) or int16 (B <= 16): the B-bit codes' bits */
    const float* cbt;      /* B <= 8: [M, g, 2^B] the codebooks transposed (float32) */
    const float* cb;       /* B > 8: [M, 2^B, g] float32 */
    const float* scales;   /* [N] float32 */
    int64_t K, N, g, M, B;
} lb_aqlm_weight;

/* The product walks tiles of AQLM_TILE_ROWS output rows (their codes stay in L2) and, within a
 * tile, chunks of groups whose table is AQLM_CHUNK_FLOATS floats (32 KiB: it stays in L1 while
 * the tile's rows read it). Measured on SmolLM2 and 1B shapes: 8K / 256 was the best or within
 * noise of the best of (8K..128K) x (64..all rows). */
#define AQLM_CHUNK_FLOATS (8 * 1024)
#define AQLM_TILE_ROWS 256

/* Per-thread scratch of the calling thread for the table (grows, never shrinks: large tables
 * would otherwise be mapped and faulted in on every call). */
static _Thread_local float* t_lut = NULL;
static _Thread_local int64_t t_lut_n = 0;

static float* lut_scratch(int64_t n) {
    if (n > t_lut_n) {
        free(t_lut);
        t_lut = (float*)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
        t_lut_n = t_lut ? n : 0;
    }
    return t_lut;
}

/* LUT rows of groups [j0, j1): lut[(j*M + m) * S + k] = x[j*g .. j*g+g) . C_m[k] */
INL void aqlm_lut(const lb_aqlm_weight* w, const float* x, int64_t j0, int64_t j1, float* lut) {
    const int64_t S = (int64_t)1 << w->B, g = w->g, M = w->M;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t m = 0; m < M; m++) {
            float* out = lut + (j * M + m) * S;
            const float* c = w->cbt + m * g * S;
            const float x0 = x[j * g];
            for (int64_t k = 0; k < S; k++) out[k] = x0 * c[k];
            for (int64_t t = 1; t < g; t++) {
                const float xt = x[j * g + t];
                const float* row = c + t * S;
                for (int64_t k = 0; k < S; k++) out[k] += xt * row[k];
            }
        }
}

static void aqlm_lut_scalar(const lb_aqlm_weight* w, const float* x, int64_t j0, int64_t j1, float* lut) { aqlm_lut(w, x, j0, j1, lut); }

/* sum over n codes (bytes) of lut[i * S + (code_i & mask)]: eight codes per 64-bit load, eight
 * accumulators (the adds' latency, not the loads, would bound one chain) */
INL float aqlm_sum(const uint8_t* cr, int64_t n, const float* lut, int64_t S) {
    const uint64_t mask = (uint64_t)(S - 1);
    float a[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t q;
        memcpy(&q, cr + i, 8);
        const float* l = lut + i * S;
        for (int k = 0; k < 8; k++) a[k] += l[k * S + ((q >> (8 * k)) & mask)];
    }
    for (; i < n; i++) a[0] += lut[i * S + (cr[i] & mask)];
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

static float aqlm_sum_scalar(const uint8_t* cr, int64_t n, const float* lut, int64_t S) { return aqlm_sum(cr, n, lut, S); }

#if LB_X86
TGT2 static void aqlm_lut_avx2(const lb_aqlm_weight* w, const float* x, int64_t j0, int64_t j1, float* lut) { aqlm_lut(w, x, j0, j1, lut); }
TGT5 static void aqlm_lut_avx512(const lb_aqlm_weight* w, const float* x, int64_t j0, int64_t j1, float* lut) { aqlm_lut(w, x, j0, j1, lut); }

TGT2 static float aqlm_sum_avx2(const uint8_t* cr, int64_t n, const float* lut, int64_t S) {
    const __m256i mask = _mm256_set1_epi32((int)(S - 1));
    const __m256i step = _mm256_set1_epi32((int)(8 * S));
    __m256i base = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)S));
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i c0 = _mm256_and_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(cr + i))), mask);
        __m256i c1 = _mm256_and_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(cr + i + 8))), mask);
        a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(lut, _mm256_add_epi32(base, c0), 4));
        base = _mm256_add_epi32(base, step);
        a1 = _mm256_add_ps(a1, _mm256_i32gather_ps(lut, _mm256_add_epi32(base, c1), 4));
        base = _mm256_add_epi32(base, step);
    }
    float t = hsum8(_mm256_add_ps(a0, a1));
    const unsigned m = (unsigned)(S - 1);
    for (; i < n; i++) t += lut[i * S + (cr[i] & m)];
    return t;
}

TGT5 static float aqlm_sum_avx512(const uint8_t* cr, int64_t n, const float* lut, int64_t S) {
    const __m512i mask = _mm512_set1_epi32((int)(S - 1));
    const __m512i step = _mm512_set1_epi32((int)(16 * S));
    __m512i base = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_epi32((int)S));
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i c0 = _mm512_and_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(cr + i))), mask);
        __m512i c1 = _mm512_and_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(cr + i + 16))), mask);
        a0 = _mm512_add_ps(a0, _mm512_i32gather_ps(_mm512_add_epi32(base, c0), lut, 4));
        base = _mm512_add_epi32(base, step);
        a1 = _mm512_add_ps(a1, _mm512_i32gather_ps(_mm512_add_epi32(base, c1), lut, 4));
        base = _mm512_add_epi32(base, step);
    }
    for (; i < n; i += 16) {
        const int64_t left = n - i;
        const __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
        __m512i c0 = _mm512_and_si512(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, cr + i)), mask);
        a0 = _mm512_add_ps(a0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, _mm512_add_epi32(base, c0), lut, 4));
        base = _mm512_add_epi32(base, step);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

/* B > 8: z[m0 + i, o] = sum_j (sum_m C_m[code]) . x_j for MT activation rows */
INL void aqlm_rows_decode(const lb_aqlm_weight* w, const float* x, int64_t Mx, float* y, int64_t r0, int64_t r1) {
    const int64_t K = w->K, N = w->N, g = w->g, M = w->M, G = K / g, S = (int64_t)1 << w->B;
    const uint16_t mask = (uint16_t)(S - 1);
    float v[64];
    for (int64_t o = r0; o < r1; o++) {
        const uint16_t* cr = (const uint16_t*)w->codes + o * G * M;
        for (int64_t m0 = 0; m0 < Mx; m0 += 4) {
            const int mt = Mx - m0 < 4 ? (int)(Mx - m0) : 4;
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t j = 0; j < G; j++) {
                for (int64_t t0 = 0; t0 < g; t0 += 64) {
                    const int64_t tn = g - t0 < 64 ? g - t0 : 64;
                    const float* c0 = w->cb + (int64_t)(cr[j * M] & mask) * g + t0;
                    for (int64_t t = 0; t < tn; t++) v[t] = c0[t];
                    for (int64_t m = 1; m < M; m++) {
                        const float* cm = w->cb + (m * S + (cr[j * M + m] & mask)) * g + t0;
                        for (int64_t t = 0; t < tn; t++) v[t] += cm[t];
                    }
                    for (int i = 0; i < mt; i++) {
                        const float* xr = x + (m0 + i) * K + j * g + t0;
                        float s = 0.0f;
                        for (int64_t t = 0; t < tn; t++) s += v[t] * xr[t];
                        acc[i] += s;
                    }
                }
            }
            for (int i = 0; i < mt; i++) y[(m0 + i) * N + o] = acc[i];
        }
    }
}

static void aqlm_decode_scalar(const lb_aqlm_weight* w, const float* x, int64_t Mx, float* y, int64_t r0, int64_t r1) {
    aqlm_rows_decode(w, x, Mx, y, r0, r1);
}

#if LB_X86
/* B > 8, g a multiple of 8: the codebook vectors summed in registers, FMA into 4 activation rows */
TGT2 static void aqlm_decode_avx2(const lb_aqlm_weight* w, const float* x, int64_t Mx, float* y, int64_t r0, int64_t r1) {
    const int64_t K = w->K, N = w->N, g = w->g, M = w->M, G = K / g, S = (int64_t)1 << w->B;
    if (g % 8) {
        aqlm_rows_decode(w, x, Mx, y, r0, r1);
        return;
    }
    const uint16_t mask = (uint16_t)(S - 1);
    for (int64_t o = r0; o < r1; o++) {
        const uint16_t* cr = (const uint16_t*)w->codes + o * G * M;
        for (int64_t m0 = 0; m0 < Mx; m0 += 4) {
            const int mt = Mx - m0 < 4 ? (int)(Mx - m0) : 4;
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t j = 0; j < G; j++) {
                const float* c0 = w->cb + (int64_t)(cr[j * M] & mask) * g;
                for (int64_t t = 0; t < g; t += 8) {
                    __m256 v = _mm256_loadu_ps(c0 + t);
                    for (int64_t m = 1; m < M; m++)
                        v = _mm256_add_ps(v, _mm256_loadu_ps(w->cb + (m * S + (cr[j * M + m] & mask)) * g + t));
                    for (int i = 0; i < mt; i++)
                        acc[i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + (m0 + i) * K + j * g + t), acc[i]);
                }
            }
            for (int i = 0; i < mt; i++) y[(m0 + i) * N + o] = hsum8(acc[i]);
        }
    }
}
#endif

static int aqlm_check(const lb_aqlm_weight* w) {
    if (!w || !w->codes || !w->scales || w->K <= 0 || w->N <= 0 || w->g <= 0 || w->K % w->g) return 2;
    if (w->M < 1 || w->B < 1 || w->B > 16) return 2;
    if (w->B <= 8 ? !w->cbt : !w->cb) return 2;
    return 0;
}

/* y [Mx, N] = x [Mx, K] W^T + bias. 0 ok, 2 bad arguments or out of memory. */
int lb_aqlm_linear_w(const lb_aqlm_weight* w, const float* x, int64_t Mx, const float* bias, float* y, int nthreads) {
    if (aqlm_check(w) || Mx < 0) return 2;
    if (Mx == 0) return 0;
    const int64_t K = w->K, N = w->N, M = w->M, G = K / w->g, S = (int64_t)1 << w->B;
    const int isa = lb_codebook_isa();
    const int64_t code_bytes = N * G * M * (w->B <= 8 ? 1 : 2);
    if (w->B > 8) {
        const int nt = pick_threads(nthreads, code_bytes * (Mx < 4 ? 1 : Mx / 4), N);
#pragma omp parallel num_threads(nt)
        {
            int64_t r0, r1;
            thread_rows(N, nt, omp_get_thread_num(), 1, &r0, &r1);
            if (r0 < r1) {
#if LB_X86
                if (isa >= LB_ISA_AVX2) aqlm_decode_avx2(w, x, Mx, y, r0, r1);
                else
#endif
                    aqlm_decode_scalar(w, x, Mx, y, r0, r1);
            }
        }
    } else {
        float* lut = lut_scratch(G * M * S);
        if (!lut) return 2;
        int64_t chunk = AQLM_CHUNK_FLOATS / (M * S);  /* groups per chunk */
        if (chunk < 1) chunk = 1;
        if (chunk > G) chunk = G;
        const int nt = pick_threads(nthreads, code_bytes, N);
        for (int64_t mx = 0; mx < Mx; mx++) {
            const float* xr = x + mx * K;
            float* yr = y + mx * N;
#pragma omp parallel num_threads(nt)
            {
                const int tid = omp_get_thread_num();
                int64_t j0, j1, r0, r1;
                thread_rows(G, nt, tid, 1, &j0, &j1);
#if LB_X86
                if (isa >= LB_ISA_AVX512) aqlm_lut_avx512(w, xr, j0, j1, lut);
                else if (isa == LB_ISA_AVX2) aqlm_lut_avx2(w, xr, j0, j1, lut);
                else
#endif
                    aqlm_lut_scalar(w, xr, j0, j1, lut);
#pragma omp barrier
                thread_rows(N, nt, tid, 1, &r0, &r1);
                for (int64_t t0 = r0; t0 < r1; t0 += AQLM_TILE_ROWS) {
                    const int64_t t1 = t0 + AQLM_TILE_ROWS < r1 ? t0 + AQLM_TILE_ROWS : r1;
                    for (int64_t c0 = 0; c0 < G; c0 += chunk) {
                        const int64_t cn = (G - c0 < chunk ? G - c0 : chunk) * M;  /* codes in this chunk */
                        const float* lc = lut + c0 * M * S;
                        for (int64_t o = t0; o < t1; o++) {
                            const uint8_t* cr = (const uint8_t*)w->codes + (o * G + c0) * M;
                            float s;
#if LB_X86
                            if (isa >= LB_ISA_AVX512) s = aqlm_sum_avx512(cr, cn, lc, S);
                            else if (isa == LB_ISA_AVX2) s = aqlm_sum_avx2(cr, cn, lc, S);
                            else
#endif
                                s = aqlm_sum_scalar(cr, cn, lc, S);
                            yr[o] = c0 ? yr[o] + s : s;
                        }
                    }
                }
            }
        }
    }
    for (int64_t mx = 0; mx < Mx; mx++)
        for (int64_t o = 0; o < N; o++) {
            const float v = y[mx * N + o] * w->scales[o];
            y[mx * N + o] = bias ? v + bias[o] : v;
        }
    return 0;
}

/* ============================================================================================ */
/* AQLM with int8 tables (the opt-in "aqlm-lut8" row: 8-bit codes, any M and g): per activation
 * row the float table LUT[j][m][k] = x_j . C_m[k] (exactly as above: x_0 * c_0, then + x_t * c_t,
 * separate products and sums), quantized to int8 per block of AQLM8_BLOCK groups:
 *     amax = max |LUT| over the block's entries;  amax == 0: s_b = 0, q = 0;
 *     else s_b = amax / 127.0f, q = clamp(round_half_even(LUT * (127.0f / amax)), -127, 127);
 * then y[o] = scales[o] * acc + bias[o] with acc = sum over blocks, in order, of
 * s_b * (float)(sum_{j in b, m} q[j][m][code]) (exact integer sums; one product and one sum per
 * block). The codes are read from a repacked copy (the struct builder makes it once: as many
 * bytes as the codes) where one 64-byte line holds one (group, codebook)'s codes of 64
 * consecutive output rows, row r at byte 2r (r < 32) or 2(r - 32) + 1, so that
 * AVX-512 VBMI looks up 64 rows per pair of vpermi2b (two 128-entry halves of the table, chosen
 * by the code's top bit) and splits the bytes into int16 sums of rows 0-31 (even bytes) and
 * 32-63 (odd bytes) without a shuffle. */
#define AQLM8_BLOCK 16

typedef struct {
    const uint8_t* codes64;  /* [ceil(N / 64), G, M, 64] the repacked codes (above) */
    const float* cbt;        /* [M, g, 256] the codebooks transposed (float32) */
    const float* scales;     /* [N] float32 */
    int64_t K, N, g, M;
} lb_aqlm8_weight;

/* int8 tables of the groups of blocks [b0, b1): q [G, M, 256], sb [nblocks]; f: a float scratch of
 * AQLM8_BLOCK * M * 256 */
INL void aqlm8_tables(const lb_aqlm8_weight* w, const float* x, int64_t b0, int64_t b1, int8_t* q, float* sb, float* f) {
    const int64_t G = w->K / w->g, M = w->M;
    lb_aqlm_weight fw = {NULL, w->cbt, NULL, NULL, w->K, w->N, w->g, w->M, 8};
    for (int64_t b = b0; b < b1; b++) {
        const int64_t j0 = b * AQLM8_BLOCK, j1 = j0 + AQLM8_BLOCK < G ? j0 + AQLM8_BLOCK : G;
        const int64_t n = (j1 - j0) * M * 256;
        aqlm_lut(&fw, x + j0 * w->g, 0, j1 - j0, f);
        uint32_t abits = 0;  /* max |f| as the bits of a non-negative float (ordered as integers) */
        for (int64_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, f + i, 4);
            u &= 0x7fffffffu;
            abits = u > abits ? u : abits;
        }
        const float amax = u2f(abits);
        int8_t* out = q + j0 * M * 256;
        if (amax == 0.0f) {
            sb[b] = 0.0f;
            memset(out, 0, (size_t)n);
            continue;
        }
        sb[b] = amax / 127.0f;
        const float inv = 127.0f / amax;
        for (int64_t i = 0; i < n; i++) {
            /* |f * inv| <= 127 (+ rounding): adding and subtracting 1.5 * 2^23 rounds half to even */
            float v = (f[i] * inv + 12582912.0f) - 12582912.0f;
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            out[i] = (int8_t)(int32_t)v;
        }
    }
}

static void aqlm8_tables_scalar(const lb_aqlm8_weight* w, const float* x, int64_t b0, int64_t b1, int8_t* q, float* sb, float* f) {
    aqlm8_tables(w, x, b0, b1, q, sb, f);
}

INL int aqlm8_byte(int r) { return r < 32 ? 2 * r : 2 * (r - 32) + 1; }

/* acc [64] of tile t (rows 64t ..): the per-block scaled integer sums */
static void aqlm8_tile_scalar(const lb_aqlm8_weight* w, const int8_t* q, const float* sb, int64_t t, float* acc) {
    const int64_t G = w->K / w->g, M = w->M, nb = (G + AQLM8_BLOCK - 1) / AQLM8_BLOCK;
    const uint8_t* cp = w->codes64 + t * G * M * 64;
    int32_t is[64];
    for (int r = 0; r < 64; r++) acc[r] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j0 = b * AQLM8_BLOCK, j1 = j0 + AQLM8_BLOCK < G ? j0 + AQLM8_BLOCK : G;
        for (int r = 0; r < 64; r++) is[r] = 0;
        for (int64_t jm = j0 * M; jm < j1 * M; jm++) {
            const int8_t* T = q + jm * 256;
            const uint8_t* c = cp + jm * 64;
            for (int r = 0; r < 64; r++) is[r] += T[c[aqlm8_byte(r)]];
        }
        const float s = sb[b];
        for (int r = 0; r < 64; r++) acc[r] = acc[r] + s * (float)is[r];
    }
}

#if LB_X86
#define TGTV __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c")))
/* the same tables; groups of 8: each entry's products and sums in registers (the same order:
 * x_0 c_0, then + x_t c_t), the block maximum kept while they are stored, vcvtps2dq (round half to
 * even) + vpmovsdb to quantize */
TGTV static void aqlm8_tables_vbmi(const lb_aqlm8_weight* w, const float* x, int64_t b0, int64_t b1, int8_t* q, float* sb, float* f) {
    if (w->g != 8) {
        aqlm8_tables(w, x, b0, b1, q, sb, f);
        return;
    }
    const int64_t G = w->K / 8, M = w->M;
    const __m512i absm = _mm512_set1_epi32(0x7fffffff);
    for (int64_t b = b0; b < b1; b++) {
        const int64_t j0 = b * AQLM8_BLOCK, j1 = j0 + AQLM8_BLOCK < G ? j0 + AQLM8_BLOCK : G;
        const int64_t n = (j1 - j0) * M * 256;
        __m512i amx = _mm512_setzero_si512();
        for (int64_t j = j0; j < j1; j++) {
            __m512 xb[8];
            for (int t = 0; t < 8; t++) xb[t] = _mm512_set1_ps(x[j * 8 + t]);
            for (int64_t m = 0; m < M; m++) {
                const float* c = w->cbt + m * 8 * 256;
                float* out = f + ((j - j0) * M + m) * 256;
                for (int k = 0; k < 256; k += 16) {
                    __m512 v = _mm512_mul_ps(xb[0], _mm512_loadu_ps(c + k));
                    for (int t = 1; t < 8; t++) v = _mm512_add_ps(v, _mm512_mul_ps(xb[t], _mm512_loadu_ps(c + t * 256 + k)));
                    _mm512_storeu_ps(out + k, v);
                    amx = _mm512_max_epu32(amx, _mm512_and_si512(_mm512_castps_si512(v), absm));
                }
            }
        }
        const float amax = u2f((uint32_t)_mm512_reduce_max_epu32(amx));
        int8_t* out = q + j0 * M * 256;
        if (amax == 0.0f) {
            sb[b] = 0.0f;
            memset(out, 0, (size_t)n);
            continue;
        }
        sb[b] = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(127.0f / amax);
        for (int64_t i = 0; i < n; i += 16)
            _mm_storeu_si128((__m128i*)(out + i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(f + i), inv))));
    }
}

/* TN consecutive tiles from t (their accumulators acc [TN * 64]); each table read once for all */
TGTV static void aqlm8_tiles_vbmi(const lb_aqlm8_weight* w, const int8_t* q, const float* sb, int64_t t, const int TN,
                                   float* acc) {
    const int64_t G = w->K / w->g, M = w->M, GM = G * M, nb = (G + AQLM8_BLOCK - 1) / AQLM8_BLOCK;
    const uint8_t* cp = w->codes64 + t * GM * 64;
    const __m512i even = _mm512_set1_epi16(1);  /* u8 1 at even bytes, 0 at odd */
    __m512 f[4][4];
    for (int u = 0; u < TN; u++)
        for (int i = 0; i < 4; i++) f[u][i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t j0 = b * AQLM8_BLOCK, j1 = j0 + AQLM8_BLOCK < G ? j0 + AQLM8_BLOCK : G;
        __m512i ae[4], ao[4];
        for (int u = 0; u < TN; u++) { ae[u] = _mm512_setzero_si512(); ao[u] = _mm512_setzero_si512(); }
        for (int64_t jm = j0 * M; jm < j1 * M; jm++) {
            const int8_t* T = q + jm * 256;
            const __m512i t0 = _mm512_loadu_si512(T), t1 = _mm512_loadu_si512(T + 64);
            const __m512i t2 = _mm512_loadu_si512(T + 128), t3 = _mm512_loadu_si512(T + 192);
            for (int u = 0; u < TN; u++) {
                const __m512i c = _mm512_loadu_si512(cp + (u * GM + jm) * 64);
                const __mmask64 hi = _mm512_movepi8_mask(c);
                const __m512i lo = _mm512_permutex2var_epi8(t0, c, t1);
                const __m512i hv = _mm512_permutex2var_epi8(t2, c, t3);
                const __m512i r = _mm512_mask_mov_epi8(lo, hi, hv);
                ae[u] = _mm512_add_epi16(ae[u], _mm512_maddubs_epi16(even, r));
                ao[u] = _mm512_add_epi16(ao[u], _mm512_srai_epi16(r, 8));
            }
        }
        const __m512 s = _mm512_set1_ps(sb[b]);
        for (int u = 0; u < TN; u++) {
            const __m512i v[4] = {_mm512_cvtepi16_epi32(_mm512_castsi512_si256(ae[u])),
                                  _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(ae[u], 1)),
                                  _mm512_cvtepi16_epi32(_mm512_castsi512_si256(ao[u])),
                                  _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(ao[u], 1))};
            for (int i = 0; i < 4; i++) f[u][i] = _mm512_add_ps(f[u][i], _mm512_mul_ps(s, _mm512_cvtepi32_ps(v[i])));
        }
    }
    for (int u = 0; u < TN; u++)
        for (int i = 0; i < 4; i++) _mm512_storeu_ps(acc + u * 64 + i * 16, f[u][i]);
}
#endif

/* per-thread scratch for the int8 path: the float block table */
static _Thread_local float* t_f8 = NULL;
static _Thread_local int64_t t_f8_n = 0;

static float* f8_scratch(int64_t n) {
    if (n > t_f8_n) {
        free(t_f8);
        t_f8 = (float*)aligned_alloc(64, (size_t)((n * 4 + 63) / 64 * 64));
        t_f8_n = t_f8 ? n : 0;
    }
    return t_f8;
}

static _Thread_local int8_t* t_q8 = NULL;
static _Thread_local int64_t t_q8_n = 0;

static int aqlm8_check(const lb_aqlm8_weight* w) {
    if (!w || !w->codes64 || !w->cbt || !w->scales || w->K <= 0 || w->N <= 0 || w->g <= 0 || w->K % w->g) return 2;
    if (w->M < 1 || w->M > 8) return 2;
    return 0;
}

/* y [Mx, N] = x [Mx, K] W^T + bias with int8 tables (above). 0 ok, 2 bad arguments or out of memory. */
int lb_aqlm_lut8_linear_w(const lb_aqlm8_weight* w, const float* x, int64_t Mx, const float* bias, float* y, int nthreads) {
    if (aqlm8_check(w) || Mx < 0) return 2;
    if (Mx == 0) return 0;
    const int64_t K = w->K, N = w->N, M = w->M, G = K / w->g;
    const int64_t nb = (G + AQLM8_BLOCK - 1) / AQLM8_BLOCK, NT = (N + 63) / 64;
    const int isa = lb_codebook_isa();
    if (G * M * 256 + 4 * nb > t_q8_n) {
        free(t_q8);
        t_q8 = (int8_t*)aligned_alloc(64, (size_t)((G * M * 256 + 4 * nb + 63) / 64 * 64 + 64));
        t_q8_n = t_q8 ? G * M * 256 + 4 * nb : 0;
        if (!t_q8) return 2;
    }
    int8_t* q = t_q8;
    float* sb = (float*)(q + (G * M * 256 + 63) / 64 * 64);
    const int nt = pick_threads(nthreads, NT * 64 * G * M, NT);
    int fail = 0;
    for (int64_t mx = 0; mx < Mx; mx++) {
        const float* xr = x + mx * K;
        float* yr = y + mx * N;
#pragma omp parallel num_threads(nt)
        {
            const int tid = omp_get_thread_num();
            int64_t b0, b1, r0, r1;
            thread_rows(nb, nt, tid, 1, &b0, &b1);
            float* f = f8_scratch(AQLM8_BLOCK * M * 256);
            if (!f) {
#pragma omp atomic write
                fail = 1;
            } else if (b0 < b1) {
#if LB_X86
                if (isa >= LB_ISA_AVX512VBMI) aqlm8_tables_vbmi(w, xr, b0, b1, q, sb, f);
                else
#endif
                    aqlm8_tables_scalar(w, xr, b0, b1, q, sb, f);
            }
#pragma omp barrier
            thread_rows(NT, nt, tid, 1, &r0, &r1);
            float acc[4 * 64];
            for (int64_t t = r0; t < r1 && !fail;) {
                int tn = 1;
#if LB_X86
                if (isa >= LB_ISA_AVX512VBMI) {
                    tn = r1 - t >= 4 ? 4 : (int)(r1 - t);
                    switch (tn) {
                        case 4: aqlm8_tiles_vbmi(w, q, sb, t, 4, acc); break;
                        case 3: aqlm8_tiles_vbmi(w, q, sb, t, 3, acc); break;
                        case 2: aqlm8_tiles_vbmi(w, q, sb, t, 2, acc); break;
                        default: aqlm8_tiles_vbmi(w, q, sb, t, 1, acc); break;
                    }
                } else
#endif
                    aqlm8_tile_scalar(w, q, sb, t, acc);
                for (int u = 0; u < tn; u++)
                    for (int r = 0; r < 64; r++) {
                        const int64_t o = (t + u) * 64 + r;
                        if (o < N) {
                            const float v = acc[u * 64 + r] * w->scales[o];
                            yr[o] = bias ? v + bias[o] : v;
                        }
                    }
                t += tn;
            }
        }
        if (fail) return 2;
    }
    return 0;
}

/* the int8 tables of one activation row (for tests): q [G, M, 256], sb [ceil(G / 16)] */
int lb_aqlm_lut8_tables(const lb_aqlm8_weight* w, const float* x, int8_t* q, float* sb) {
    if (aqlm8_check(w)) return 2;
    const int64_t G = w->K / w->g, nb = (G + AQLM8_BLOCK - 1) / AQLM8_BLOCK;
    float* f = f8_scratch(AQLM8_BLOCK * w->M * 256);
    if (!f) return 2;
#if LB_X86
    if (lb_codebook_isa() >= LB_ISA_AVX512VBMI) aqlm8_tables_vbmi(w, x, 0, nb, q, sb, f);
    else
#endif
        aqlm8_tables_scalar(w, x, 0, nb, q, sb, f);
    return 0;
}

/* ============================================================================================ */
/* E8P with int8 activations (the opt-in "e8p-a8" row; 2-bit E8P, any width the format takes).
 *
 * Per activation row: x~ = V x (the float kernel's transform, e8p_input), then x~ quantized to
 * int8 per block of E8A_QB = 32 consecutive values (the last block may be shorter: K % 8 == 0),
 * by affine_a8's rule:
 *     amax = max |x~| over the block;  amax == 0: sx_b = 0, q = 0;
 *     else sx_b = amax / 127.0f, q = clamp(round_half_even(x~ * (127.0f / amax)), -127, 127).
 * The weight: 4 times an E8P point is an 8-vector of odd integers in [-15, 15],
 *     4 v_i = s_i * t8[i][p] + h,    t8[i][p] = 4 * patterns[p][i]  (the float kernel's pattern
 * table: the 8th coordinate already negated when the pattern's sum is odd), s_i = -1 where sign
 * bit i of the code is set (i < 7) or, for i = 7, where the parity of the seven sign bits is odd,
 * h = +1 (shift bit clear) or -1. Per block b (4 codes) the exact integer
 *     D_b = sum_{c in b} (4 w_c) q_c
 * and per output row z_o = (s0 / 4) * sum_b sx_b D_b, summed as below, then y = U^T z + bias
 * (e8p_output). The float sum: sixteen lanes, lane L of chunk ch holding block 16 ch + L
 * (0 past the end), f_L = fma((float)D_b, sx_b, f_L) chunk by chunk, then the tree
 * ((f_L + f_L+8) -> 8, + 4 apart -> 4, + 2 apart -> 2, + 1), times s0 / 4.
 *
 * Fast path (AVX-512 VNNI + VBMI): the codes of a row are read in place, 64 at a time (a chunk
 * of 512 weights, 16 blocks), split by two vpermi2b into the 64 pattern bytes and the 64 sign /
 * shift bytes. Per coordinate i the 64 codes' values come from the 256-entry table t8[i] (two
 * vpermi2b over its halves and a blend on the pattern's top bit), are negated by a byte mask
 * (vptestmb of the sign byte; the parity for i = 7 by two nibble lookups), get 15 + h added
 * (u = 4 w + 15 in [0, 30], unsigned) and meet the activation's byte i of each of the 64 8-vectors
 * in vpdpbusd: one int32 lane sums 4 codes = one block, so after the 8 coordinates lane L holds
 * D_b + 15 Q_b (Q_b = sum of the block's q); the accumulator starts at -15 Q_b. The activation
 * is stored transposed for this once per call: qt[ch][i][k] = q[(64 ch + k) * 8 + i], zero past
 * the end. Two output rows share every table load. No copy of the codes is made (the struct
 * adds only the 2 KB table). The portable C path computes the same integers and floats. */
#define E8A_CH 64 /* codes per chunk */
#define E8A_QB 32 /* activations per block (4 codes: one int32 lane) */

typedef struct {
    lb_e8p_weight e;  /* the float kernel's view: codes, scale, transforms (bits 2) */
    const int8_t* t8; /* [8, 256] 4 * patterns[p][i] */
    const uint8_t* tn; /* [4, 256] the AVX-512 path's nibble tables: t_2j | t_2j+1 << 4 (t = (|t8| - 2) / 4),
                        * tn[3] with bit 6 set where t8[7] < 0 */
} lb_e8p8_weight;

typedef struct {
    const lb_e8p8_weight* w;
    const int8_t* qt;  /* [M, NC, 8, 64] the int8 activations, transposed per chunk */
    const int32_t* nq; /* [M, NC, 16] -15 * Q_b (0 past the end) */
    const float* sl;   /* [M, NC, 16] sx_b (0 past the end) */
    int64_t M, NC, KB;
    float* z;          /* [M, N] */
} e8a_ctx;

/* q [K] int8, sx [ceil(K / 32)] of one transformed row xt [K] (the rule above) */
INL void e8a_quantize(const float* xt, int64_t K, int8_t* q, float* sx) {
    for (int64_t b0 = 0, b = 0; b0 < K; b0 += E8A_QB, b++) {
        const int64_t n = K - b0 < E8A_QB ? K - b0 : E8A_QB;
        float amax = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            const float a = fabsf(xt[b0 + i]);
            amax = a > amax ? a : amax;
        }
        if (amax == 0.0f) {
            sx[b] = 0.0f;
            for (int64_t i = 0; i < n; i++) q[b0 + i] = 0;
            continue;
        }
        sx[b] = amax / 127.0f;
        const float inv = 127.0f / amax;
        for (int64_t i = 0; i < n; i++) {
            float v = (xt[b0 + i] * inv + 12582912.0f) - 12582912.0f; /* round half to even */
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            q[b0 + i] = (int8_t)(int32_t)v;
        }
    }
}

#if LB_X86
/* e8a_quantize with AVX-512: the same max, quotients, rounding sums and clamp per lane */
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"), noinline)) static void e8a_quantize512(const float* xt, int64_t K,
                                                                                                       int8_t* q, float* sx) {
    const __m512 big = _mm512_set1_ps(12582912.0f), hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
    for (int64_t b0 = 0, b = 0; b0 < K; b0 += E8A_QB, b++) {
        const int64_t n = K - b0 < E8A_QB ? K - b0 : E8A_QB;
        const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1u);
        const __mmask16 m1 = n >= 32 ? 0xffff : (n <= 16 ? 0 : (__mmask16)((1u << (n - 16)) - 1u));
        const __m512 a = _mm512_maskz_loadu_ps(m0, xt + b0), c = _mm512_maskz_loadu_ps(m1, xt + b0 + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
        if (amax == 0.0f) {
            sx[b] = 0.0f;
            memset(q + b0, 0, (size_t)n);
            continue;
        }
        sx[b] = amax / 127.0f;
        const __m512 inv = _mm512_set1_ps(127.0f / amax);
        __m512 va = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(a, inv), big), big);
        __m512 vc = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(c, inv), big), big);
        va = _mm512_max_ps(_mm512_min_ps(va, hi), lo);
        vc = _mm512_max_ps(_mm512_min_ps(vc, hi), lo);
        _mm_mask_storeu_epi8(q + b0, m0, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(va)));
        _mm_mask_storeu_epi8(q + b0 + 16, m1, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(vc)));
    }
}
#endif

/* one activation row: x~, its int8 codes q [K] and scales sx, and the kernel's transposed copy
 * (qt [NC, 8, 64], nq, sl [NC, 16]); xt, tmp: K floats */
INL void e8a_prepare(const lb_e8p8_weight* w, const float* x, float* xt, float* tmp, int8_t* q, float* sx, int8_t* qt,
                     int32_t* nq, float* sl, int v512) {
    const int64_t K = w->e.K, KB = K / 8, NC = (KB + E8A_CH - 1) / E8A_CH, nb = (K + E8A_QB - 1) / E8A_QB;
    e8p_input(&w->e, x, xt, tmp, v512);
#if LB_X86
    if (v512) e8a_quantize512(xt, K, q, sx);
    else
#endif
        e8a_quantize(xt, K, q, sx);
    memset(qt, 0, (size_t)(NC * 8 * E8A_CH));
    for (int64_t j = 0; j < KB; j++)
        for (int i = 0; i < 8; i++) qt[(j / E8A_CH) * 8 * E8A_CH + i * E8A_CH + j % E8A_CH] = q[j * 8 + i];
    for (int64_t b = 0; b < NC * 16; b++) {
        int32_t s = 0;
        if (b < nb) {
            const int64_t c1 = (b + 1) * E8A_QB < K ? (b + 1) * E8A_QB : K;
            for (int64_t c = b * E8A_QB; c < c1; c++) s += q[c];
        }
        nq[b] = -15 * s;
        sl[b] = b < nb ? sx[b] : 0.0f;
    }
}

static void e8a_prepare_scalar(const lb_e8p8_weight* w, const float* x, float* xt, float* tmp, int8_t* q, float* sx,
                               int8_t* qt, int32_t* nq, float* sl) {
    e8a_prepare(w, x, xt, tmp, q, sx, qt, nq, sl, 0);
}

/* the fixed summation tree of the 16 lanes */
INL float e8a_reduce16(const float* f) {
    float h8[8], h4[4];
    for (int i = 0; i < 8; i++) h8[i] = f[i] + f[i + 8];
    for (int i = 0; i < 4; i++) h4[i] = h8[i] + h8[i + 4];
    const float a = h4[0] + h4[2], b = h4[1] + h4[3];
    return a + b;
}

static void e8a_rows_scalar(const e8a_ctx* c, int64_t r0, int64_t r1) {
    const lb_e8p8_weight* w = c->w;
    const int64_t N = w->e.N, KB = c->KB, NC = c->NC;
    const int8_t* T = w->t8;
    const float s0q = w->e.scale[0] * 0.25f;
    for (int64_t o = r0; o < r1; o++) {
        const uint16_t* cr = (const uint16_t*)w->e.codes + o * KB;
        for (int64_t m = 0; m < c->M; m++) {
            float f[16] = {0.0f};
            for (int64_t ch = 0; ch < NC; ch++) {
                const int8_t* q = c->qt + (m * NC + ch) * 8 * E8A_CH;
                const int32_t* nq = c->nq + (m * NC + ch) * 16;
                const float* sl = c->sl + (m * NC + ch) * 16;
                const int64_t j0 = ch * E8A_CH, n = KB - j0 < E8A_CH ? KB - j0 : E8A_CH;
                for (int L = 0; L < 16; L++) {
                    int32_t acc = nq[L];
                    for (int k = 4 * L; k < 4 * L + 4 && k < n; k++) {
                        const uint32_t code = cr[j0 + k], p = code & 255u, h = code >> 8;
                        const int32_t base = (h & 0x80u) ? 14 : 16;
                        const uint32_t par = (uint32_t)__builtin_popcount(h & 0x7fu) & 1u;
                        for (int i = 0; i < 8; i++) {
                            const uint32_t neg = i < 7 ? (h >> i) & 1u : par;
                            const int32_t a = T[i * 256 + p];
                            acc += (neg ? base - a : base + a) * (int32_t)q[i * E8A_CH + k];
                        }
                    }
                    f[L] = fmaf((float)acc, sl[L], f[L]);
                }
            }
            c->z[m * N + o] = s0q * e8a_reduce16(f);
        }
    }
}

#if LB_X86
TGT5 static void e8a_prepare_avx512(const lb_e8p8_weight* w, const float* x, float* xt, float* tmp, int8_t* q,
                                    float* sx, int8_t* qt, int32_t* nq, float* sl) {
    e8a_prepare(w, x, xt, tmp, q, sx, qt, nq, sl, 1);
}

#define TV5 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma,f16c"), always_inline)) static inline

TV5 float e8a_reduce_vbmi(__m512 f) {
    const __m256 h8 = _mm256_add_ps(_mm512_castps512_ps256(f), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
    const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
    const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4)); /* (h4[0] + h4[2], h4[1] + h4[3]) */
    return _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
}

/* R output rows from o (R <= 2) against activation rows m0 .. m0+MT-1 (MT <= 4). Per chunk and
 * row the 8 coordinates' lookup indices are built as nibbles, two coordinates per byte vector
 * E_j (coordinate 2j in bits 0-3, 2j+1 in bits 4-7): bits 0-1 the magnitude index t (4|v| - h
 * = 4t + 2), bit 2 the sign, bit 3 the shift. The t's come from four 256-entry tables tn[j]
 * (two vpermi2b + a blend each; tn[3] also holds the pattern's parity sign of coordinate 7 in
 * bit 6), the sign and shift bits from 16-entry vpshufb tables of the sign byte's two nibbles.
 * Then per coordinate one vpermb of the 16-entry value table u = 4 v + 15 (the high nibble
 * shifted down first: vpermb reads 6 index bits and the table repeats every 16) and a vpdpbusd. */
/* the byte tables of the tile functions (built once per call of e8a_rows_vbmi) */
typedef struct {
    uint8_t e[64], d[64], v[64], t[6][16], b[64]; /* b: slot k -> k % P (the shared tail chunk) */
    int32_t l[16];                                /* lane L -> L % (P / 4) */
} e8a_consts;

static void e8a_consts_init(e8a_consts* K8, int P) {
    for (int k = 0; k < 64; k++) {
        K8->e[k] = (uint8_t)(2 * k);
        K8->d[k] = (uint8_t)(2 * k + 1);
        const int tt = k & 3, sg = (k >> 2) & 1, sh = (k >> 3) & 1;
        K8->v[k] = (uint8_t)(15 + (sh ? -1 : 1) + (sg ? -1 : 1) * (4 * tt + 2));
        K8->b[k] = (uint8_t)(P ? k % P : k);
    }
    for (int L = 0; L < 16; L++) K8->l[L] = P ? L % (P / 4) : L;
    for (int n = 0; n < 16; n++) {
        const int hb = (n >> 3) & 1;
        K8->t[0][n] = (uint8_t)((n & 1) << 2 | ((n >> 1) & 1) << 6);                         /* lo: s0, s1 */
        K8->t[1][n] = (uint8_t)(((n >> 2) & 1) << 2 | ((n >> 3) & 1) << 6);                  /* lo: s2, s3 */
        K8->t[2][n] = (uint8_t)((__builtin_popcount((unsigned)n) & 1) << 6);                  /* lo: parity */
        K8->t[3][n] = (uint8_t)(hb * 0x88);                                                   /* hi: shift */
        K8->t[4][n] = (uint8_t)((n & 1) << 2 | ((n >> 1) & 1) << 6 | hb * 0x88);              /* hi: s4, s5 */
        K8->t[5][n] = (uint8_t)(((n >> 2) & 1) << 2 | (__builtin_popcount((unsigned)n & 7u) & 1) << 6 | hb * 0x88);
    }
}

TV5 void e8a_tile_vbmi(const e8a_ctx* c, const e8a_consts* K8, int64_t o, const int R, int64_t m0, const int MT, int64_t nch,
                       float* Fo) {
    const lb_e8p8_weight* w = c->w;
    const int64_t N = w->e.N, KB = c->KB, NC = c->NC;
    const uint8_t* TN = w->tn;
    const __m512i ev = _mm512_loadu_si512(K8->e), od = _mm512_loadu_si512(K8->d), vt = _mm512_loadu_si512(K8->v);
    const __m512i f0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[0]));
    const __m512i f1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[1]));
    const __m512i f3l = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[2]));
    const __m512i hh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[3]));
    const __m512i g2 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[4]));
    const __m512i f3h = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[5]));
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    const uint16_t* cr[2] = {(const uint16_t*)w->e.codes + o * KB, (const uint16_t*)w->e.codes + (o + (R > 1)) * KB};
    __m512 f[2][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) f[r][m] = _mm512_setzero_ps();
    for (int64_t ch = 0; ch < nch; ch++) {
        const int64_t j0 = ch * E8A_CH, n = KB - j0 < E8A_CH ? KB - j0 : E8A_CH;
        const __mmask32 l0 = n >= 32 ? 0xffffffffu : (__mmask32)((1u << n) - 1u);
        const __mmask32 l1 = n >= 64 ? 0xffffffffu : (n <= 32 ? 0u : (__mmask32)((1u << (n - 32)) - 1u));
        __m512i E[2][4], acc[2][4], acc2[2][4]; /* two chains per row (even, odd coordinates): half the latency */
        for (int r = 0; r < R; r++) {
            const __m512i c0 = _mm512_maskz_loadu_epi16(l0, cr[r] + j0), c1 = _mm512_maskz_loadu_epi16(l1, cr[r] + j0 + 32);
            const __m512i pat = _mm512_permutex2var_epi8(c0, ev, c1);
            const __m512i hib = _mm512_permutex2var_epi8(c0, od, c1);
            const __mmask64 hm = _mm512_movepi8_mask(pat);
            __m512i L[4];
            for (int j = 0; j < 4; j++) {
                const uint8_t* t = TN + j * 256;
                L[j] = _mm512_mask_blend_epi8(hm, _mm512_permutex2var_epi8(_mm512_loadu_si512(t), pat, _mm512_loadu_si512(t + 64)),
                                              _mm512_permutex2var_epi8(_mm512_loadu_si512(t + 128), pat, _mm512_loadu_si512(t + 192)));
            }
            const __m512i lo = _mm512_and_si512(hib, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(hib, 4), lo4);
            const __m512i H = _mm512_shuffle_epi8(hh, hi);
            E[r][0] = _mm512_ternarylogic_epi32(L[0], _mm512_shuffle_epi8(f0, lo), H, 0xfe);  /* a | b | c */
            E[r][1] = _mm512_ternarylogic_epi32(L[1], _mm512_shuffle_epi8(f1, lo), H, 0xfe);
            E[r][2] = _mm512_or_si512(L[2], _mm512_shuffle_epi8(g2, hi));
            E[r][3] = _mm512_ternarylogic_epi32(L[3], _mm512_shuffle_epi8(f3h, hi), _mm512_shuffle_epi8(f3l, lo), 0x96); /* a ^ b ^ c */
            for (int m = 0; m < MT; m++) {
                acc[r][m] = _mm512_loadu_si512(c->nq + ((m0 + m) * NC + ch) * 16);
                acc2[r][m] = _mm512_setzero_si512();
            }
        }
        for (int i = 0; i < 8; i++) {
            __m512i qv[4];
            for (int m = 0; m < MT; m++) qv[m] = _mm512_loadu_si512(c->qt + (((m0 + m) * NC + ch) * 8 + i) * E8A_CH);
            for (int r = 0; r < R; r++) {
                const __m512i idx = (i & 1) ? _mm512_srli_epi16(E[r][i >> 1], 4) : E[r][i >> 1];
                const __m512i u = _mm512_permutexvar_epi8(idx, vt);
                for (int m = 0; m < MT; m++) {
                    if (i & 1) acc2[r][m] = _mm512_dpbusd_epi32(acc2[r][m], u, qv[m]);
                    else acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], u, qv[m]);
                }
            }
        }
        for (int m = 0; m < MT; m++) {
            const __m512 s = _mm512_loadu_ps(c->sl + ((m0 + m) * NC + ch) * 16);
            for (int r = 0; r < R; r++)
                f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[r][m], acc2[r][m])), s, f[r][m]);
        }
    }
    if (Fo) { /* the lane sums so far, finished by e8a_tail_vbmi */
        for (int r = 0; r < R; r++)
            for (int m = 0; m < MT; m++) _mm512_storeu_ps(Fo + (r * 4 + m) * 16, f[r][m]);
        return;
    }
    const float s0q = w->e.scale[0] * 0.25f;
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MT; m++) c->z[(m0 + m) * N + o + r] = s0q * e8a_reduce_vbmi(f[r][m]);
}

/* The last chunk of g <= 64 / P output rows from o whose codes end in a short tail of n <= P codes
 * (P = 4, 8, 16 or 32; n = KB - 64 (NC - 1)): the rows' tails share one chunk, row r's codes in
 * slots P r .. P r + n - 1 (zero codes after, against zero activations), so row r's blocks are the
 * int32 lanes r P/4 .. r P/4 + P/4 - 1; the activation bytes and -15 Q_b are repeated every P
 * slots. Each row's lanes are then moved to lanes 0 .. P/4 - 1 and fused into that row's sums
 * F [r][m][16] (from e8a_tile_vbmi over the other chunks) under a mask: the same fma per lane as
 * the unpacked chunk (its other lanes add 0 * 0), so the same bits. */
TV5 void e8a_tail_vbmi(const e8a_ctx* c, const e8a_consts* K8, int64_t o, const int g, int64_t m0, const int MT, const int P,
                       float* F) {
    const lb_e8p8_weight* w = c->w;
    const int64_t N = w->e.N, KB = c->KB, NC = c->NC, j0 = (NC - 1) * E8A_CH;
    const int n = (int)(KB - j0), lr = P / 4;
    const uint8_t* TN = w->tn;
    const uint16_t* cr = (const uint16_t*)w->e.codes + o * KB + j0;
    const __m512i ev = _mm512_loadu_si512(K8->e), od = _mm512_loadu_si512(K8->d), vt = _mm512_loadu_si512(K8->v);
    const __m512i f0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[0]));
    const __m512i f1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[1]));
    const __m512i f3l = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[2]));
    const __m512i hh = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[3]));
    const __m512i g2 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[4]));
    const __m512i f3h = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)K8->t[5]));
    const __m512i pq = _mm512_loadu_si512(K8->b), pn = _mm512_loadu_si512(K8->l);
    /* the 64 slots as 8 x 8 codes: masked loads (nothing read past a row's tail) */
    __m128i x8[8];
    for (int v = 0; v < 8; v++) {
        if (P >= 8) {
            const int r = (8 * v) / P, t0 = (8 * v) % P, k = n - t0 < 0 ? 0 : (n - t0 > 8 ? 8 : n - t0);
            x8[v] = r < g ? _mm_maskz_loadu_epi16((__mmask8)((1u << k) - 1u), cr + r * KB + t0) : _mm_setzero_si128();
        } else {
            const __mmask8 k = (__mmask8)((1u << n) - 1u);
            const __m128i a = 2 * v < g ? _mm_maskz_loadu_epi16(k, cr + 2 * v * KB) : _mm_setzero_si128();
            const __m128i b = 2 * v + 1 < g ? _mm_maskz_loadu_epi16(k, cr + (2 * v + 1) * KB) : _mm_setzero_si128();
            x8[v] = _mm_unpacklo_epi64(a, b);
        }
    }
    __m512i c0 = _mm512_castsi128_si512(x8[0]), c1 = _mm512_castsi128_si512(x8[4]);
    c0 = _mm512_inserti32x4(c0, x8[1], 1);
    c0 = _mm512_inserti32x4(c0, x8[2], 2);
    c0 = _mm512_inserti32x4(c0, x8[3], 3);
    c1 = _mm512_inserti32x4(c1, x8[5], 1);
    c1 = _mm512_inserti32x4(c1, x8[6], 2);
    c1 = _mm512_inserti32x4(c1, x8[7], 3);
    const __m512i lo4 = _mm512_set1_epi8(0x0f);
    const __m512i pat = _mm512_permutex2var_epi8(c0, ev, c1);
    const __m512i hib = _mm512_permutex2var_epi8(c0, od, c1);
    const __mmask64 hm = _mm512_movepi8_mask(pat);
    __m512i L[4], E[4], acc[4], acc2[4];
    for (int j = 0; j < 4; j++) {
        const uint8_t* t = TN + j * 256;
        L[j] = _mm512_mask_blend_epi8(hm, _mm512_permutex2var_epi8(_mm512_loadu_si512(t), pat, _mm512_loadu_si512(t + 64)),
                                      _mm512_permutex2var_epi8(_mm512_loadu_si512(t + 128), pat, _mm512_loadu_si512(t + 192)));
    }
    const __m512i lo = _mm512_and_si512(hib, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(hib, 4), lo4);
    const __m512i H = _mm512_shuffle_epi8(hh, hi);
    E[0] = _mm512_ternarylogic_epi32(L[0], _mm512_shuffle_epi8(f0, lo), H, 0xfe);
    E[1] = _mm512_ternarylogic_epi32(L[1], _mm512_shuffle_epi8(f1, lo), H, 0xfe);
    E[2] = _mm512_or_si512(L[2], _mm512_shuffle_epi8(g2, hi));
    E[3] = _mm512_ternarylogic_epi32(L[3], _mm512_shuffle_epi8(f3h, hi), _mm512_shuffle_epi8(f3l, lo), 0x96);
    for (int m = 0; m < MT; m++) {
        acc[m] = _mm512_permutexvar_epi32(pn, _mm512_loadu_si512(c->nq + ((m0 + m) * NC + NC - 1) * 16));
        acc2[m] = _mm512_setzero_si512();
    }
    for (int i = 0; i < 8; i++) {
        const __m512i idx = (i & 1) ? _mm512_srli_epi16(E[i >> 1], 4) : E[i >> 1];
        const __m512i u = _mm512_permutexvar_epi8(idx, vt);
        for (int m = 0; m < MT; m++) {
            const __m512i qv = _mm512_permutexvar_epi8(pq, _mm512_loadu_si512(c->qt + (((m0 + m) * NC + NC - 1) * 8 + i) * E8A_CH));
            if (i & 1) acc2[m] = _mm512_dpbusd_epi32(acc2[m], u, qv);
            else acc[m] = _mm512_dpbusd_epi32(acc[m], u, qv);
        }
    }
    const float s0q = w->e.scale[0] * 0.25f;
    const __mmask16 lm = (__mmask16)((1u << lr) - 1u);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int m = 0; m < MT; m++) {
        const __m512 s = _mm512_loadu_ps(c->sl + ((m0 + m) * NC + NC - 1) * 16);
        const __m512 d = _mm512_cvtepi32_ps(_mm512_add_epi32(acc[m], acc2[m]));
        for (int r = 0; r < g; r++) {
            const __m512 dr = _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(r * lr)), d);
            const __m512 fr = _mm512_mask3_fmadd_ps(dr, s, _mm512_loadu_ps(F + (r * 4 + m) * 16), lm);
            c->z[(m0 + m) * N + o + r] = s0q * e8a_reduce_vbmi(fr);
        }
    }
}

#define E8A_MT(R, o, m0, left, nch, Fo)                                  \
    switch (left) {                                                      \
        case 1: e8a_tile_vbmi(c, &K8, o, R, m0, 1, nch, Fo); break;           \
        case 2: e8a_tile_vbmi(c, &K8, o, R, m0, 2, nch, Fo); break;           \
        case 3: e8a_tile_vbmi(c, &K8, o, R, m0, 3, nch, Fo); break;           \
        default: e8a_tile_vbmi(c, &K8, o, R, m0, 4, nch, Fo); break;          \
    }

#define E8A_TAIL(o, g, m0, left, P, F)                                   \
    switch (left) {                                                      \
        case 1: e8a_tail_vbmi(c, &K8, o, g, m0, 1, P, F); break;              \
        case 2: e8a_tail_vbmi(c, &K8, o, g, m0, 2, P, F); break;              \
        case 3: e8a_tail_vbmi(c, &K8, o, g, m0, 3, P, F); break;              \
        default: e8a_tail_vbmi(c, &K8, o, g, m0, 4, P, F); break;             \
    }

TGTV static void e8a_rows_vbmi(const e8a_ctx* c, int64_t r0, int64_t r1) {
    const int64_t n = c->KB - (c->NC - 1) * E8A_CH; /* codes in the last chunk */
    const int P = n <= 4 ? 4 : n <= 8 ? 8 : n <= 16 ? 16 : n <= 32 ? 32 : 0; /* 0: no shared tail chunk */
    e8a_consts K8;
    e8a_consts_init(&K8, P);
    for (int64_t m0 = 0; m0 < c->M; m0 += 4) {
        const int left = c->M - m0 < 4 ? (int)(c->M - m0) : 4;
        int64_t o = r0;
        if (!P) {
            for (; o + 2 <= r1; o += 2) E8A_MT(2, o, m0, left, c->NC, NULL)
            if (o < r1) E8A_MT(1, o, m0, left, c->NC, NULL)
            continue;
        }
        float F[16 * 4 * 16] __attribute__((aligned(64)));
        for (; o < r1; o += 64 / P) {
            const int g = r1 - o < 64 / P ? (int)(r1 - o) : 64 / P;
            if (c->NC == 1) memset(F, 0, sizeof(F));
            else {
                int r = 0;
                for (; r + 2 <= g; r += 2) E8A_MT(2, o + r, m0, left, c->NC - 1, F + r * 64)
                if (r < g) E8A_MT(1, o + r, m0, left, c->NC - 1, F + r * 64)
            }
            E8A_TAIL(o, g, m0, left, P, F)
        }
    }
}
#endif

static int e8a_check(const lb_e8p8_weight* w) {
    if (!w || !w->t8 || !w->tn || e8p_check(&w->e) || w->e.bits != 2) return 2;
    return 0;
}

/* y [M, N] = x [M, K] W^T + bias with int8 activations (above). 0 ok, 2 bad arguments or out of memory. */
int lb_e8p_a8_linear_w(const lb_e8p8_weight* w, const float* x, int64_t M, const float* bias, float* y, int nthreads) {
    if (e8a_check(w) || M < 0) return 2;
    if (M == 0) return 0;
    const int64_t K = w->e.K, N = w->e.N, KB = K / 8, NC = (KB + E8A_CH - 1) / E8A_CH, nb = (K + E8A_QB - 1) / E8A_QB;
    const int64_t tmp_n = K > N ? K : N;
    /* floats: xt, tmp, sx, sl [M, NC, 16]; int32: nq [M, NC, 16]; bytes: q [K], qt [M, NC, 512] */
    const size_t nf = (size_t)(K + tmp_n + nb + M * NC * 16), ni = (size_t)(M * NC * 16);
    char* buf = (char*)aligned_alloc(64, ((nf + ni) * 4 + (size_t)K + (size_t)(M * NC * 8 * E8A_CH) + 64 + 63) / 64 * 64);
    if (!buf) return 2;
    float *xt = (float*)buf, *tmp = xt + K, *sx = tmp + tmp_n, *sl = sx + nb;
    int32_t* nq = (int32_t*)(sl + M * NC * 16);
    int8_t* q = (int8_t*)(nq + M * NC * 16);
    int8_t* qt = q + K;
    const int isa = lb_codebook_isa();
    for (int64_t m = 0; m < M; m++) {
        const int64_t o16 = m * NC * 16;
#if LB_X86
        if (isa >= LB_ISA_AVX512)
            e8a_prepare_avx512(w, x + m * K, xt, tmp, q, sx, qt + o16 * 32, nq + o16, sl + o16);
        else
#endif
            e8a_prepare_scalar(w, x + m * K, xt, tmp, q, sx, qt + o16 * 32, nq + o16, sl + o16);
    }
    e8a_ctx c = {w, qt, nq, sl, M, NC, KB, y};
    const int nt = pick_threads(nthreads, N * KB * 2 * (M < 4 ? 1 : M / 4), N);
#pragma omp parallel num_threads(nt)
    {
        int64_t r0, r1;
        thread_rows(N, nt, omp_get_thread_num(), 2, &r0, &r1);
        if (r0 < r1) {
#if LB_X86
            if (isa >= LB_ISA_AVX512VBMI) e8a_rows_vbmi(&c, r0, r1);
            else
#endif
                e8a_rows_scalar(&c, r0, r1);
        }
    }
    for (int64_t m = 0; m < M; m++) {
#if LB_X86
        if (isa >= LB_ISA_AVX512) e8p_output_avx512(&w->e, y + m * N, bias, tmp);
        else if (isa == LB_ISA_AVX2) e8p_output_avx2(&w->e, y + m * N, bias, tmp);
        else
#endif
            e8p_output_scalar(&w->e, y + m * N, bias, tmp);
    }
    free(buf);
    return 0;
}

/* one activation row's transformed values xt [K], int8 codes q [K] and block scales sx
 * [ceil(K / 32)] as the kernel makes them (for tests) */
int lb_e8p_a8_activations(const lb_e8p8_weight* w, const float* x, float* xt, int8_t* q, float* sx) {
    if (e8a_check(w)) return 2;
    const int64_t K = w->e.K, KB = K / 8, NC = (KB + E8A_CH - 1) / E8A_CH;
    char* buf = (char*)malloc((size_t)K * 4 + (size_t)(NC * 16 * 8) + (size_t)(NC * 8 * E8A_CH));
    if (!buf) return 2;
    float* tmp = (float*)buf;
    float* sl = tmp + K;
    int32_t* nq = (int32_t*)(sl + NC * 16);
    int8_t* qt = (int8_t*)(nq + NC * 16);
#if LB_X86
    if (lb_codebook_isa() >= LB_ISA_AVX512) e8a_prepare_avx512(w, x, xt, tmp, q, sx, qt, nq, sl);
    else
#endif
        e8a_prepare_scalar(w, x, xt, tmp, q, sx, qt, nq, sl);
    free(buf);
    return 0;
}
