/* HQQ's zero-point iteration (lowbit.algorithms.hqq), all iterations of one group while the
   group sits in the L1 cache.

   The plain-PyTorch solver makes about twenty passes over the whole weight per iteration (round,
   decode, residual, two powers, shrink, means), each reading and writing a tensor the size of the
   weight: memory bound, ~55 s for one Llama-3.1-8B block on two cores. The groups' iterations
   are independent of each other (only the early stop looks at the whole matrix), so here every
   group runs all `iters` updates at once and records, per iterate t and group j, its zero-point,
   squared error and l_p error; the caller then applies the early stop and the per-group pick to
   those records, exactly as the PyTorch loop decides them iterate by iterate.

   W      [G, g] float32: G groups of g values; group j holds len(j) real values, len(j) = g
          except the last group of each row (j % n == n - 1) when the row is ragged (last_len)
   s, z0  [G] float32: the fixed scale and the starting zero-point of each group
   zh, sqh, phih  [(iters + 1) * G] float32, index t * G + j: the zero-point z_t, Σ(W − s(q − z_t))²
          and Σ|W − s(q − z_t)|^p of iterate t (q the codes of z_t)

   One iterate, for a group with codes q(z) = clamp(round(W/s + z), qmin, qmax):
     residual  R = W − s (q − z)
     shrink    W_e = sign(R) relu(|R| − |R|^(p−1) / β)
     update    z ← mean(q − (W − W_e) / s);   β ← κβ
   The arithmetic is written once on 8-float vectors (GCC vector extensions), compiled for
   AVX-512, AVX2 and plain SSE2; the same operations in the same order on every path, so every
   path gives the same bits (and the thread count does not matter: one group, one thread).
   x^y for x > 0 is 2^(y log2 x) with polynomials (relative error ~1e-7, below float32's rounding
   of the sums); |R| below 1e-30 counts as 0 (its shrink is 0, its l_p term under 1e-20). The
   results agree with the PyTorch loop to float32 rounding, not bit for bit (another power
   function, another summation order).

   Return codes: 0 ok, 1 bad arguments, 2 out of memory. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "lb_common.h"

/* static helpers take and return 32-byte vectors; the ABI note about that does not concern them */
#pragma GCC diagnostic ignored "-Wpsabi"

LB_ISA_EXPORTS(hqq, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2) | LB_PATH(LB_ISA_AVX512))

#define VL 8 /* floats per vector: 32 bytes, native on AVX2, as fast on AVX-512 here */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

#define TINY_RES 1e-30f

/* the helpers are macros so that each path's function compiles them for its own target */
#define SPLAT(x) ((vf){0} + (float)(x))
#define SEL(m, a, b) ((vf)(((vi)(a) & (m)) | ((vi)(b) & ~(m)))) /* m ? a : b, lanewise */

/* round half to even for |x| < 2^22 (default rounding mode): the float addition does it */
#define VRINT(x) (((x) + SPLAT(12582912.0f)) - SPLAT(12582912.0f))

/* log2(x) for normal x > 0: exponent + log2 of the mantissa m in [sqrt(1/2), sqrt(2)), the latter
   from the series of atanh: log(m) = 2 (u + u^3/3 + u^5/5 + ...), u = (m - 1) / (m + 1), |u| < 0.172 */
#define DEF_LOG2(ATTR, NAME)                                                                        \
    ATTR ALWAYS_INLINE vf NAME(vf x) {                                                              \
        vi i = (vi)x;                                                                               \
        vi e = ((i >> 23) & 0xff) - 127;                                                            \
        vf m = (vf)((i & 0x007fffff) | 0x3f800000);                                                 \
        vi big = m > SPLAT(1.41421356f);                                                            \
        m = SEL(big, m * SPLAT(0.5f), m);                                                           \
        e = e - big; /* big is -1 where true */                                                     \
        vf u = (m - SPLAT(1.0f)) / (m + SPLAT(1.0f)), u2 = u * u;                                   \
        vf poly = SPLAT(1.0f) + u2 * (SPLAT(1.0f / 3) + u2 * (SPLAT(1.0f / 5) + u2 * (SPLAT(1.0f / 7) + \
                  u2 * SPLAT(1.0f / 9))));                                                          \
        return __builtin_convertvector(e, vf) + SPLAT(2.8853900817779268f) * u * poly;              \
    }

/* 2^y for y clamped to [-126, 126]: 2^round(y) from the exponent bits, 2^f for |f| <= 1/2 from
   the Taylor series of e^(f ln 2) to degree 7 */
#define DEF_EXP2(ATTR, NAME)                                                                        \
    ATTR ALWAYS_INLINE vf NAME(vf y) {                                                              \
        y = SEL(y < SPLAT(-126.0f), SPLAT(-126.0f), y);                                             \
        y = SEL(y > SPLAT(126.0f), SPLAT(126.0f), y);                                               \
        vf r = VRINT(y), f = (y - r) * SPLAT(0.69314718055994531f);                                 \
        vf p = SPLAT(1.0f) + f * (SPLAT(1.0f) + f * (SPLAT(0.5f) + f * (SPLAT(1.0f / 6) +             \
               f * (SPLAT(1.0f / 24) + f * (SPLAT(1.0f / 120) + f * (SPLAT(1.0f / 720) +              \
               f * SPLAT(1.0f / 5040)))))));                                                        \
        vi bits = (__builtin_convertvector(r, vi) + 127) << 23;                                     \
        return p * (vf)bits;                                                                        \
    }

/* the codes of zero z, clamp(round(W/s + z)): the sum is clamped to [qmin - 1, qmax + 1] first (the
   same codes) so that VRINT's range holds */
#define CODES(ws, Z, QMIN, QMAX)                                                                    \
    ({                                                                                              \
        vf x_ = (ws) + (Z);                                                                         \
        x_ = SEL(x_ < (QMIN) - SPLAT(1.0f), (QMIN) - SPLAT(1.0f), x_);                              \
        x_ = SEL(x_ > (QMAX) + SPLAT(1.0f), (QMAX) + SPLAT(1.0f), x_);                              \
        x_ = VRINT(x_);                                                                             \
        x_ = SEL(x_ < (QMIN), (QMIN), x_);                                                          \
        SEL(x_ > (QMAX), (QMAX), x_);                                                               \
    })

static inline float hsum(vf v) { /* a fixed order, the same on every path */
    float t = 0.0f;
    for (int l = 0; l < VL; l++) t += v[l];
    return t;
}

/* Group j of length len (nv vectors; lanes past len are padding, masked out of every sum by `last`
   on the last vector). buf: 5 nv vectors of scratch. */
#define GROUP_FN(NAME, ATTR, LOG2, EXP2)                                                            \
    DEF_LOG2(ATTR, LOG2)                                                                            \
    DEF_EXP2(ATTR, EXP2)                                                                            \
    ATTR static void NAME(const float* w, int64_t len, float s, float z, float qmin, float qmax,     \
                          float p, float beta, float kappa, int iters, int64_t G, int64_t j,         \
                          float* zh, float* sqh, float* phih, vf* buf) {                             \
        const int64_t nv = (len + VL - 1) / VL;                                                     \
        vf *wb = buf, *ws = buf + nv, *q = buf + 2 * nv, *r = buf + 3 * nv, *pm = buf + 4 * nv;     \
        memset(wb + nv - 1, 0, sizeof(vf));                                                         \
        memcpy(wb, w, sizeof(float) * (size_t)len);                                                 \
        vf last;                                                                                    \
        for (int l = 0; l < VL; l++) last[l] = (nv - 1) * VL + l < len ? 1.0f : 0.0f;               \
        const vf S = SPLAT(s), QMIN = SPLAT(qmin), QMAX = SPLAT(qmax), P1 = SPLAT(p - 1.0f);       \
        const vf ONE = SPLAT(1.0f), ZERO = SPLAT(0.0f), TINY = SPLAT(TINY_RES);                     \
        for (int64_t k = 0; k < nv; k++) ws[k] = wb[k] / S;                                         \
        for (int t = 0; t <= iters; t++) {                                                          \
            if (t > 0) { /* shrink (3) and zero-point update (4) from iterate t - 1 */              \
                const vf B = SPLAT(beta);                                                           \
                vf acc = ZERO;                                                                      \
                for (int64_t k = 0; k < nv; k++) {                                                  \
                    vf res = r[k], a = SEL(res < ZERO, -res, res);                                  \
                    vf sh = a - pm[k] / B;                                                          \
                    sh = SEL((a > TINY) & (sh > ZERO), sh, ZERO);                                   \
                    vf we = SEL(res < ZERO, -sh, sh);                                               \
                    vf term = q[k] - (wb[k] - we) / S;                                              \
                    acc += k == nv - 1 ? term * last : term;                                        \
                }                                                                                   \
                z = hsum(acc) / (float)len;                                                         \
                beta *= kappa;                                                                      \
            }                                                                                       \
            const vf Z = SPLAT(z);                                                                  \
            vf s2 = ZERO, ph = ZERO;                                                                \
            for (int64_t k = 0; k < nv; k++) { /* evaluate iterate t */                             \
                vf c = CODES(ws[k], Z, QMIN, QMAX);                                                 \
                q[k] = c;                                                                           \
                vf res = wb[k] - (c - Z) * S;                                                       \
                if (k == nv - 1) res *= last;                                                       \
                r[k] = res;                                                                         \
                vf a = SEL(res < ZERO, -res, res);                                                  \
                vi live = a > TINY;                                                                 \
                vf pw = EXP2(P1 * LOG2(SEL(live, a, ONE)));                                         \
                pw = SEL(live, pw, ZERO);                                                           \
                pm[k] = pw;                                                                         \
                s2 += res * res;                                                                    \
                ph += a * pw;                                                                       \
            }                                                                                       \
            zh[t * G + j] = z;                                                                      \
            sqh[t * G + j] = hsum(s2);                                                              \
            phih[t * G + j] = hsum(ph);                                                             \
        }                                                                                           \
    }

/* Codes of (s, z) for group j (uint8; the padding of a ragged group is left 0), with its squared
   and l_p errors: one evaluation, for the stored (rounded) scale and zero-point. */
#define EVALUATE_FN(NAME, ATTR, LOG2, EXP2)                                                         \
    ATTR static void NAME(const float* w, int64_t len, float s, float z, float qmin, float qmax,     \
                          float p, uint8_t* codes, float* sq, float* phi, vf* buf) {                 \
        const int64_t nv = (len + VL - 1) / VL;                                                     \
        vf* wb = buf;                                                                               \
        memset(wb + nv - 1, 0, sizeof(vf));                                                         \
        memcpy(wb, w, sizeof(float) * (size_t)len);                                                 \
        vf last;                                                                                    \
        for (int l = 0; l < VL; l++) last[l] = (nv - 1) * VL + l < len ? 1.0f : 0.0f;               \
        const vf S = SPLAT(s), Z = SPLAT(z), QMIN = SPLAT(qmin), QMAX = SPLAT(qmax), P = SPLAT(p); \
        const vf ONE = SPLAT(1.0f), ZERO = SPLAT(0.0f), TINY = SPLAT(TINY_RES);                     \
        vf s2 = ZERO, ph = ZERO;                                                                    \
        for (int64_t k = 0; k < nv; k++) {                                                          \
            vf c = CODES(wb[k] / S, Z, QMIN, QMAX);                                                 \
            int64_t n_here = k == nv - 1 ? len - k * VL : VL;                                       \
            for (int64_t l = 0; l < n_here; l++) codes[k * VL + l] = (uint8_t)c[l];                 \
            vf res = wb[k] - (c - Z) * S;                                                           \
            if (k == nv - 1) res *= last;                                                           \
            vf a = SEL(res < ZERO, -res, res);                                                      \
            vi live = a > TINY;                                                                     \
            vf pa = SEL(live, EXP2(P * LOG2(SEL(live, a, ONE))), ZERO);                             \
            s2 += res * res;                                                                        \
            ph += pa;                                                                               \
        }                                                                                           \
        *sq = hsum(s2);                                                                             \
        *phi = hsum(ph);                                                                            \
    }

GROUP_FN(group_base, , log2_base, exp2_base)
EVALUATE_FN(eval_base, , log2_base, exp2_base)
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma")))
GROUP_FN(group_avx2, AVX2, log2_avx2, exp2_avx2)
EVALUATE_FN(eval_avx2, AVX2, log2_avx2, exp2_avx2)
GROUP_FN(group_avx512, AVX512, log2_avx512, exp2_avx512)
EVALUATE_FN(eval_avx512, AVX512, log2_avx512, exp2_avx512)
#define HAVE_X86 1
#endif

#define BAD_SHAPE(G, g, n, last_len) ((G) < 1 || (g) < 1 || (n) < 1 || (last_len) < 1 || (last_len) > (g) || (G) % (n))

int lb_hqq_iterate(const float* W, int64_t G, int64_t g, int64_t n, int64_t last_len, const float* s,
                   const float* z0, float qmin, float qmax, float p, float beta, float kappa, int iters,
                   float* zh, float* sqh, float* phih, int nthreads) {
    if (!W || !s || !z0 || !zh || !sqh || !phih || BAD_SHAPE(G, g, n, last_len) || iters < 0 ||
        !(p > 0.0f && p <= 1.0f) || !(qmin >= -1e6f && qmax <= 1e6f && qmin < qmax))
        return 1;
    const int isa = lb_hqq_isa();
    const int64_t nv = (g + VL - 1) / VL;
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > G) nthreads = (int)G;
#pragma omp parallel num_threads(nthreads)
    {
        vf* buf = (vf*)aligned_alloc(sizeof(vf), sizeof(vf) * 5 * (size_t)nv);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < G; j++) {
                const int64_t len = (j % n == n - 1) ? last_len : g;
#ifdef HAVE_X86
                if (isa >= LB_ISA_AVX512)
                    group_avx512(W + j * g, len, s[j], z0[j], qmin, qmax, p, beta, kappa, iters, G, j, zh, sqh, phih, buf);
                else if (isa >= LB_ISA_AVX2)
                    group_avx2(W + j * g, len, s[j], z0[j], qmin, qmax, p, beta, kappa, iters, G, j, zh, sqh, phih, buf);
                else
#endif
                    group_base(W + j * g, len, s[j], z0[j], qmin, qmax, p, beta, kappa, iters, G, j, zh, sqh, phih, buf);
            }
        }
        free(buf);
    }
    return failed ? 2 : 0;
}

int lb_hqq_evaluate(const float* W, int64_t G, int64_t g, int64_t n, int64_t last_len, const float* s,
                    const float* z, float qmin, float qmax, float p, uint8_t* codes, float* sq, float* phi,
                    int nthreads) {
    if (!W || !s || !z || !codes || !sq || !phi || BAD_SHAPE(G, g, n, last_len) || qmin < 0.0f ||
        qmax > 255.0f || !(qmin < qmax) || !(p > 0.0f && p <= 1.0f))
        return 1;
    const int isa = lb_hqq_isa();
    const int64_t nv = (g + VL - 1) / VL;
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > G) nthreads = (int)G;
#pragma omp parallel num_threads(nthreads)
    {
        vf* buf = (vf*)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)nv);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < G; j++) {
                const int64_t len = (j % n == n - 1) ? last_len : g;
                if (len < g) memset(codes + j * g + len, 0, (size_t)(g - len));
#ifdef HAVE_X86
                if (isa >= LB_ISA_AVX512)
                    eval_avx512(W + j * g, len, s[j], z[j], qmin, qmax, p, codes + j * g, sq + j, phi + j, buf);
                else if (isa >= LB_ISA_AVX2)
                    eval_avx2(W + j * g, len, s[j], z[j], qmin, qmax, p, codes + j * g, sq + j, phi + j, buf);
                else
#endif
                    eval_base(W + j * g, len, s[j], z[j], qmin, qmax, p, codes + j * g, sq + j, phi + j, buf);
            }
        }
        free(buf);
    }
    return failed ? 2 : 0;
}
