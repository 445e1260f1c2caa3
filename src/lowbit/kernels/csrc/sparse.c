/* Sparse linear layers on the CPU: y[B, out] = x[B, in] · Wᵀ (+ bias) for a weight W [out, in]
 * stored N:M-compressed (lowbit.formats.sparse_nm) or as CSR (lowbit.formats.sparse_csr).
 *
 * Plain C + OpenMP, loaded with ctypes by lowbit.kernels.sparse. AVX2/FMA code is compiled with
 * per-function target attributes and chosen at run time (lb_sparse_isa, lb_common.h); every path
 * has a scalar twin (lb_sparse_set_isa(0) selects it), and lowbit.kernels.sparse holds the
 * plain-torch reference.
 *
 * Layouts (row r of W):
 *   N:M  values[r, j], j < K = in/M·N, column (j / N)·M + pos_j; pos_j is a b-bit code packed
 *        with lowbit.core.packing (runs of 8 codes = b bytes, little endian, code t of a run at
 *        bit t·b), row r's codes start at byte r·idx_row_bytes.
 *   CSR  entries row_ptr[r] .. row_ptr[r+1]-1 of values / col (int16 or int32).
 *
 * Batch 1 is a dot product per row (memory bound). For 2:4 the AVX2 path rebuilds 16 dense
 * weights from 8 stored values with a permute table and multiplies them with contiguous x (no
 * gather); CSR and other N:M gather x. Batch > 1: x is transposed per tile of up to 32 rows into
 * xT[in][nbp] (nbp a multiple of 8, zero padded) so each stored weight is one broadcast and
 * nbp/8 FMAs on contiguous memory. Rows of W are split over the OpenMP threads; every element of
 * y is written exactly once (accumulated in registers, then stored).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "lb_common.h"
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LB_X86 1
#else
#define LB_X86 0
#endif

#define BT 32 /* batch rows per tile of the batched path */
#define SMALL_WORK (1 << 17) /* multiply-adds below which one thread does the whole product */

/* code paths: lb_sparse_isa() (lb_common.h), lowered by lb_sparse_set_isa */
LB_ISA_EXPORTS(sparse, LB_PATH(LB_ISA_SCALAR) | LB_PATH(LB_ISA_AVX2))

/* ---- N:M position codes -> columns ------------------------------------------------------- */
static inline unsigned code_at(const uint8_t *row, int bits, int64_t j) {
    if (bits == 8) return row[j];
    if (bits == 1 || bits == 2 || bits == 4) {
        int per = 8 / bits;
        return (row[j / per] >> ((j % per) * bits)) & ((1u << bits) - 1);
    }
    int64_t run = j >> 3;
    const uint8_t *p = row + run * bits;
    uint64_t word = 0;
    for (int k = 0; k < bits; k++) word |= (uint64_t)p[k] << (8 * k);
    return (unsigned)((word >> ((j & 7) * bits)) & ((1u << bits) - 1));
}

static void nm_columns(const uint8_t *row, int bits, int64_t K, int n, int m, int32_t *cols) {
    int32_t base = 0;
    int t = 0;
    if (bits == 2) { /* the common case (M <= 4): four codes per byte */
        for (int64_t j = 0; j < K; j++) {
            cols[j] = base + ((row[j >> 2] >> ((j & 3) * 2)) & 3);
            if (++t == n) { t = 0; base += m; }
        }
        return;
    }
    for (int64_t j = 0; j < K; j++) {
        cols[j] = base + (int32_t)code_at(row, bits, j);
        if (++t == n) { t = 0; base += m; }
    }
}

/* ---- generic rows: values + int32 columns ------------------------------------------------- */
static float dot_scalar(const float *v, const int32_t *c, int64_t K, const float *x) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t j = 0;
    for (; j + 4 <= K; j += 4) {
        a0 += v[j] * x[c[j]];
        a1 += v[j + 1] * x[c[j + 1]];
        a2 += v[j + 2] * x[c[j + 2]];
        a3 += v[j + 3] * x[c[j + 3]];
    }
    for (; j < K; j++) a0 += v[j] * x[c[j]];
    return (a0 + a1) + (a2 + a3);
}

/* acc[0..nbp) = Σ_j v[j] · xT[c[j]][0..nbp) */
static void rowmm_scalar(const float *v, const int32_t *c, int64_t K, const float *xT, int nbp, float *acc) {
    for (int b = 0; b < nbp; b++) acc[b] = 0.f;
    for (int64_t j = 0; j < K; j++) {
        const float w = v[j];
        const float *xr = xT + (int64_t)c[j] * nbp;
        for (int b = 0; b < nbp; b++) acc[b] += w * xr[b];
    }
}

#if LB_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static float dot_avx2(const float *v, const int32_t *c, int64_t K,
                                                           const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= K; j += 16) {
        __m256 g0 = _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(c + j)), 4);
        __m256 g1 = _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(c + j + 8)), 4);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), g0, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j + 8), g1, a1);
    }
    for (; j + 8 <= K; j += 8) {
        __m256 g0 = _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(c + j)), 4);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), g0, a0);
    }
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; j < K; j++) s += v[j] * x[c[j]];
    return s;
}

/* CSR rows with int16 columns: widen 8 at a time, then gather */
__attribute__((target("avx2,fma"))) static float dot16_avx2(const float *v, const int16_t *c, int64_t K,
                                                             const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= K; j += 16) {
        __m256i i0 = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
        __m256i i1 = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(c + j + 8)));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), _mm256_i32gather_ps(x, i0, 4), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j + 8), _mm256_i32gather_ps(x, i1, 4), a1);
    }
    for (; j + 8 <= K; j += 8) {
        __m256i i0 = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), _mm256_i32gather_ps(x, i0, 4), a0);
    }
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; j < K; j++) s += v[j] * x[c[j]];
    return s;
}

#define ROWMM_AVX2(NV)                                                                              \
    __attribute__((target("avx2,fma"))) static void rowmm_avx2_##NV(const float *v, const int32_t *c, \
                                                                     int64_t K, const float *xT,     \
                                                                     float *acc) {                   \
        __m256 a[NV];                                                                               \
        for (int t = 0; t < NV; t++) a[t] = _mm256_setzero_ps();                                    \
        for (int64_t j = 0; j < K; j++) {                                                           \
            const __m256 w = _mm256_broadcast_ss(v + j);                                            \
            const float *xr = xT + (int64_t)c[j] * (8 * NV);                                        \
            for (int t = 0; t < NV; t++) a[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * t), a[t]); \
        }                                                                                           \
        for (int t = 0; t < NV; t++) _mm256_storeu_ps(acc + 8 * t, a[t]);                           \
    }
ROWMM_AVX2(1)
ROWMM_AVX2(2)
ROWMM_AVX2(3)
ROWMM_AVX2(4)

static void rowmm_avx2(const float *v, const int32_t *c, int64_t K, const float *xT, int nbp, float *acc) {
    switch (nbp) {
        case 8: rowmm_avx2_1(v, c, K, xT, acc); break;
        case 16: rowmm_avx2_2(v, c, K, xT, acc); break;
        case 24: rowmm_avx2_3(v, c, K, xT, acc); break;
        default: rowmm_avx2_4(v, c, K, xT, acc); break;
    }
}

/* 2:4, batch 1: byte k of a row's codes holds 4 positions = 2 groups = 8 columns. LUT[byte][lane]
 * is the value (0..3 within the byte's 4 values) that lands in that column, or has the sign bit
 * set where the column was pruned. */
static int32_t LUT24[256][8];

__attribute__((constructor)) static void lut24_init(void) {
    for (int b = 0; b < 256; b++) {
        for (int l = 0; l < 8; l++) LUT24[b][l] = (int32_t)0x80000000u;
        for (int t = 0; t < 4; t++) {
            int pos = (b >> (2 * t)) & 3;
            int lane = (t / 2) * 4 + pos;
            LUT24[b][lane] = t;
        }
    }
}

__attribute__((target("avx2,fma"))) static float dot24_avx2(const float *v, const uint8_t *codes, int64_t in,
                                                             const float *x) {
    const int64_t K = in / 2;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const __m256i four = _mm256_set1_epi32(4);
    const __m256 zero = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= K; j += 8) {            /* 8 values, 2 code bytes, 16 columns */
        const __m256 V = _mm256_loadu_ps(v + j);
        const int64_t col = 2 * j;
        __m256i p0 = _mm256_loadu_si256((const __m256i *)LUT24[codes[j >> 2]]);
        __m256i p1 = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)LUT24[codes[(j >> 2) + 1]]), four);
        __m256 w0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(V, p0), zero, _mm256_castsi256_ps(p0));
        __m256 w1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(V, p1), zero, _mm256_castsi256_ps(p1));
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + col), a0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + col + 8), a1);
    }
    float s = hsum256(_mm256_add_ps(a0, a1));
    for (; j < K; j++) s += v[j] * x[(j / 2) * 4 + ((codes[j >> 2] >> (2 * (j & 3))) & 3)];
    return s;
}
#endif

/* ---- batched driver ----------------------------------------------------------------------- */
typedef void (*rowmm_fn)(const float *, const int32_t *, int64_t, const float *, int, float *);

static void transpose_tile(const float *x, int64_t in, int64_t b0, int nb, int nbp, float *xT) {
    #pragma omp for schedule(static)
    for (int64_t c = 0; c < in; c++) {
        float *dst = xT + c * nbp;
        for (int b = 0; b < nb; b++) dst[b] = x[(b0 + b) * in + c];
        for (int b = nb; b < nbp; b++) dst[b] = 0.f;
    }
}

/* Row r's values/columns, decoded into the thread's buffer where needed. */
typedef struct {
    int kind;              /* 0 = N:M, 1 = CSR int16, 2 = CSR int32 */
    const float *vals;
    const uint8_t *codes;  /* N:M */
    int64_t code_row_bytes, K;
    int bits, n, m;
    const void *col;       /* CSR */
    const int32_t *row_ptr;
} sparse_w;

static const float *row_entries(const sparse_w *w, int64_t r, int32_t *buf, const int32_t **cols, int64_t *K) {
    if (w->kind == 0) {
        nm_columns(w->codes + r * w->code_row_bytes, w->bits, w->K, w->n, w->m, buf);
        *cols = buf;
        *K = w->K;
        return w->vals + r * w->K;
    }
    int64_t s = w->row_ptr[r], e = w->row_ptr[r + 1];
    *K = e - s;
    if (w->kind == 1) {
        const int16_t *c = (const int16_t *)w->col + s;
        for (int64_t j = 0; j < *K; j++) buf[j] = c[j];
        *cols = buf;
    } else {
        *cols = (const int32_t *)w->col + s;
    }
    return w->vals + s;
}

static void sparse_linear(const sparse_w *w, const float *x, int64_t B, int64_t in, int64_t out,
                          const float *bias, float *y, int nthreads) {
    int avx2 = lb_sparse_isa() >= LB_ISA_AVX2;
    if (nthreads < 1) nthreads = 1;
    /* small products run on one thread: waking a team costs more than it saves */
    int64_t work = (w->kind == 0 ? out * w->K : (int64_t)w->row_ptr[out]) * B;
    if (work < SMALL_WORK) nthreads = 1;
    int64_t maxK = w->kind == 0 ? w->K : in;
    if (B == 1) {
        #pragma omp parallel num_threads(nthreads)
        {
            int32_t *buf = (int32_t *)malloc(sizeof(int32_t) * (size_t)(maxK > 0 ? maxK : 1));
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < out; r++) {
                float s;
#if LB_X86
                if (avx2 && w->kind == 0 && w->n == 2 && w->m == 4) {
                    s = dot24_avx2(w->vals + r * w->K, w->codes + r * w->code_row_bytes, in, x);
                } else if (avx2 && w->kind == 1) {
                    int64_t a = w->row_ptr[r], e = w->row_ptr[r + 1];
                    s = dot16_avx2(w->vals + a, (const int16_t *)w->col + a, e - a, x);
                } else
#endif
                {
                    const int32_t *cols;
                    int64_t K;
                    const float *v = row_entries(w, r, buf, &cols, &K);
#if LB_X86
                    s = avx2 ? dot_avx2(v, cols, K, x) : dot_scalar(v, cols, K, x);
#else
                    s = dot_scalar(v, cols, K, x);
#endif
                }
                y[r] = bias ? s + bias[r] : s;
            }
            free(buf);
        }
        return;
    }
    float *xT = (float *)malloc(sizeof(float) * (size_t)in * BT);
    rowmm_fn rowmm = rowmm_scalar;
#if LB_X86
    if (avx2) rowmm = rowmm_avx2;
#endif
    for (int64_t b0 = 0; b0 < B; b0 += BT) {
        int nb = (int)(B - b0 < BT ? B - b0 : BT);
        int nbp = (nb + 7) / 8 * 8;
        #pragma omp parallel num_threads(nthreads)
        {
            transpose_tile(x, in, b0, nb, nbp, xT); /* ends with the omp for's barrier */
            int32_t *buf = (int32_t *)malloc(sizeof(int32_t) * (size_t)(maxK > 0 ? maxK : 1));
            float acc[BT];
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < out; r++) {
                const int32_t *cols;
                int64_t K;
                const float *v = row_entries(w, r, buf, &cols, &K);
                rowmm(v, cols, K, xT, nbp, acc);
                const float bb = bias ? bias[r] : 0.f;
                for (int b = 0; b < nb; b++) y[(b0 + b) * out + r] = acc[b] + bb;
            }
            free(buf);
        }
    }
    free(xT);
}

/* ---- exported ------------------------------------------------------------------------------ */
void lb_nm_linear(const float *x, int64_t B, int64_t in, const float *values, const uint8_t *codes,
                  int64_t code_row_bytes, int bits, int n, int m, int64_t out, const float *bias, float *y,
                  int nthreads) {
    sparse_w w = {0, values, codes, code_row_bytes, in / m * n, bits, n, m, NULL, NULL};
    sparse_linear(&w, x, B, in, out, bias, y, nthreads);
}

void lb_csr_linear(const float *x, int64_t B, int64_t in, const float *values, const void *col, int col_int32,
                   const int32_t *row_ptr, int64_t out, const float *bias, float *y, int nthreads) {
    sparse_w w = {col_int32 ? 2 : 1, values, NULL, 0, 0, 0, 0, 0, col, row_ptr};
    sparse_linear(&w, x, B, in, out, bias, y, nthreads);
}

/* The weight's fields in one struct built once per weight: the *_linear_w entry every kernel row
 * with a C entry has (the C decode step calls it through a pointer). kind 0 = N:M (values [out,
 * in/m*n], codes [out, code_row_bytes]), 1 = CSR with int16 columns, 2 = CSR with int32 columns. */
typedef struct {
    const float *vals;
    const uint8_t *codes;
    const void *col;
    const int32_t *row_ptr;
    int64_t in, out, code_row_bytes;
    int32_t kind, bits, n, m;
} lb_sparse_weight;

int lb_sparse_linear_w(const lb_sparse_weight *w, const float *x, int64_t B, const float *bias, float *y,
                       int nthreads) {
    if (w->kind < 0 || w->kind > 2 || (w->kind == 0 && (w->m <= 0 || w->in % w->m))) return 2;
    sparse_w s = {w->kind, w->vals, w->codes, w->code_row_bytes, w->kind == 0 ? w->in / w->m * w->n : 0,
                  w->bits, w->n, w->m, w->col, w->row_ptr};
    sparse_linear(&s, x, B, w->in, w->out, bias, y, nthreads);
    return 0;
}
