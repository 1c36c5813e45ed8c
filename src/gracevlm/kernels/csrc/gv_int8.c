/* Native INT8 (W8, symmetric, per-group scales) kernels for gracevlm on CPU: small-M matmul and dequantize.
 *
 * Plain C with GCC/Clang builtins, called through ctypes (gracevlm/kernels/native_int8.py). Built into one
 * library with gv_igemm.c. All matrices are row-major.
 *
 * Weights: codes q int8 [O, I] (the layer's own tensor, no repack) and scales s fp32 [O, G], G = I / g:
 *   W[o, k] = q[o, k] * s[o, k / g], the fp32 product (what nn.Int8Linear defines).
 * Requires I % g == 0, g % 32 == 0 and 32 <= g <= 2048 (the int32 sums of a group cannot overflow).
 *
 * Small-M matmul (gv8_matmul): the group scale is factored out, y = sum_g s_g * d_mg * sum_{k in g} q_k a_mk,
 * with each activation group rounded to 24-bit fixed point, a = round(x / d), d = max|x| / 8388607, written
 * as a = 256 * hi + lo with hi in [-32768, 32767] and lo in [0, 255] (both int16). The integer dot products
 * run on AVX2 vpmaddwd (16 multiply-adds per instruction: int8 codes widened to int16 times hi, and times lo);
 * the one rounding is that of the activations, |x - d*a| <= d/2, at the level of fp32 itself (2e-7..3e-7 measured
 * relative). With AVX-512 VNNI, M = 1 runs vpdpwssd over several weight rows at once and gives the AVX2
 * path's very bits (see rows8_512_m1). On a given code path (AVX2/AVX-512 or scalar) an output row is
 * computed by the same operations whatever M, the row's place among them and the thread count: y[m] is
 * bitwise the result for x[m] alone.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__)
#define GV_X86 1
#include <immintrin.h>
#include <cpuid.h>
#define GV_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#ifndef GV_SOURCE_HASH
#define GV_SOURCE_HASH "unknown"
#endif

#define GV_API __attribute__((visibility("default")))
#ifdef _OPENMP
#define GV_OMP(directive) _Pragma(#directive)
#else
#define GV_OMP(directive)
#endif
#define GV_INLINE static inline __attribute__((always_inline))

#ifndef GV_PF
#define GV_PF 4096 /* software prefetch distance in bytes of codes (rows are back to back) */
#endif
#define MT8 4        /* activation rows per pass over a weight row */
#define ROWS8_MAX 64 /* output rows per scheduling task */
#define TINY 1e-30f  /* a group whose max |x| is below this is taken as zero */
#define QMAX24 8388607.f

/* ------------------------------------------------------------------------------------------ */
/* Runtime dispatch (shared with gv_igemm.c)                                                   */

int gv8_isa_level = -1; /* 3: AVX-512 VNNI (the M = 1 matmul) on top of 2, 2: AVX2+FMA+F16C, 0: scalar */

static int detect_isa(void) {
#ifdef GV_X86
    unsigned a, b, c, d, lo, hi;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_F16C) || !(c & bit_OSXSAVE)) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0x6) != 0x6) return 0;
#ifndef GV_NO_AVX512
    if ((lo & 0xE6) == 0xE6 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 3;
#endif
    return 2;
#else
    return 0;
#endif
}

int gv8_isa(void) {
    if (gv8_isa_level < 0) gv8_isa_level = detect_isa();
    return gv8_isa_level;
}

/* The code path in use: 3 = AVX-512 VNNI, 2 = AVX2/FMA, 0 = portable scalar. */
GV_API int gv8_get_isa(void) { return gv8_isa(); }

/* Use code path `level` (0, 2 or 3) if this CPU has it, else the best it has; level < 0: detect. Returns it. */
GV_API int gv8_set_isa(int level) {
    const int best = detect_isa();
    gv8_isa_level = level < 0 || level > best ? best : level >= 3 ? 3 : level >= 2 ? 2 : 0;
    return gv8_isa_level;
}

GV_API const char *gv8_source_hash(void) { return GV_SOURCE_HASH; }

GV_API int gv8_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int check8(int I, int O, int g) {
    return I > 0 && O > 0 && g >= 32 && g <= 2048 && g % 32 == 0 && I % g == 0 ? 0 : -1;
}

static int rows_per_task(int O, int nthreads) {
    int r = O / (nthreads * 8);
    return r < 4 ? 4 : r > ROWS8_MAX ? ROWS8_MAX : r;
}

static int clamp_threads(int nthreads, int ntasks) {
    if (nthreads < 1) nthreads = 1;
    return nthreads > ntasks ? ntasks : nthreads;
}

/* ------------------------------------------------------------------------------------------ */
/* Activations: hi, lo int16 [M, I]; step d [M, G]                                              */

typedef struct {
    int16_t *hi, *lo;
    float *d;
} acts8_t;

static void prep_scalar(const float *x, int I, int g, int16_t *hi, int16_t *lo, float *d) {
    for (int gi = 0; gi < I / g; gi++) {
        const float *xg = x + (size_t)gi * g;
        float amax = 0.f, sum = 0.f;
        for (int k = 0; k < g; k++) {
            amax = fmaxf(amax, fabsf(xg[k]));
            sum += xg[k];
        }
        const float inv = amax >= TINY ? QMAX24 / amax : 0.f;
        for (int k = 0; k < g; k++) {
            const int32_t a = (int32_t)nearbyintf(fminf(fmaxf(xg[k] * inv, -QMAX24), QMAX24));
            hi[gi * g + k] = (int16_t)(a >> 8); /* floor: lo = a - 256 * hi in [0, 255] */
            lo[gi * g + k] = (int16_t)(a & 255);
        }
        d[gi] = isfinite(sum) ? (amax >= TINY ? amax / QMAX24 : 0.f) : NAN;
    }
}

#ifdef GV_X86
GV_INLINE GV_AVX2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 16 int32 -> 16 int16 in order (values in int16 range). */
GV_INLINE GV_AVX2 __m256i pack16(__m256i a, __m256i b) {
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
}

/* prep_scalar with AVX2, the same values (vcvtps2dq rounds to nearest even like nearbyintf). */
static GV_AVX2 void prep_avx2(const float *x, int I, int g, int16_t *hi, int16_t *lo, float *d) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i c255 = _mm256_set1_epi32(255);
    for (int gi = 0; gi < I / g; gi++) {
        const float *xg = x + (size_t)gi * g;
        __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int k = 0; k < g; k += 8) {
            const __m256 v = _mm256_loadu_ps(xg + k);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
            sum = _mm256_add_ps(sum, v);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const __m256 vinv = _mm256_set1_ps(amax >= TINY ? QMAX24 / amax : 0.f);
        const __m256 vq = _mm256_set1_ps(QMAX24), vnq = _mm256_set1_ps(-QMAX24);
        for (int k = 0; k < g; k += 16) {
            __m256i a[2];
            for (int i = 0; i < 2; i++) {
                const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xg + k + 8 * i), vinv);
                a[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, vnq), vq));
            }
            _mm256_storeu_si256((__m256i *)(hi + gi * g + k), pack16(_mm256_srai_epi32(a[0], 8), _mm256_srai_epi32(a[1], 8)));
            _mm256_storeu_si256((__m256i *)(lo + gi * g + k), pack16(_mm256_and_si256(a[0], c255), _mm256_and_si256(a[1], c255)));
        }
        d[gi] = isfinite(hsum8(sum)) ? (amax >= TINY ? amax / QMAX24 : 0.f) : NAN;
    }
}

/* Output rows o0..o1 for activation rows m0..m0+MT-1: per group, int32 lanes ah += q*hi, al += q*lo
 * (vpmaddwd), then tot = fma(256*ah + al, s_g*d_mg, tot) in fp32 lanes; y = hsum(tot) + bias. */
GV_INLINE GV_AVX2 void tile8_avx2(const int8_t *qrow, const float *srow, int I, int g, const acts8_t *A,
                                  int m0, int MT, float *out, int O, float bias) {
    __m256 tot[MT8];
    const int16_t *hi[MT8], *lo[MT8];
    const float *dm[MT8];
    for (int m = 0; m < MT; m++) {
        tot[m] = _mm256_setzero_ps();
        hi[m] = A->hi + (size_t)(m0 + m) * I;
        lo[m] = A->lo + (size_t)(m0 + m) * I;
        dm[m] = A->d + (size_t)(m0 + m) * (I / g);
    }
    const __m256 c256 = _mm256_set1_ps(256.f);
    for (int gi = 0, k = 0; gi < I / g; gi++) {
        __m256i ah[MT8], al[MT8];
        for (int m = 0; m < MT; m++) ah[m] = al[m] = _mm256_setzero_si256();
        for (const int e = k + g; k < e; k += 32) {
            _mm_prefetch((const char *)(qrow + k + GV_PF), _MM_HINT_T0);
            const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qrow + k)));
            const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qrow + k + 16)));
            for (int m = 0; m < MT; m++) {
                const __m256i *h = (const __m256i *)(hi[m] + k), *l = (const __m256i *)(lo[m] + k);
                ah[m] = _mm256_add_epi32(ah[m], _mm256_madd_epi16(w0, _mm256_loadu_si256(h)));
                al[m] = _mm256_add_epi32(al[m], _mm256_madd_epi16(w0, _mm256_loadu_si256(l)));
                ah[m] = _mm256_add_epi32(ah[m], _mm256_madd_epi16(w1, _mm256_loadu_si256(h + 1)));
                al[m] = _mm256_add_epi32(al[m], _mm256_madd_epi16(w1, _mm256_loadu_si256(l + 1)));
            }
        }
        for (int m = 0; m < MT; m++) {
            const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ah[m]), c256, _mm256_cvtepi32_ps(al[m]));
            tot[m] = _mm256_fmadd_ps(v, _mm256_set1_ps(srow[gi] * dm[m][gi]), tot[m]);
        }
    }
    for (int m = 0; m < MT; m++) out[(size_t)(m0 + m) * O] = hsum8(tot[m]) + bias;
}

static GV_AVX2 void rows8_avx2(const int8_t *q, const float *s, int I, int O, int g, const acts8_t *A, int M,
                               const float *bias, float *y, int o0, int o1) {
    for (int o = o0; o < o1; o++) {
        const int8_t *qrow = q + (size_t)o * I;
        const float *srow = s + (size_t)o * (I / g);
        const float b = bias ? bias[o] : 0.f;
        for (int m0 = 0; m0 < M; m0 += MT8) {
            const int MT = M - m0 < MT8 ? M - m0 : MT8;
            switch (MT) { /* constant MT: the loops over m unroll */
            case 4: tile8_avx2(qrow, srow, I, g, A, m0, 4, y + o, O, b); break;
            case 3: tile8_avx2(qrow, srow, I, g, A, m0, 3, y + o, O, b); break;
            case 2: tile8_avx2(qrow, srow, I, g, A, m0, 2, y + o, O, b); break;
            default: tile8_avx2(qrow, srow, I, g, A, m0, 1, y + o, O, b); break;
            }
        }
    }
}

static GV_AVX2 void dequant8_rows_avx2(const int8_t *q, const float *s, int I, int g, float *w, int64_t ldw,
                                       int o0, int o1) {
    for (int o = o0; o < o1; o++) {
        const int8_t *qrow = q + (size_t)o * I;
        float *wr = w + (size_t)(o - o0) * ldw;
        for (int k = 0; k < I; k += 8) {
            const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qrow + k))));
            _mm256_storeu_ps(wr + k, _mm256_mul_ps(v, _mm256_set1_ps(s[(size_t)o * (I / g) + k / g])));
        }
    }
}

#ifndef GV_NO_AVX512
#define GV8_HAVE_AVX512 1
#define GV8_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* tile8_avx2 for one activation row m and NR <= 4 weight rows from o, on AVX-512 VNNI: vpdpwssd over 32
 * inputs per instruction, the activation loads shared by the NR rows. Lane L of a 512-bit sum holds inputs
 * 2L and 2L+1 of every 32; lanes L and L + 8 together are exactly lane L of the AVX2 kernel's two vpmaddwd,
 * so adding the halves (integers: exact) before the same fp32 steps gives the AVX2 path's very bits. LIN:
 * prefetch the next NR rows in address order (short rows), else one stream per row. */
GV_INLINE GV8_AVX512 void rows8_512_m1(const int8_t *q, const float *s, int I, int g, const acts8_t *A, int m,
                                       int o, int NR, int LIN, const float *bias, float *y, int O) {
    const int G = I / g;
    const int16_t *hi = A->hi + (size_t)m * I, *lo = A->lo + (size_t)m * I;
    const float *dm = A->d + (size_t)m * G;
    const int8_t *rows[4];
    const float *srow[4];
    for (int r = 0; r < NR; r++) {
        rows[r] = q + (size_t)(o + r) * I;
        srow[r] = s + (size_t)(o + r) * G;
    }
    const size_t ahead = (size_t)NR * I;
    const __m256 c256 = _mm256_set1_ps(256.f);
    __m256 tot[4];
    for (int r = 0; r < NR; r++) tot[r] = _mm256_setzero_ps();
    for (int gi = 0, k = 0; gi < G; gi++) {
        __m512i ah[4], al[4];
        for (int r = 0; r < NR; r++) ah[r] = al[r] = _mm512_setzero_si512();
        for (const int e = k + g; k < e; k += 32) {
            const __m512i h = _mm512_loadu_si512((const void *)(hi + k)), l = _mm512_loadu_si512((const void *)(lo + k));
            for (int r = 0; r < NR; r++) {
                _mm_prefetch((const char *)(LIN ? rows[0] + ahead + (size_t)NR * k + 32 * r : rows[r] + k + ahead),
                             _MM_HINT_T0);
                const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(rows[r] + k)));
                ah[r] = _mm512_dpwssd_epi32(ah[r], w, h);
                al[r] = _mm512_dpwssd_epi32(al[r], w, l);
            }
        }
        for (int r = 0; r < NR; r++) {
            const __m256i h8 = _mm256_add_epi32(_mm512_castsi512_si256(ah[r]), _mm512_extracti64x4_epi64(ah[r], 1));
            const __m256i l8 = _mm256_add_epi32(_mm512_castsi512_si256(al[r]), _mm512_extracti64x4_epi64(al[r], 1));
            const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h8), c256, _mm256_cvtepi32_ps(l8));
            tot[r] = _mm256_fmadd_ps(v, _mm256_set1_ps(srow[r][gi] * dm[gi]), tot[r]);
        }
    }
    for (int r = 0; r < NR; r++) y[(size_t)m * O + o + r] = hsum8(tot[r]) + (bias ? bias[o + r] : 0.f);
}

/* Output rows o0..o1 of activation row m (M = 1). Rows per pass and prefetching as in gv_int4.c's
 * rows_512_m1 (measured there): ~4 KiB of short rows read ahead in address order, long rows 4 streams. */
static GV8_AVX512 void rows8_avx512(const int8_t *q, const float *s, int I, int O, int g, const acts8_t *A,
                                    int m, const float *bias, float *y, int o0, int o1) {
    const int lin = 4 * I <= 5120 ? 4 : 2 * I <= 5120 ? 2 : 0, step = lin ? lin : 4;
    for (int o = o0; o < o1; o += step) {
        const int NR = o1 - o < step ? o1 - o : step;
        if (NR == 4 && lin) rows8_512_m1(q, s, I, g, A, m, o, 4, 1, bias, y, O);
        else if (NR == 4) rows8_512_m1(q, s, I, g, A, m, o, 4, 0, bias, y, O);
        else if (NR == 2 && lin) rows8_512_m1(q, s, I, g, A, m, o, 2, 1, bias, y, O);
        else rows8_512_m1(q, s, I, g, A, m, o, NR, lin != 0, bias, y, O);
    }
}
#endif /* GV_NO_AVX512 */
#endif /* GV_X86 */

/* Portable path: exact int64 sums per group, fp32 accumulation over groups. */
static void rows8_scalar(const int8_t *q, const float *s, int I, int O, int g, const acts8_t *A, int M,
                         const float *bias, float *y, int o0, int o1) {
    const int G = I / g;
    for (int o = o0; o < o1; o++) {
        const int8_t *qrow = q + (size_t)o * I;
        for (int m = 0; m < M; m++) {
            const int16_t *hi = A->hi + (size_t)m * I, *lo = A->lo + (size_t)m * I;
            float tot = 0.f;
            for (int gi = 0; gi < G; gi++) {
                int64_t ah = 0, al = 0; /* up to 2048 * 2^22: beyond int32 */
                for (int k = gi * g; k < (gi + 1) * g; k++) {
                    ah += (int32_t)qrow[k] * hi[k];
                    al += (int32_t)qrow[k] * lo[k];
                }
                tot += ((float)ah * 256.f + (float)al) * (s[(size_t)o * G + gi] * A->d[(size_t)m * G + gi]);
            }
            y[(size_t)m * O + o] = tot + (bias ? bias[o] : 0.f);
        }
    }
}

/* y[M, O] = x[M, I] @ W^T + bias in fp32 (see the top of this file). q int8 [O, I], s fp32 [O, I/g], x rows
 * of stride ldx >= I, bias [O] or NULL, y contiguous [M, O]. Output rows are split across nthreads threads.
 * Returns 0, -1 for bad arguments, -2 when out of memory. */
GV_API int gv8_matmul(const int8_t *q, const float *s, int I, int O, int g, const float *x, int64_t ldx, int M,
                      const float *bias, float *y, int nthreads) {
    if (M <= 0 || ldx < I || check8(I, O, g)) return -1;
    const int G = I / g, R = rows_per_task(O, nthreads), ntasks = (O + R - 1) / R;
    nthreads = clamp_threads(nthreads, ntasks);
    const size_t nd = ((size_t)M * G + 15) / 16 * 16;
    float *mem = NULL;
    if (posix_memalign((void **)&mem, 64, nd * sizeof(float) + (size_t)M * I * 4)) return -2;
    acts8_t A = {(int16_t *)(mem + nd), (int16_t *)(mem + nd) + (size_t)M * I, mem};
    const int avx2 = gv8_isa() >= 2, avx512 = gv8_isa() == 3 && M == 1; /* same bits as AVX2 */
    (void)avx2;
    (void)avx512;
    GV_OMP(omp parallel num_threads(nthreads))
    {
        GV_OMP(omp for schedule(static))
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * ldx;
            int16_t *hm = A.hi + (size_t)m * I, *lm = A.lo + (size_t)m * I;
#ifdef GV_X86
            if (avx2) prep_avx2(xm, I, g, hm, lm, A.d + (size_t)m * G);
            else
#endif
                prep_scalar(xm, I, g, hm, lm, A.d + (size_t)m * G);
        }
        GV_OMP(omp for schedule(dynamic, 1))
        for (int t = 0; t < ntasks; t++) {
            const int o0 = t * R, o1 = o0 + R < O ? o0 + R : O;
#ifdef GV_X86
#ifdef GV8_HAVE_AVX512
            if (avx512) rows8_avx512(q, s, I, O, g, &A, 0, bias, y, o0, o1);
            else
#endif
            if (avx2) rows8_avx2(q, s, I, O, g, &A, M, bias, y, o0, o1);
            else
#endif
                rows8_scalar(q, s, I, O, g, &A, M, bias, y, o0, o1);
        }
    }
    free(mem);
    return 0;
}

/* w[o - o0, k] = q[o, k] * s[o, k / g] in fp32 (bit-exact), for o0 <= o < o1; rows of w have stride ldw >= I.
 * Returns 0 or -1 for bad arguments. */
GV_API int gv8_dequant(const int8_t *q, const float *s, int I, int O, int g, int o0, int o1, float *w, int64_t ldw,
                       int nthreads) {
    if (o0 < 0 || o1 > O || o0 >= o1 || ldw < I || check8(I, O, g)) return -1;
    const int R = 8, ntasks = (o1 - o0 + R - 1) / R;
    const int avx2 = gv8_isa() >= 2;
    (void)avx2;
    nthreads = clamp_threads(nthreads, ntasks);
    GV_OMP(omp parallel for schedule(dynamic, 4) num_threads(nthreads))
    for (int t = 0; t < ntasks; t++) {
        const int a = o0 + t * R, b = a + R < o1 ? a + R : o1;
        float *wt = w + (size_t)(a - o0) * ldw;
#ifdef GV_X86
        if (avx2) {
            dequant8_rows_avx2(q, s, I, g, wt, ldw, a, b);
            continue;
        }
#endif
        for (int o = a; o < b; o++)
            for (int k = 0; k < I; k++)
                wt[(size_t)(o - a) * ldw + k] = (float)q[(size_t)o * I + k] * s[(size_t)o * (I / g) + k / g];
    }
    return 0;
}
