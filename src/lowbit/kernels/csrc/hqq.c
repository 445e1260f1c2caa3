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

/* One call's arguments, read by every group (lb_hqq_iterate fills the first block and zh/sqh/phih,
   lb_hqq_evaluate the first block and codes/sq/phi). */
typedef struct {
    const float *W, *s, *z;          /* W [G, g]; per group: scale, zero-point (start or stored) */
    int64_t G, g, n, last_len;
    float qmin, qmax, p, beta, kappa;
    int iters;
    float *zh, *sqh, *phih;          /* iterate: [(iters + 1) * G] each */
    uint8_t* codes;                  /* evaluate: [G * g] */
    float *sq, *phi;                 /* evaluate: [G] each */
} hqq_job;

/* Group j's values in wb (nv = ceil(len / VL) vectors; the lanes past len are 0) and `last`, the
   mask of the real lanes of the last vector, which every sum multiplies that vector by */
#define LOAD_GROUP(J, j, len, wb, nv, last)                                                         \
    const int64_t nv = ((len) + VL - 1) / VL;                                                       \
    memset((wb) + nv - 1, 0, sizeof(vf));                                                           \
    memcpy((wb), (J)->W + (j) * (J)->g, sizeof(float) * (size_t)(len));                             \
    vf last;                                                                                        \
    for (int l = 0; l < VL; l++) last[l] = (nv - 1) * VL + l < (len) ? 1.0f : 0.0f;

/* vector k's codes c of zero Z (x = W/s) and its residual W - s (c - Z), masked on the last vector */
#define RESIDUAL(x, k, c, res)                                                                      \
    vf c = CODES((x), Z, QMIN, QMAX);                                                               \
    vf res = wb[k] - (c - Z) * S;                                                                   \
    if ((k) == nv - 1) res *= last;

/* a^e where a > TINY_RES, else 0 */
#define POW_LIVE(EXP2, LOG2, a, E) SEL((a) > TINY, EXP2((E) * LOG2(SEL((a) > TINY, (a), ONE))), ZERO)

/* Group j of length len: all iterations. buf: 5 nv vectors of scratch. */
#define GROUP_FN(NAME, ATTR, LOG2, EXP2)                                                            \
    DEF_LOG2(ATTR, LOG2)                                                                            \
    DEF_EXP2(ATTR, EXP2)                                                                            \
    ATTR static void NAME(const hqq_job* J, int64_t j, int64_t len, vf* buf) {                       \
        vf* wb = buf;                                                                               \
        LOAD_GROUP(J, j, len, wb, nv, last)                                                         \
        vf *ws = buf + nv, *q = buf + 2 * nv, *r = buf + 3 * nv, *pm = buf + 4 * nv;                \
        const int64_t G = J->G;                                                                     \
        float z = J->z[j], beta = J->beta;                                                          \
        const vf S = SPLAT(J->s[j]), QMIN = SPLAT(J->qmin), QMAX = SPLAT(J->qmax);                 \
        const vf P1 = SPLAT(J->p - 1.0f), ONE = SPLAT(1.0f), ZERO = SPLAT(0.0f), TINY = SPLAT(TINY_RES); \
        for (int64_t k = 0; k < nv; k++) ws[k] = wb[k] / S;                                         \
        for (int t = 0; t <= J->iters; t++) {                                                       \
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
                beta *= J->kappa;                                                                   \
            }                                                                                       \
            const vf Z = SPLAT(z);                                                                  \
            vf s2 = ZERO, ph = ZERO;                                                                \
            for (int64_t k = 0; k < nv; k++) { /* evaluate iterate t */                             \
                RESIDUAL(ws[k], k, c, res)                                                          \
                q[k] = c;                                                                           \
                r[k] = res;                                                                         \
                vf a = SEL(res < ZERO, -res, res);                                                  \
                vf pw = POW_LIVE(EXP2, LOG2, a, P1); /* |R|^(p-1), kept for the next shrink */      \
                pm[k] = pw;                                                                         \
                s2 += res * res;                                                                    \
                ph += a * pw;                                                                       \
            }                                                                                       \
            J->zh[t * G + j] = z;                                                                   \
            J->sqh[t * G + j] = hsum(s2);                                                           \
            J->phih[t * G + j] = hsum(ph);                                                          \
        }                                                                                           \
    }

/* Codes of (s, z) for group j (uint8; the padding of a ragged group gets 0), with its squared
   and l_p errors: one evaluation, for the stored (rounded) scale and zero-point. buf: nv vectors. */
#define EVALUATE_FN(NAME, ATTR, LOG2, EXP2)                                                         \
    ATTR static void NAME(const hqq_job* J, int64_t j, int64_t len, vf* buf) {                       \
        vf* wb = buf;                                                                               \
        LOAD_GROUP(J, j, len, wb, nv, last)                                                         \
        uint8_t* codes = J->codes + j * J->g;                                                       \
        if (len < J->g) memset(codes + len, 0, (size_t)(J->g - len));                               \
        const vf S = SPLAT(J->s[j]), Z = SPLAT(J->z[j]), QMIN = SPLAT(J->qmin), QMAX = SPLAT(J->qmax); \
        const vf P = SPLAT(J->p), ONE = SPLAT(1.0f), ZERO = SPLAT(0.0f), TINY = SPLAT(TINY_RES);   \
        vf s2 = ZERO, ph = ZERO;                                                                    \
        for (int64_t k = 0; k < nv; k++) {                                                          \
            RESIDUAL(wb[k] / S, k, c, res)                                                          \
            int64_t n_here = k == nv - 1 ? len - k * VL : VL;                                       \
            for (int64_t l = 0; l < n_here; l++) codes[k * VL + l] = (uint8_t)c[l];                 \
            vf a = SEL(res < ZERO, -res, res);                                                      \
            s2 += res * res;                                                                        \
            ph += POW_LIVE(EXP2, LOG2, a, P);                                                       \
        }                                                                                           \
        J->sq[j] = hsum(s2);                                                                        \
        J->phi[j] = hsum(ph);                                                                       \
    }

typedef void (*group_fn)(const hqq_job*, int64_t, int64_t, vf*);

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

/* fns[level]: the function of each instruction-set path (scalar, avx2, avx512); `scratch` vectors of
   scratch per VL values of a group. Every group runs on one thread, all of its work in one call.
   Returns 0, or 2 when a thread's scratch cannot be allocated. */
static int run_groups(const hqq_job* J, const group_fn fns[3], int64_t scratch, int nthreads) {
    const int isa = lb_hqq_isa();
    const group_fn fn = isa >= LB_ISA_AVX512 ? fns[2] : isa >= LB_ISA_AVX2 ? fns[1] : fns[0];
    const int64_t nv = (J->g + VL - 1) / VL;
    int failed = 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > J->G) nthreads = (int)J->G;
#pragma omp parallel num_threads(nthreads)
    {
        vf* buf = (vf*)aligned_alloc(sizeof(vf), sizeof(vf) * (size_t)(scratch * nv));
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t j = 0; j < J->G; j++)
                fn(J, j, (j % J->n == J->n - 1) ? J->last_len : J->g, buf);
        }
        free(buf);
    }
    return failed ? 2 : 0;
}

#ifdef HAVE_X86
#define PATHS(base, avx2, avx512) {base, avx2, avx512}
#else
#define PATHS(base, avx2, avx512) {base, base, base}
#endif

#define BAD_SHAPE(G, g, n, last_len) ((G) < 1 || (g) < 1 || (n) < 1 || (last_len) < 1 || (last_len) > (g) || (G) % (n))

int lb_hqq_iterate(const float* W, int64_t G, int64_t g, int64_t n, int64_t last_len, const float* s,
                   const float* z0, float qmin, float qmax, float p, float beta, float kappa, int iters,
                   float* zh, float* sqh, float* phih, int nthreads) {
    if (!W || !s || !z0 || !zh || !sqh || !phih || BAD_SHAPE(G, g, n, last_len) || iters < 0 ||
        !(p > 0.0f && p <= 1.0f) || !(qmin >= -1e6f && qmax <= 1e6f && qmin < qmax))
        return 1;
    const hqq_job J = {.W = W, .s = s, .z = z0, .G = G, .g = g, .n = n, .last_len = last_len, .qmin = qmin,
                       .qmax = qmax, .p = p, .beta = beta, .kappa = kappa, .iters = iters, .zh = zh, .sqh = sqh,
                       .phih = phih};
    static const group_fn fns[3] = PATHS(group_base, group_avx2, group_avx512);
    return run_groups(&J, fns, 5, nthreads);
}

int lb_hqq_evaluate(const float* W, int64_t G, int64_t g, int64_t n, int64_t last_len, const float* s,
                    const float* z, float qmin, float qmax, float p, uint8_t* codes, float* sq, float* phi,
                    int nthreads) {
    if (!W || !s || !z || !codes || !sq || !phi || BAD_SHAPE(G, g, n, last_len) || qmin < 0.0f ||
        qmax > 255.0f || !(qmin < qmax) || !(p > 0.0f && p <= 1.0f))
        return 1;
    const hqq_job J = {.W = W, .s = s, .z = z, .G = G, .g = g, .n = n, .last_len = last_len, .qmin = qmin,
                       .qmax = qmax, .p = p, .codes = codes, .sq = sq, .phi = phi};
    static const group_fn fns[3] = PATHS(eval_base, eval_avx2, eval_avx512);
    return run_groups(&J, fns, 1, nthreads);
}
