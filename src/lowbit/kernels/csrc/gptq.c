/* GPTQ's column loop (Algorithm 1 of Frantar et al., lines 4-10) on an affine grid, in float32.
 *
 * lowbit.algorithms.hessian.gptq_columns runs the loop block by block; inside a block, column j
 * is rounded to the grid and its scaled error (w - q) / [H^-1]_jj is subtracted from the block's
 * later columns. In PyTorch that is a dozen tiny tensor operations per column (hundreds of
 * microseconds for a 576-row weight, most of a GPTQ run's solve time); here it is one call per
 * block segment. Rows are independent inside a block (a row's updates read only that row and
 * H^-1), so each thread takes whole rows and the loop for one row runs over the segment's columns.
 *
 * Every value is computed with the very operations, in the very order and precision, of the
 * PyTorch loop it replaces (lowbit.core.grid.round_to_grid and the eq. 2 update): IEEE float32
 * division, product and difference, round half to even, clamp. The build has no FMA contraction
 * (-std=c11 implies -ffp-contract=off), so the results are bit-identical to the PyTorch loop's;
 * tests/test_gptq.py checks that.
 *
 * Codes: symmetric  q = clamp(round(w / s)),        w^ = q * s
 *        integer z  q = clamp(round(w / s) + z),    w^ = (q - z) * s
 *        float z    q = clamp(round(w / s + z)),    w^ = (q - z) * s
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#include "lb_common.h"

LB_ISA_EXPORTS(gptq, LB_PATH(LB_ISA_SCALAR))

static inline float clampf(float q, float lo, float hi) {
    q = q < lo ? lo : q;  /* torch.clamp_: max with lo, then min with hi */
    return q > hi ? hi : q;
}

/* Columns [ia, ib) of one block of b columns.
 *   W1   [rows, b] the block's current weights (row-major, updated in place)
 *   H    the block's [b, b] part of the upper Cholesky factor of H^-1 (row stride ldh)
 *   S, Z scales and zero-points (Z NULL: symmetric): element (r, g) at r * s_rs + g * s_cs
 *   grp  the group of each of the block's b columns
 *   Q    the dequantized values, Qi the codes: element (r, i) at r * ldq + i (the block's first
 *        column at i = 0)
 *   E    [rows, b] the scaled errors (row-major)
 * Returns 0, or 2 on bad arguments. */
int lb_gptq_columns(float* W1, int64_t rows, int64_t b, int64_t ia, int64_t ib, const float* H, int64_t ldh,
                    const float* S, const float* Z, int64_t s_rs, int64_t s_cs, int float_zero,
                    const int64_t* grp, float qmin, float qmax, float* Q, int32_t* Qi, int64_t ldq, float* E,
                    int nthreads) {
    if (rows < 0 || b <= 0 || ia < 0 || ib > b || ia > ib || ldh < b || ldq < b) return 2;
    if (nthreads < 1) nthreads = 1;
    if (rows * (ib - ia) * (b - ia) < (1 << 16)) nthreads = 1;  /* too little work to wake a team */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float* w = W1 + r * b;
        float* e = E + r * b;
        for (int64_t i = ia; i < ib; i++) {
            const int64_t g = grp[i];
            const float s = S[r * s_rs + g * s_cs];
            const float x = w[i];
            float q, wh;
            if (!Z) {
                q = clampf(rintf(x / s), qmin, qmax);
                wh = q * s;
            } else {
                const float z = Z[r * s_rs + g * s_cs];
                if (float_zero) q = clampf(rintf(x / s + z), qmin, qmax);
                else q = clampf(rintf(x / s) + z, qmin, qmax);
                wh = (q - z) * s;
            }
            Q[r * ldq + i] = wh;
            Qi[r * ldq + i] = (int32_t)q;
            const float err = (x - wh) / H[i * ldh + i];  /* eq. 2: the scaled error */
            e[i] = err;
            const float* h = H + i * ldh;
            for (int64_t k = i + 1; k < b; k++) w[k] -= err * h[k];
        }
    }
    return 0;
}
