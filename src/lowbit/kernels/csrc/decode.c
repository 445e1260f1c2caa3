/* One batch-1 decode step of a decoder-only transformer in C: the whole token (embedding row,
 * every block, final norm, output head) in one call, so no interpreter runs between the
 * operations of a token.
 *
 * Why: at batch 1 a 135M model's token is ~200 small operations (30 blocks of norms, 7 linear
 * layers, rotary, attention, residual adds). Done as torch ops from Python, each costs a few
 * microseconds of dispatch before any arithmetic: ~3 ms per token on SmolLM2-135M, as much as
 * the int4 matrix products themselves. Here that overhead disappears; the arithmetic is the same
 * as lowbit.runtime.decoder.LeanDecoder's Python path (which stays the reference, and does
 * prefill), so the two agree to float32 rounding.
 *
 * The linear layers are not implemented here: each is a function pointer with the signature of
 * lowbit's native kernels' ``*_linear_w`` entry points (weight struct, x, rows, bias, y,
 * threads), so the step runs whatever kernel lowbit would use for that layer's stored format
 * (affine 2/4/8-bit, ternary, ... from cpu_linear.c; float32 from this file). Each kernel
 * parallelises itself with OpenMP (torch's thread pool: both link the same libgomp). The rest
 * of the step (norms, rotary, attention over the cached prefix, activation) is a few hundred
 * microseconds at most and runs on the calling thread, attention across heads on the pool when
 * the context is long.
 *
 * Families: RMSNorm everywhere (gain already offset, e.g. Gemma's 1 + w), optional Gemma 3
 * sandwich norms and per-head q/k norms, rotary with rotate_half folded into a signed sin table,
 * grouped-query attention, sliding windows (keys with position > pos - window), optional logit
 * soft-capping, SiLU or tanh-GELU gated MLP.
 *
 * Profile: when plan->prof is non-NULL, the step adds the seconds spent in each category to
 * prof[LB_PROF_*] (clock_gettime, ~20 ns a reading).
 */
#define _POSIX_C_SOURCE 199309L
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LB_X86 1
#else
#define LB_X86 0
#endif
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "lb_common.h"

typedef int (*lb_linear_fn)(const void* w, const float* x, int64_t M, const float* bias, float* y, int nthreads);

typedef struct {
    lb_linear_fn fn;
    const void* w;
    const float* bias;
} lb_dec_linear;

typedef struct {
    lb_dec_linear q, k, v, o, gate, up, down;
    const float *attn_norm, *mlp_norm;             /* [d] */
    const float *post_attn_norm, *post_mlp_norm;   /* [d] or NULL */
    const float *q_norm, *k_norm;                  /* [head_dim] or NULL */
    void *k_cache, *v_cache;                       /* [max_len, n_kv, head_dim], float32 or fp16 */
    const float *cos, *sin;                        /* [max_len, head_dim], sin signed */
    int64_t window;                                /* 0: full causal */
} lb_dec_layer;

typedef struct {
    int64_t n_layers, d, n_heads, n_kv, head_dim, ffn, vocab, max_len;
    float eps, scaling, attn_softcap, final_softcap, embed_scale;  /* softcaps: 0 = none */
    int32_t act;                                   /* 0 SiLU, 1 GELU (tanh approximation) */
    int32_t kv_f16;                                /* the caches hold IEEE half, else float32 */
    const float* embed;                            /* [vocab, d] */
    const float* final_norm;                       /* [d] */
    lb_dec_linear head;
    const lb_dec_layer* layers;
    float* work;                                   /* lb_decode_work_floats() floats */
    double* prof;                                  /* NULL, or LB_PROF_N accumulators (seconds) */
} lb_dec_plan;

enum { LB_PROF_QKV, LB_PROF_ATTN, LB_PROF_O, LB_PROF_MLP, LB_PROF_HEAD, LB_PROF_NORM, LB_PROF_OTHER, LB_PROF_N };

typedef struct {
    const float* W;  /* [N, K] row-major (nn.Linear's weight) */
    int64_t K, N;
} lb_f32_weight;

#define LB_MAX_CHUNKS 16  /* attention: at most this many chunks of positions (one per thread) */

int lb_decode_abi(void) { return 2; }  /* bumped when a struct above changes */

int64_t lb_decode_work_floats(const lb_dec_plan* p) {
    int64_t H = p->n_heads, hd = p->head_dim, KV = p->n_kv;
    return 4 * p->d + 2 * H * hd + 2 * KV * hd + 2 * p->ffn + H * p->max_len + LB_MAX_CHUNKS * (H * hd + 2 * H);
}

static inline double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Paths: AVX-512, AVX2+FMA+F16C, portable C (vector helpers and attention); lowered by
 * lb_decode_set_isa (tests run every path). The linear layers follow their own kernels' level. */
LB_ISA_EXPORTS(decode, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2) | LB_PATH(LB_ISA_AVX512))

/* -- small vector helpers: one body, compiled for AVX-512 / AVX2 / baseline, picked by the
 * library's instruction-set level (lb_decode_isa, lb_common.h) ------------------------------- */
#define LB_BODY static inline __attribute__((always_inline))
#if LB_X86
#define LB_VARIANTS(ret, name, params, args)                                                        \
    __attribute__((target("avx512f"))) static ret name##_avx512 params { return name##_body args; } \
    __attribute__((target("avx2"))) static ret name##_avx2 params { return name##_body args; }      \
    static ret name##_c params { return name##_body args; }                                         \
    static ret name params {                                                                        \
        const int isa = lb_decode_isa();                                                            \
        if (isa >= LB_ISA_AVX512) return name##_avx512 args;                                        \
        if (isa >= LB_ISA_AVX2) return name##_avx2 args;                                            \
        return name##_c args;                                                                       \
    }
#else
#define LB_VARIANTS(ret, name, params, args) static ret name params { return name##_body args; }
#endif

LB_BODY float dot_body(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}
LB_VARIANTS(float, dot, (const float* a, const float* b, int64_t n), (a, b, n))

/* exp(x) for x <= 0 (softmax after subtracting the max), written so that loops of it vectorise:
 * x = k ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation < 2e-8
 * relative), 2^k through the exponent bits. Relative error ~2e-7 against expf; 0 below -87. */
static inline float exp_neg(float x) {
    const int under = x < -87.0f;
    x = under ? -87.0f : x;
    const float k = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { int32_t i; float f; } two_k = {.i = ((int32_t)k + 127) << 23};
    return under ? 0.0f : p * two_k.f;
}

/* y = x * rsqrt(mean(x^2) + eps) * gain (float32, as torch's rms_norm) */
LB_BODY void rms_norm_body(float* y, const float* x, const float* gain, int64_t n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * gain[i];
}
LB_VARIANTS(void, rms_norm, (float* y, const float* x, const float* gain, int64_t n, float eps), (y, x, gain, n, eps))

/* -- float32 GEMV / small GEMM for layers kept in float ------------------------------------- */
int lb_dec_f32_linear_w(const lb_f32_weight* w, const float* x, int64_t M, const float* bias, float* y,
                        int nthreads) {
    const int64_t K = w->K, N = w->N;
    if (K <= 0 || N < 0 || M < 0) return 2;
    const int nt = pick_threads(nthreads, N * K * (int64_t)sizeof(float), N);  /* lb_common.h */
    for (int64_t m = 0; m < M; m++) {
        const float* xm = x + m * K;
        float* ym = y + m * N;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t r = 0; r < N; r++) ym[r] = dot(w->W + r * K, xm, K) + (bias ? bias[r] : 0.0f);
    }
    return 0;
}

/* -- one step ---------------------------------------------------------------------------------- */
static inline int lin(const lb_dec_linear* L, const float* x, float* y, int nt) {
    return L->fn(L->w, x, 1, L->bias, y, nt);
}

/* x * cos + x[swap] * sin, times `scale`; swap = the two halves exchanged (rotate_half). */
static void rotary(float* dst, const float* x, const float* cos, const float* sin, int64_t hd, float scale) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < half; i++) dst[i] = (x[i] * cos[i] + x[i + half] * sin[i]) * scale;
    for (int64_t i = half; i < hd; i++) dst[i] = (x[i] * cos[i] + x[i - half] * sin[i]) * scale;
}

/* Softmax numerators in place over n scores (after the optional soft-cap): sc[j] = exp(sc[j] - m)
 * with m the max; stores m and returns the sum (the caller normalises, possibly after merging
 * several chunks of positions). */
static float softmax_num(float* sc, int64_t n, float softcap, float* m) {
    if (softcap > 0.0f)
        for (int64_t j = 0; j < n; j++) sc[j] = tanhf(sc[j] / softcap) * softcap;
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; j++) {
        sc[j] = exp_neg(sc[j] - mx);
        sum += sc[j];
    }
    *m = mx;
    return sum;
}

/* -- attention -------------------------------------------------------------------------------
 * For the g query heads that share one key/value head, over n cached rows (K, V rows `stride`
 * floats apart): scores = q·k (q carries the scaling), optional soft-cap, softmax numerators
 * p = exp(s - m), out = sum p v, not yet divided by l = sum p (m[h], l[h] returned per head).
 * Each key and value row is loaded once for all g heads. Three code paths (portable, AVX2+FMA,
 * AVX-512), each in two phases so that an fp16 cache can be widened tile by tile in between. */
static void scores_c(const float* q, int64_t g, const float* K, int64_t stride, int64_t n, int64_t hd, float* sc,
                     int64_t ld) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < g; h++) sc[h * ld + j] = dot(q + h * hd, K + j * stride, hd);
}

static void pv_c(const float* sc, int64_t ld, int64_t g, const float* V, int64_t stride, int64_t n, int64_t hd,
                 float* out) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t h = 0; h < g; h++) {
            const float pj = sc[h * ld + j];
            const float* vj = V + j * stride;
            float* oh = out + h * hd;
            for (int64_t i = 0; i < hd; i++) oh[i] += pj * vj[i];
        }
}

#if LB_X86
__attribute__((target("avx512f"))) static void scores_avx512(const float* q, int64_t g, const float* K,
                                                            int64_t stride, int64_t n, int64_t hd, float* sc,
                                                            int64_t ld) {
    const int64_t nv = hd / 16;
    for (int64_t j = 0; j < n; j++) {
        const float* kj = K + j * stride;
        for (int64_t h = 0; h < g; h++) {
            const float* qh = q + h * hd;
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_loadu_ps(kj));
            for (int64_t v = 1; v < nv; v++)
                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * v), _mm512_loadu_ps(kj + 16 * v), acc);
            sc[h * ld + j] = _mm512_reduce_add_ps(acc);
        }
    }
}

__attribute__((target("avx512f"))) static void pv_avx512(const float* sc, int64_t ld, int64_t g, const float* V,
                                                        int64_t stride, int64_t n, int64_t hd, float* out) {
    const int64_t nv = hd / 16;
    for (int64_t j = 0; j < n; j++) {
        const float* vj = V + j * stride;
        for (int64_t h = 0; h < g; h++) {
            const __m512 pj = _mm512_set1_ps(sc[h * ld + j]);
            float* oh = out + h * hd;
            for (int64_t v = 0; v < nv; v++)
                _mm512_storeu_ps(oh + 16 * v, _mm512_fmadd_ps(pj, _mm512_loadu_ps(vj + 16 * v), _mm512_loadu_ps(oh + 16 * v)));
        }
    }
}

__attribute__((target("avx512f"))) static void widen_avx512(const uint16_t* src, int64_t stride, int64_t n,
                                                           int64_t hd, float* dst) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < hd; i += 16)
            _mm512_storeu_ps(dst + j * hd + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + j * stride + i))));
}

__attribute__((target("avx2,fma"))) static void scores_avx2(const float* q, int64_t g, const float* K,
                                                           int64_t stride, int64_t n, int64_t hd, float* sc,
                                                           int64_t ld) {
    const int64_t nv = hd / 8;
    for (int64_t j = 0; j < n; j++) {
        const float* kj = K + j * stride;
        for (int64_t h = 0; h < g; h++) {
            const float* qh = q + h * hd;
            __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qh), _mm256_loadu_ps(kj));
            for (int64_t v = 1; v < nv; v++)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * v), _mm256_loadu_ps(kj + 8 * v), acc);
            __m128 r = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            r = _mm_add_ss(r, _mm_movehdup_ps(r));
            sc[h * ld + j] = _mm_cvtss_f32(r);
        }
    }
}

__attribute__((target("avx2,fma"))) static void pv_avx2(const float* sc, int64_t ld, int64_t g, const float* V,
                                                       int64_t stride, int64_t n, int64_t hd, float* out) {
    const int64_t nv = hd / 8;
    for (int64_t j = 0; j < n; j++) {
        const float* vj = V + j * stride;
        for (int64_t h = 0; h < g; h++) {
            const __m256 pj = _mm256_set1_ps(sc[h * ld + j]);
            float* oh = out + h * hd;
            for (int64_t v = 0; v < nv; v++)
                _mm256_storeu_ps(oh + 8 * v, _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * v), _mm256_loadu_ps(oh + 8 * v)));
        }
    }
}

__attribute__((target("avx2,f16c"))) static void widen_f16c(const uint16_t* src, int64_t stride, int64_t n,
                                                           int64_t hd, float* dst) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < hd; i += 8)
            _mm256_storeu_ps(dst + j * hd + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + j * stride + i))));
}
#endif


/* for tests: the cache's conversions over arrays */
void lb_decode_float_to_half(const float* x, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = float_to_half(x[i]);
}
void lb_decode_half_to_float(const uint16_t* x, float* y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] = half_to_float(x[i]);
}

static void widen_c(const uint16_t* src, int64_t stride, int64_t n, int64_t hd, float* dst) {
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < hd; i++) dst[j * hd + i] = half_to_float(src[j * stride + i]);
}

#define LB_TILE 32  /* fp16 cache: rows widened per tile */

static void attend_group(const float* q, int64_t g, const void* K, const void* V, int f16, int64_t stride,
                         int64_t j0, int64_t j1, int64_t hd, float softcap, float* scores, float* out, float* m,
                         float* l) {
    const int isa = lb_decode_isa();
    int path = 0;
#if LB_X86
    if (isa >= LB_ISA_AVX512 && hd % 16 == 0) path = 2;
    else if (isa >= LB_ISA_AVX2 && hd % 8 == 0) path = 1;
#endif
    void (*score)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t) = scores_c;
    void (*pv)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*) = pv_c;
    void (*widen)(const uint16_t*, int64_t, int64_t, int64_t, float*) = widen_c;
#if LB_X86
    if (path == 2) { score = scores_avx512; pv = pv_avx512; widen = widen_avx512; }
    if (path == 1) { score = scores_avx2; pv = pv_avx2; widen = widen_f16c; }
#endif
    const int64_t n = j1 - j0;
    float tile[LB_TILE * 256];
    const int tiled = f16 && hd <= 256;
    if (!f16) {
        score(q, g, (const float*)K + j0 * stride, stride, n, hd, scores, n);
    } else if (tiled) {
        for (int64_t t = 0; t < n; t += LB_TILE) {
            const int64_t nt = n - t < LB_TILE ? n - t : LB_TILE;
            widen((const uint16_t*)K + (j0 + t) * stride, stride, nt, hd, tile);
            score(q, g, tile, hd, nt, hd, scores + t, n);
        }
    } else {  /* head_dim > 256 with an fp16 cache: row by row */
        for (int64_t t = 0; t < n; t++) {
            float row[1024];
            if (hd > 1024) return;  /* not reached: the plan refuses such heads */
            widen_c((const uint16_t*)K + (j0 + t) * stride, stride, 1, hd, row);
            scores_c(q, g, row, hd, 1, hd, scores + t, n);
        }
    }
    for (int64_t h = 0; h < g; h++) l[h] = softmax_num(scores + h * n, n, softcap, m + h);
    memset(out, 0, (size_t)(g * hd) * sizeof(float));
    if (!f16) {
        pv(scores, n, g, (const float*)V + j0 * stride, stride, n, hd, out);
    } else if (tiled) {
        for (int64_t t = 0; t < n; t += LB_TILE) {
            const int64_t nt = n - t < LB_TILE ? n - t : LB_TILE;
            widen((const uint16_t*)V + (j0 + t) * stride, stride, nt, hd, tile);
            pv(scores + t, n, g, tile, hd, nt, hd, out);
        }
    } else {
        for (int64_t t = 0; t < n; t++) {
            float row[1024];
            widen_c((const uint16_t*)V + (j0 + t) * stride, stride, 1, hd, row);
            pv_c(scores + t, n, g, row, hd, 1, hd, out);
        }
    }
}

static inline float act(float g, int kind) {
    if (kind == 0) return g / (1.0f + expf(-g));
    const float c = 0.7978845608028654f;  /* sqrt(2 / pi) */
    return 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
}

/* element `i` of a cache (float32 or fp16) */
static inline void* kv_at(const lb_dec_plan* p, void* base, int64_t i) {
    return p->kv_f16 ? (void*)((uint16_t*)base + i) : (void*)((float*)base + i);
}

/* Attention of every head for one query over cached positions [lo, S) into att [H * hd]. Long
 * contexts are split into chunks of positions, one per thread, each with its own softmax max and
 * sum, merged afterwards (out = sum_c e^(m_c - m) o_c / sum_c e^(m_c - m) l_c). */
static void attention(const lb_dec_plan* p, const lb_dec_layer* L, const float* q, float* att, float* scores,
                      int64_t lo, int64_t S, int nthreads) {
    const int64_t H = p->n_heads, KV = p->n_kv, hd = p->head_dim, grp = H / KV, n = S - lo;
    int64_t nch = (n * H * hd >= 32768 && nthreads > 1) ? nthreads : 1;
    if (nch > LB_MAX_CHUNKS) nch = LB_MAX_CHUNKS;
    if (nch > n) nch = n;
    float* part = scores + H * p->max_len;      /* [nch][H * hd] unnormalised outputs */
    float* ml = part + LB_MAX_CHUNKS * H * hd;  /* [nch][2 H]: max, sum per head */
#pragma omp parallel for num_threads((int)nch) schedule(static) if (nch > 1)
    for (int64_t c = 0; c < nch; c++) {
        const int64_t j0 = lo + n * c / nch, j1 = lo + n * (c + 1) / nch;
        float* out = nch > 1 ? part + c * H * hd : att;
        float* mc = ml + c * 2 * H;
        for (int64_t i = 0; i < KV; i++)
            attend_group(q + i * grp * hd, grp, kv_at(p, L->k_cache, i * hd), kv_at(p, L->v_cache, i * hd), p->kv_f16,
                         KV * hd, j0, j1, hd, p->attn_softcap, scores + i * grp * p->max_len + grp * (j0 - lo),
                         out + i * grp * hd, mc + i * grp, mc + H + i * grp);
    }
    for (int64_t h = 0; h < H; h++) {
        float m = -INFINITY, l = 0.0f;
        for (int64_t c = 0; c < nch; c++) m = ml[c * 2 * H + h] > m ? ml[c * 2 * H + h] : m;
        float w[LB_MAX_CHUNKS];
        for (int64_t c = 0; c < nch; c++) {
            w[c] = nch > 1 ? expf(ml[c * 2 * H + h] - m) : 1.0f;
            l += w[c] * ml[c * 2 * H + H + h];
        }
        float* oh = att + h * hd;
        const float inv = 1.0f / l;
        if (nch == 1) {
            for (int64_t i = 0; i < hd; i++) oh[i] *= inv;
        } else {
            for (int64_t i = 0; i < hd; i++) {
                float t = 0.0f;
                for (int64_t c = 0; c < nch; c++) t += w[c] * part[c * H * hd + h * hd + i];
                oh[i] = t * inv;
            }
        }
    }
}

/* Runs position `pos` (the cache holds positions [0, pos)) for `token`; writes logits [vocab].
 * Returns 0, or a positive code: 1 bad arguments, 10 + i when linear i of a block failed
 * (i = 0..6 for q, k, v, o, gate, up, down), 20 when the head failed. */
int lb_decode_step(const lb_dec_plan* p, int64_t token, int64_t pos, float* logits, int nthreads) {
    if (!p || token < 0 || token >= p->vocab || pos < 0 || pos >= p->max_len) return 1;
    const int64_t d = p->d, H = p->n_heads, KV = p->n_kv, hd = p->head_dim, F = p->ffn, S = pos + 1;
    float* x = p->work;
    float* h = x + d;
    float* a = h + d;
    float* m = a + d;
    float* q = m + d;
    float* att = q + H * hd;
    float* k = att + H * hd;
    float* v = k + KV * hd;
    float* g = v + KV * hd;
    float* u = g + F;
    float* scores = u + F;  /* [H, max_len] */
    double* prof = p->prof;
    double t0 = prof ? now() : 0.0, t1;
#define TICK(cat) do { if (prof) { t1 = now(); prof[cat] += t1 - t0; t0 = t1; } } while (0)

    const float* e = p->embed + token * d;
    for (int64_t i = 0; i < d; i++) x[i] = e[i] * p->embed_scale;
    TICK(LB_PROF_OTHER);
    for (int64_t l = 0; l < p->n_layers; l++) {
        const lb_dec_layer* L = p->layers + l;
        rms_norm(h, x, L->attn_norm, d, p->eps);
        TICK(LB_PROF_NORM);
        if (lin(&L->q, h, q, nthreads)) return 10;
        if (lin(&L->k, h, k, nthreads)) return 11;
        if (lin(&L->v, h, v, nthreads)) return 12;
        TICK(LB_PROF_QKV);
        if (L->q_norm) {
            for (int64_t i = 0; i < H; i++) rms_norm(q + i * hd, q + i * hd, L->q_norm, hd, p->eps);
            for (int64_t i = 0; i < KV; i++) rms_norm(k + i * hd, k + i * hd, L->k_norm, hd, p->eps);
        }
        const float* cs = L->cos + pos * hd;
        const float* sn = L->sin + pos * hd;
        for (int64_t i = 0; i < H; i++) rotary(att + i * hd, q + i * hd, cs, sn, hd, p->scaling);
        for (int64_t i = 0; i < KV; i++) rotary(u + i * hd, k + i * hd, cs, sn, hd, 1.0f);  /* u: free here */
        if (p->kv_f16) {
            uint16_t* kd = (uint16_t*)L->k_cache + pos * KV * hd;
            uint16_t* vd = (uint16_t*)L->v_cache + pos * KV * hd;
            for (int64_t i = 0; i < KV * hd; i++) kd[i] = float_to_half(u[i]);
            for (int64_t i = 0; i < KV * hd; i++) vd[i] = float_to_half(v[i]);
        } else {
            memcpy((float*)L->k_cache + pos * KV * hd, u, (size_t)(KV * hd) * sizeof(float));
            memcpy((float*)L->v_cache + pos * KV * hd, v, (size_t)(KV * hd) * sizeof(float));
        }
        memcpy(q, att, (size_t)(H * hd) * sizeof(float));
        TICK(LB_PROF_NORM);
        const int64_t lo = (L->window > 0 && S > L->window) ? S - L->window : 0;
        attention(p, L, q, att, scores, lo, S, nthreads);
        TICK(LB_PROF_ATTN);
        if (lin(&L->o, att, a, nthreads)) return 13;
        TICK(LB_PROF_O);
        if (L->post_attn_norm) rms_norm(a, a, L->post_attn_norm, d, p->eps);
        for (int64_t i = 0; i < d; i++) x[i] += a[i];
        rms_norm(h, x, L->mlp_norm, d, p->eps);
        TICK(LB_PROF_NORM);
        if (lin(&L->gate, h, g, nthreads)) return 14;
        if (lin(&L->up, h, u, nthreads)) return 15;
        for (int64_t i = 0; i < F; i++) g[i] = act(g[i], p->act) * u[i];
        if (lin(&L->down, g, m, nthreads)) return 16;
        TICK(LB_PROF_MLP);
        if (L->post_mlp_norm) rms_norm(m, m, L->post_mlp_norm, d, p->eps);
        for (int64_t i = 0; i < d; i++) x[i] += m[i];
        TICK(LB_PROF_NORM);
    }
    rms_norm(h, x, p->final_norm, d, p->eps);
    TICK(LB_PROF_NORM);
    if (lin(&p->head, h, logits, nthreads)) return 20;
    if (p->final_softcap > 0.0f)
        for (int64_t i = 0; i < p->vocab; i++) logits[i] = tanhf(logits[i] / p->final_softcap) * p->final_softcap;
    TICK(LB_PROF_HEAD);
#undef TICK
    return 0;
}
