/* Row-wise RMSNorm and rotary embedding for gracevlm on CPU, fp32: the small per-token operations of a decode
 * step in one call each instead of 6-10 torch ops (each ~3-5 us of dispatch on a small VM core).
 *
 * Built into one library with gv_int8.c (its code-path switch gv8_isa applies here too). Called through
 * ctypes (gracevlm/kernels/norm_rope.py). Row-major.
 *
 * gv_rms_norm: y[r, :] = (x[r, :] * inv_r) * w[:], inv_r = 1 / sqrt(mean(x[r, :]^2) + eps). The sum of
 *   squares is exact products (a float squared fits a double) added in double in 8 lanes (element k in lane
 *   k % 8) reduced in one fixed order, on every code path; mean and eps in double, inv_r rounded once to fp32,
 *   then two fp32 products per element. So a row's bits do not depend on the code path, the row count or the
 *   threads, and the result is within ~1 ulp of the exact value (torch's fp32 reduction differs by summation
 *   order only).
 * gv_rope: y[i, h, :] = x[i, h, :] * c[i, :] + rotate_half(x[i, h, :]) * s[i, :] with rotate_half(v) =
 *   (-v[d/2:], v[:d/2]): each product rounded, then the sum (no fused multiply-add), which are the bits of
 *   torch's `x * cos + rotate_half(x) * sin` in fp32.
 */
#include <stddef.h>
#include <stdint.h>
#include <math.h>

#if defined(__x86_64__)
#define GV_X86 1
#include <immintrin.h>
#define GV_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#define GV_API __attribute__((visibility("default")))
#if defined(__clang__)
#define GV_NO_CONTRACT
#define GV_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#else
#define GV_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define GV_NO_CONTRACT_BODY
#endif

int gv8_isa(void); /* gv_int8.c: 3 = AVX-512 VNNI, 2 = AVX2/FMA/F16C, 0 = scalar */

/* Sum of squares of x[0..d) in the 8-lane double order described above. */
static double sumsq_scalar(const float *x, int d) {
    double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < d; k++) lane[k % 8] += (double)x[k] * (double)x[k];
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}

#ifdef GV_X86
static GV_AVX2 double sumsq_avx2(const float *x, int d) {
    __m256d a = _mm256_setzero_pd(), b = _mm256_setzero_pd(); /* lanes 0-3 and 4-7 */
    int k = 0;
    for (; k + 8 <= d; k += 8) {
        const __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(x + k)), hi = _mm256_cvtps_pd(_mm_loadu_ps(x + k + 4));
        a = _mm256_add_pd(a, _mm256_mul_pd(lo, lo)); /* exact products: contraction changes nothing */
        b = _mm256_add_pd(b, _mm256_mul_pd(hi, hi));
    }
    double lane[8];
    _mm256_storeu_pd(lane, a);
    _mm256_storeu_pd(lane + 4, b);
    for (; k < d; k++) lane[k % 8] += (double)x[k] * (double)x[k];
    return ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
}
#endif

static GV_NO_CONTRACT void scale_row(const float *x, const float *w, float inv, float *y, int d) {
    GV_NO_CONTRACT_BODY
    for (int k = 0; k < d; k++) {
        const float t = x[k] * inv;
        y[k] = t * w[k];
    }
}

/* x rows of stride ldx (elements, >= d), y rows of stride ldy, w [d]. Returns 0, or -1 for bad arguments. */
GV_API int gv_rms_norm(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int rows, int d,
                       double eps) {
    if (rows < 0 || d <= 0 || ldx < d || ldy < d || !(eps >= 0)) return -1;
#ifdef GV_X86
    const int avx2 = gv8_isa() >= 2;
#endif
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * ldx;
        double ss;
#ifdef GV_X86
        if (avx2) ss = sumsq_avx2(xr, d);
        else
#endif
            ss = sumsq_scalar(xr, d);
        const float inv = (float)(1.0 / sqrt(ss / d + eps));
        scale_row(xr, w, inv, y + (size_t)r * ldy, d);
    }
    return 0;
}

/* x: n rows (one per token) of stride ldx >= H * d, each H heads of d contiguous values; c, s: [n, d]
 * contiguous; y: [n, H, d] contiguous. d even. Returns 0, or -1 for bad arguments. */
GV_API GV_NO_CONTRACT int gv_rope(const float *x, int64_t ldx, const float *c, const float *s, float *y, int n,
                                  int H, int d) {
    GV_NO_CONTRACT_BODY
    if (n < 0 || H <= 0 || d <= 0 || d % 2 || ldx < (int64_t)H * d) return -1;
    const int half = d / 2;
    for (int i = 0; i < n; i++) {
        const float *ci = c + (size_t)i * d, *si = s + (size_t)i * d;
        for (int h = 0; h < H; h++) {
            const float *v = x + (size_t)i * ldx + (size_t)h * d;
            float *o = y + ((size_t)i * H + h) * d;
            for (int k = 0; k < half; k++) {
                const float a = v[k] * ci[k], b = -v[k + half] * si[k];
                o[k] = a + b;
            }
            for (int k = half; k < d; k++) {
                const float a = v[k] * ci[k], b = v[k - half] * si[k];
                o[k] = a + b;
            }
        }
    }
    return 0;
}
