/* Pieces shared by lowbit's native kernel libraries (each csrc/<name>.c is its own shared
 * library; they include this header rather than link against each other).
 *
 *   lb_affine_weight   the C view of an affine weight, built once per weight by
 *                      lowbit.kernels.cpu (_AffineWeightC mirrors it) and handed to every
 *                      *_linear_w entry point that reads affine weights
 *   half_to_float, float_to_half, ld_f
 *                      portable IEEE half conversions (float_to_half rounds to nearest even,
 *                      as torch's conversion does)
 *   pick_threads, thread_rows
 *                      how a call splits its output rows over OpenMP threads: calls that read
 *                      fewer than g_min_parallel_bytes of weights (per library, settable by the
 *                      library's lb_<lib>_set_min_parallel_bytes) stay on one thread, because
 *                      waking a second thread costs more than it saves
 *   lb_grow            grow-only 64-byte-aligned scratch (a kernel's thread-local buffers)
 *   lb_code_at, lb_unpack_codes
 *                      one code of a packed affine row, or a row's codes one byte each
 *   LB_ISA_*, lb_cpu_isa, LB_ISA_EXPORTS
 *                      the one CPU-feature check and the instruction-set levels every library
 *                      dispatches on (lowbit.kernels._native.ISAS names them in this order)
 */
#ifndef LOWBIT_LB_COMMON_H
#define LOWBIT_LB_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Grow-only scratch: *p holds at least n bytes (64-byte aligned) afterwards, or is NULL when the
 * allocation failed (*have is then 0). The old contents are not kept. */
static inline void* lb_grow(void** p, size_t* have, size_t n) {
    if (n > *have) {
        free(*p);
        *p = aligned_alloc(64, (n + 63) / 64 * 64);
        *have = *p ? n : 0;
    }
    return *p;
}

/* Code c of a packed affine row: bits 2, 4, 8 hold whole codes per byte (code j of a byte at bit
 * j*b); other widths are runs of 8 codes in `bits` bytes, code j of a run at bits [j*b, j*b + b). */
static inline unsigned lb_code_at(const uint8_t* row, int bits, int64_t c) {
    if (bits == 8) return row[c];
    if (bits == 4 || bits == 2) {
        int lg = bits == 4 ? 1 : 2;  /* 2 or 4 codes per byte */
        return (row[c >> lg] >> ((c & ((1 << lg) - 1)) * bits)) & ((1u << bits) - 1u);
    }
    int bit = (int)(c & 7) * bits, sh = bit & 7;
    const uint8_t* p = row + (c >> 3) * bits + (bit >> 3);
    unsigned v = (unsigned)p[0] >> sh;
    if (sh + bits > 8) v |= (unsigned)p[1] << (8 - sh);
    return v & ((1u << bits) - 1u);
}

/* The first K codes of a packed affine row, one byte each (simple loops the compiler vectorises
 * for 2, 4 and 8 bits; other widths code by code). */
static inline void lb_unpack_codes(const uint8_t* row, int bits, int64_t K, uint8_t* out) {
    int64_t c = 0;
    if (bits == 8) {
        memcpy(out, row, (size_t)K);
        return;
    }
    if (bits == 4) {
        for (int64_t i = 0; i < K / 2; i++) {
            out[2 * i] = row[i] & 15;
            out[2 * i + 1] = row[i] >> 4;
        }
        c = K / 2 * 2;
    } else if (bits == 2) {
        for (int64_t i = 0; i < K / 4; i++) {
            const uint8_t b = row[i];
            out[4 * i] = b & 3;
            out[4 * i + 1] = (b >> 2) & 3;
            out[4 * i + 2] = (b >> 4) & 3;
            out[4 * i + 3] = b >> 6;
        }
        c = K / 4 * 4;
    }
    for (; c < K; c++) out[c] = (uint8_t)lb_code_at(row, bits, c);
}

typedef struct {
    const uint8_t* qw;
    const void* scales;
    const uint8_t* qz;
    const void* fz;
    int64_t K, N, row_bytes, s_stride, G, n_groups, qz_stride;
    int32_t bits, scales_f16, fz_f16;
    float zconst;
} lb_affine_weight;

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400u));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, mant = x & 0x7fffff;
    const int32_t exp = (int32_t)((x >> 23) & 0xff);
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    const int32_t e = exp - 112;  /* half exponent field */
    if (e >= 31) return (uint16_t)(sign | 0x7c00);
    if (e <= 0) {  /* half subnormal (or zero) */
        if (e < -10) return (uint16_t)sign;
        const uint32_t full = mant | 0x800000;
        const int shift = 14 - e;
        uint32_t hm = full >> shift;
        const uint32_t rem = full & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (hm & 1))) hm++;
        return (uint16_t)(sign | hm);
    }
    uint32_t h = sign | ((uint32_t)e << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;  /* a carry into the exponent is right */
    return (uint16_t)h;
}

/* element i of an fp16 (f16 != 0) or float32 array, as float */
static inline float ld_f(const void* p, int f16, int64_t i) {
    return f16 ? half_to_float(((const uint16_t*)p)[i]) : ((const float*)p)[i];
}

static int64_t g_min_parallel_bytes = 48 * 1024;

static inline int pick_threads(int nthreads, int64_t work_bytes, int64_t N) {
    int nt = nthreads < 1 ? 1 : nthreads;
    if (work_bytes < g_min_parallel_bytes) nt = 1;
    if (nt > N) nt = (int)(N < 1 ? 1 : N);
    return nt;
}

/* rows [r0, r1) of thread `tid` out of nt, boundaries aligned to `align` rows */
static inline void thread_rows(int64_t N, int nt, int tid, int64_t align, int64_t* r0, int64_t* r1) {
    int64_t per = (N + nt - 1) / nt;
    per = (per + align - 1) / align * align;
    *r0 = per * tid;
    *r1 = *r0 + per;
    if (*r0 > N) *r0 = N;
    if (*r1 > N) *r1 = N;
}

/* ---- instruction sets ------------------------------------------------------------------------
 * Levels, each including the ones below it (lowbit.kernels._native.ISAS holds their names):
 *   LB_ISA_SCALAR      portable C
 *   LB_ISA_AVX2        AVX2 + FMA + F16C
 *   LB_ISA_AVX512      that + AVX-512 F, BW, VL
 *   LB_ISA_AVX512VNNI  that + AVX-512 VNNI
 *   LB_ISA_AVX512VBMI  that + AVX-512 VBMI (byte permutes: vpermb, vpermi2b)
 * lb_cpu_isa() is the highest level this CPU runs: the only CPU-feature check in the C code. */
enum { LB_ISA_SCALAR = 0, LB_ISA_AVX2 = 1, LB_ISA_AVX512 = 2, LB_ISA_AVX512VNNI = 3, LB_ISA_AVX512VBMI = 4 };
#define LB_PATH(level) (1u << (level))

static inline int lb_cpu_isa(void) {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    static int level = -1;
    if (level < 0) {
        __builtin_cpu_init();
        int l = LB_ISA_SCALAR;
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
            l = LB_ISA_AVX2;
            if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl")) {
                l = LB_ISA_AVX512;
                if (__builtin_cpu_supports("avx512vnni")) {
                    l = LB_ISA_AVX512VNNI;
                    if (__builtin_cpu_supports("avx512vbmi")) l = LB_ISA_AVX512VBMI;
                }
            }
        }
        level = l;
    }
    return level;
#else
    return LB_ISA_SCALAR;
#endif
}

/* the highest level in `paths` (a mask of LB_PATH bits; LB_ISA_SCALAR always one of them) that
 * is at most `cap` and that this CPU runs */
static inline int lb_isa_pick(int cap, unsigned paths) {
    int top = lb_cpu_isa();
    if (cap < 0 || cap > top) cap = top;
    while (cap > LB_ISA_SCALAR && !(paths & LB_PATH(cap))) cap--;
    return cap;
}

/* Every library exports the same four functions for its code paths `paths`:
 *   int lb_<lib>_paths(void)        the mask of paths it has (on a CPU that runs them all)
 *   int lb_<lib>_isa_max(void)      the best path this CPU runs
 *   int lb_<lib>_isa(void)          the path in use
 *   int lb_<lib>_set_isa(int cap)   use the best path at most `cap` (negative: no cap) -- tests
 *                                   and benchmarks run every path this way; returns the path */
#define LB_ISA_EXPORTS(lib, paths)                                                                  \
    static int g_isa = -1;                                                                          \
    int lb_##lib##_paths(void) { return (int)(paths); }                                             \
    int lb_##lib##_isa_max(void) { return lb_isa_pick(-1, (paths)); }                               \
    int lb_##lib##_set_isa(int cap) { return g_isa = lb_isa_pick(cap, (paths)); }                   \
    int lb_##lib##_isa(void) { return g_isa < 0 ? (g_isa = lb_isa_pick(-1, (paths))) : g_isa; }

#endif
