/* Integer GEMM for prefill-sized M on CPU (AVX2), for INT4 layers in gv_int4.c's layout and INT8 layers.
 *
 * Built into one library with gv_int8.c (its code-path switch gv8_isa applies here too). Row-major.
 *
 * y[m, o] = sum_g (s[o, g] * d[m, g]) * sum_{k in g} w[o, k] * a[m, k]  (+ bias[o]) in fp32, where
 *   w = u - z (INT4: codes minus zero point, in [-15, 15]) or w = q (INT8: codes in [-128, 127]), exact;
 *   a = round(x / d) with d = max|x| / 32767 per activation group: 16-bit fixed point (equivalent to two
 *   int8 digit planes), the one rounding: measured 2.5e-5 relative L2 error on outputs (vs the exact product).
 * The integer dot products run on vpmaddwd (16 multiply-adds per instruction, int32 sums that cannot
 * overflow: per lane and group at most g/2 * 2 * 128 * 32767 < 2^31 for g <= 256 with INT8, g <= 4096 with
 * INT4). Why not vpmaddubsw with two int8 planes: without VNNI it needs a second instruction to widen its
 * int16 sums and twice the accumulators (one per plane) for the same 16-bit result.
 *
 * Blocking: threads take blocks of NB = 24 output columns; per block and K block (KB inputs, a multiple of
 * g) the weights are unpacked once into an int16 panel [KB/2][NB][2] (48 KiB: L2) and every activation
 * row passes over it in tiles of MR = 4 rows (a 4 x 24 tile of int32 accumulators in 12 registers).
 * Every y[m, o] is computed by the same operations whatever M, the row's tile and the thread count: rows
 * are bitwise independent of the batch. The scalar path does the same operations (fmaf), so it gives the
 * same bits as the AVX2 one.
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
#define GV_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

#define GV_API __attribute__((visibility("default")))
#ifdef _OPENMP
#define GV_OMP(directive) _Pragma(#directive)
#else
#define GV_OMP(directive)
#endif
#define GV_INLINE static inline __attribute__((always_inline))

#define NB 24   /* output columns per block (3 vectors of 8) */
#define MR 4    /* activation rows per register tile */
#ifndef GV_KB
#define GV_KB 1024 /* inputs per K block (rounded to a multiple of g; 128..4096 measured: >= 512 best) */
#endif
#define TINY 1e-30f
#define QMAX16 32767.f

int gv8_isa(void); /* gv_int8.c */

typedef struct {
    int kind; /* 4: INT4 layout of gv_int4.c; 8: int8 codes [O, I] with fp32 scales [O, G] */
    const uint8_t *base;
    int64_t stride, zoff, coff; /* INT4 layout (gv_layout) */
    int ss;                     /* INT4 scale bytes: 2 (fp16) or 4 (fp32) */
    const int8_t *q;            /* INT8 */
    const float *s;
    int I, O, g, G;
} wsrc_t;

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float scale_at(const wsrc_t *W, int o, int gi) {
    if (W->kind == 8) return W->s[(size_t)o * W->G + gi];
    const uint8_t *row = W->base + (size_t)o * W->stride;
    if (W->ss == 4) {
        float v;
        memcpy(&v, row + 4 * (size_t)gi, 4);
        return v;
    }
    uint16_t h;
    memcpy(&h, row + 2 * (size_t)gi, 2);
    return half_to_float(h);
}

/* w[o, k0 .. k0+63] (exact small integers) into t[0..63]. */
static void weights64(const wsrc_t *W, int o, int k0, int16_t *t) {
    if (W->kind == 8) {
        const int8_t *q = W->q + (size_t)o * W->I + k0;
        for (int j = 0; j < 64; j++) t[j] = q[j];
        return;
    }
    const uint8_t *row = W->base + (size_t)o * W->stride, *c = row + W->coff + (size_t)(k0 / 64) * 32;
    for (int j = 0; j < 64; j++) { /* byte j: input j in the low nibble, input 32 + j in the high one */
        const int k = k0 + j, u = j < 32 ? c[j] & 0xF : c[j - 32] >> 4;
        t[j] = (int16_t)(u - row[W->zoff + k / W->g]);
    }
}

/* Panel of columns c0 .. c0+nc-1 (nc <= NB, the rest zero) and inputs kb0 .. kb1-1: p[(k-kb0)/2][col][2] and
 * the scales sp[gi - kb0/g][col]. */
static void fill_panel(const wsrc_t *W, int c0, int nc, int kb0, int kb1, int16_t *p, float *sp) {
    int16_t t[64];
    uint32_t *p32 = (uint32_t *)p;
    const int npair = (kb1 - kb0) / 2;
    for (int col = 0; col < NB; col++) {
        if (col >= nc) {
            for (int j = 0; j < npair; j++) p32[(size_t)j * NB + col] = 0;
            for (int gi = kb0 / W->g; gi < kb1 / W->g; gi++) sp[(size_t)(gi - kb0 / W->g) * NB + col] = 0.f;
            continue;
        }
        const int o = c0 + col;
        for (int k = kb0; k < kb1; k += 64) {
            weights64(W, o, k, t);
            for (int j = 0; j < 32; j++) {
                uint32_t pair;
                memcpy(&pair, t + 2 * j, 4);
                p32[(size_t)((k - kb0) / 2 + j) * NB + col] = pair;
            }
        }
        for (int gi = kb0 / W->g; gi < kb1 / W->g; gi++) sp[(size_t)(gi - kb0 / W->g) * NB + col] = scale_at(W, o, gi);
    }
}

static void prep16_scalar(const float *x, int I, int g, int16_t *a, float *d) {
    for (int gi = 0; gi < I / g; gi++) {
        const float *xg = x + (size_t)gi * g;
        float amax = 0.f, sum = 0.f;
        for (int k = 0; k < g; k++) {
            amax = fmaxf(amax, fabsf(xg[k]));
            sum += xg[k];
        }
        const float inv = amax >= TINY ? QMAX16 / amax : 0.f;
        for (int k = 0; k < g; k++) a[gi * g + k] = (int16_t)nearbyintf(fminf(fmaxf(xg[k] * inv, -QMAX16), QMAX16));
        d[gi] = isfinite(sum) ? (amax >= TINY ? amax / QMAX16 : 0.f) : NAN;
    }
}

/* Scalar tile: rows m0..m0+mr-1, the panel's columns, inputs kb0..kb1 (y updated per group). */
static void tile_scalar(const int16_t *p, const float *sp, const int16_t *a, const float *d, int I, int G, int g,
                        int kb0, int kb1, int m0, int mr, float *y, int O, int c0, int nc) {
    for (int m = m0; m < m0 + mr; m++)
        for (int col = 0; col < nc; col++)
            for (int gi = kb0 / g; gi < kb1 / g; gi++) {
                int32_t acc = 0;
                for (int k = gi * g; k < (gi + 1) * g; k++)
                    acc += p[((size_t)(k - kb0) / 2 * NB + col) * 2 + (k & 1)] * a[(size_t)m * I + k];
                float *yo = y + (size_t)m * O + c0 + col;
                *yo = fmaf((float)acc, sp[(size_t)(gi - kb0 / g) * NB + col] * d[(size_t)m * G + gi], *yo);
            }
}

#ifdef GV_X86
static GV_AVX2 void prep16_avx2(const float *x, int I, int g, int16_t *a, float *d) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int gi = 0; gi < I / g; gi++) {
        const float *xg = x + (size_t)gi * g;
        __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int k = 0; k < g; k += 8) {
            const __m256 v = _mm256_loadu_ps(xg + k);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
            sum = _mm256_add_ps(sum, v);
        }
        float lanes[8], amax = 0.f, tot;
        _mm256_storeu_ps(lanes, mx);
        for (int i = 0; i < 8; i++) amax = fmaxf(amax, lanes[i]);
        _mm256_storeu_ps(lanes, sum);
        tot = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
        const __m256 vinv = _mm256_set1_ps(amax >= TINY ? QMAX16 / amax : 0.f);
        const __m256 vq = _mm256_set1_ps(QMAX16), vnq = _mm256_set1_ps(-QMAX16);
        for (int k = 0; k < g; k += 16) {
            __m256i q[2];
            for (int i = 0; i < 2; i++)
                q[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(xg + k + 8 * i), vinv), vnq), vq));
            _mm256_storeu_si256((__m256i *)(a + gi * g + k), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
        }
        d[gi] = isfinite(tot) ? (amax >= TINY ? amax / QMAX16 : 0.f) : NAN;
    }
}

/* Rows r[c] = 8 int32 of column c -> out[j] = element j of r[0..7] (an 8 x 8 transpose). */
GV_INLINE GV_AVX2 void transpose8x8_epi32(const __m256i *r, __m256i *out) {
    __m256i t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++) { /* rows 0-3, rows 4-7 */
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int j = 0; j < 4; j++) {
        out[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
        out[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
    }
}

/* fill_panel with AVX2, the same panel: per 8 columns and 64 inputs, 4 x 8 vectors of int16 pairs,
 * transposed so that each store is the 8 columns' pairs of one input pair. */
static GV_AVX2 void fill_panel_avx2(const wsrc_t *W, int c0, int nc, int kb0, int kb1, int16_t *p, float *sp) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int v = 0; v < NB / 8; v++) {
        if (8 * v >= nc) {
            for (int j = 0; j < (kb1 - kb0) / 2; j++) _mm256_storeu_si256((__m256i *)(p + (size_t)j * NB * 2) + v, _mm256_setzero_si256());
            continue;
        }
        for (int k = kb0; k < kb1; k += 64) {
            __m256i r[4][8], out[8];
            for (int c = 0; c < 8; c++) {
                const int o = c0 + 8 * v + c;
                if (W->kind == 8) {
                    const int8_t *q = W->q + (size_t)o * W->I + k;
                    for (int i = 0; i < 4; i++) r[i][c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * i)));
                    continue;
                }
                const uint8_t *row = W->base + (size_t)o * W->stride;
                const __m256i b = _mm256_loadu_si256((const __m256i *)(row + W->coff + (size_t)(k / 64) * 32));
                const __m256i z = _mm256_set1_epi8((char)row[W->zoff + k / W->g]);
                const __m256i lo = _mm256_sub_epi8(_mm256_and_si256(b, m4), z);
                const __m256i hi = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(b, 4), m4), z);
                r[0][c] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(lo));
                r[1][c] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(lo, 1));
                r[2][c] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(hi));
                r[3][c] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(hi, 1));
            }
            for (int i = 0; i < 4; i++) { /* input pairs (k - kb0)/2 + 8i + j */
                transpose8x8_epi32(r[i], out);
                for (int j = 0; j < 8; j++)
                    _mm256_storeu_si256((__m256i *)(p + ((size_t)(k - kb0) / 2 + 8 * i + j) * NB * 2) + v, out[j]);
            }
        }
    }
    for (int col = 0; col < NB; col++)
        for (int gi = kb0 / W->g; gi < kb1 / W->g; gi++)
            sp[(size_t)(gi - kb0 / W->g) * NB + col] = col < nc ? scale_at(W, c0 + col, gi) : 0.f;
}

/* The register tile: R rows (R <= MR) x 24 columns over one group (inputs k0 .. k0+g-1, panel-relative kp0). */
GV_INLINE GV_AVX2 void tile_avx2(const int16_t *p, const float *spg, const int16_t *a, const float *d, int I, int G,
                                 int gi, int g, int kp0, int m0, int R, float *y, int O, int c0, int nv) {
    __m256i acc[MR][3];
    for (int m = 0; m < R; m++) acc[m][0] = acc[m][1] = acc[m][2] = _mm256_setzero_si256();
    const int32_t *ar[MR];
    for (int m = 0; m < R; m++) ar[m] = (const int32_t *)(a + (size_t)(m0 + m) * I + (size_t)gi * g);
    const __m256i *pp = (const __m256i *)(p + (size_t)kp0 * NB * 2);
    for (int j = 0; j < g / 2; j++, pp += 3) {
        const __m256i w0 = _mm256_loadu_si256(pp), w1 = _mm256_loadu_si256(pp + 1), w2 = _mm256_loadu_si256(pp + 2);
        for (int m = 0; m < R; m++) {
            const __m256i b = _mm256_set1_epi32(ar[m][j]);
            acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, b));
            acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, b));
            acc[m][2] = _mm256_add_epi32(acc[m][2], _mm256_madd_epi16(w2, b));
        }
    }
    for (int m = 0; m < R; m++) {
        const __m256 dm = _mm256_set1_ps(d[(size_t)(m0 + m) * G + gi]);
        float *yr = y + (size_t)(m0 + m) * O + c0;
        for (int v = 0; v < 3; v++) {
            const __m256 sd = _mm256_mul_ps(_mm256_loadu_ps(spg + 8 * v), dm);
            if (v < nv) {
                _mm256_storeu_ps(yr + 8 * v, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][v]), sd, _mm256_loadu_ps(yr + 8 * v)));
            }
        }
    }
}

static GV_AVX2 void block_avx2(const int16_t *p, const float *sp, const int16_t *a, const float *d, int I, int G, int g,
                               int kb0, int kb1, int M, float *y, int O, int c0, int nc) {
    const int nv = nc / 8;
    for (int m0 = 0; m0 < M; m0 += MR) {
        const int R = M - m0 < MR ? M - m0 : MR;
        for (int gi = kb0 / g; gi < kb1 / g; gi++) {
            const float *spg = sp + (size_t)(gi - kb0 / g) * NB;
            const int kp0 = (gi * g - kb0) / 2;
            switch (R) { /* constant R: the loops over rows unroll */
            case 4: tile_avx2(p, spg, a, d, I, G, gi, g, kp0, m0, 4, y, O, c0, nv); break;
            case 3: tile_avx2(p, spg, a, d, I, G, gi, g, kp0, m0, 3, y, O, c0, nv); break;
            case 2: tile_avx2(p, spg, a, d, I, G, gi, g, kp0, m0, 2, y, O, c0, nv); break;
            default: tile_avx2(p, spg, a, d, I, G, gi, g, kp0, m0, 1, y, O, c0, nv); break;
            }
        }
    }
}
#endif

static int igemm(const wsrc_t *W, const float *x, int64_t ldx, int M, const float *bias, float *y, int nthreads) {
    const int I = W->I, O = W->O, g = W->g, G = W->G;
    const int KB = g >= GV_KB ? g : GV_KB / g * g;
    const int nblk = (O + NB - 1) / NB;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nblk) nthreads = nblk;
    const size_t nd = ((size_t)M * G + 15) / 16 * 16, per_thread = (size_t)KB * NB + 64; /* int16 panel + scales */
    float *mem = NULL;
    if (posix_memalign((void **)&mem, 64, (nd + (size_t)M * I / 2 + 16) * sizeof(float)
                                               + (size_t)nthreads * per_thread * 2 * sizeof(float)))
        return -2;
    float *d = mem;
    int16_t *a = (int16_t *)(mem + nd);
    char *scratch = (char *)(mem + nd + (size_t)M * I / 2 + 16);
    const int avx2 = gv8_isa() >= 2;
    (void)avx2;
    GV_OMP(omp parallel num_threads(nthreads))
    {
        GV_OMP(omp for schedule(static))
        for (int m = 0; m < M; m++) {
#ifdef GV_X86
            if (avx2) prep16_avx2(x + (size_t)m * ldx, I, g, a + (size_t)m * I, d + (size_t)m * G);
            else
#endif
                prep16_scalar(x + (size_t)m * ldx, I, g, a + (size_t)m * I, d + (size_t)m * G);
        }
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        int16_t *p = (int16_t *)(scratch + (size_t)tid * per_thread * 2 * sizeof(float));
        float *sp = (float *)(p + (size_t)KB * NB);
        GV_OMP(omp for schedule(dynamic, 1))
        for (int blk = 0; blk < nblk; blk++) {
            const int c0 = blk * NB, nc = O - c0 < NB ? O - c0 : NB;
            for (int m = 0; m < M; m++) memset(y + (size_t)m * O + c0, 0, (size_t)nc * sizeof(float));
            for (int kb0 = 0; kb0 < I; kb0 += KB) {
                const int kb1 = kb0 + KB < I ? kb0 + KB : I;
#ifdef GV_X86
                if (avx2) fill_panel_avx2(W, c0, nc, kb0, kb1, p, sp);
                else
#endif
                    fill_panel(W, c0, nc, kb0, kb1, p, sp);
#ifdef GV_X86
                if (avx2) block_avx2(p, sp, a, d, I, G, g, kb0, kb1, M, y, O, c0, nc);
                else
#endif
                    for (int m0 = 0; m0 < M; m0 += MR)
                        tile_scalar(p, sp, a, d, I, G, g, kb0, kb1, m0, M - m0 < MR ? M - m0 : MR, y, O, c0, nc);
            }
            if (bias)
                for (int m = 0; m < M; m++)
                    for (int col = 0; col < nc; col++) y[(size_t)m * O + c0 + col] += bias[c0 + col];
        }
    }
    free(mem);
    return 0;
}

/* INT4 layer in gv_int4.c's layout ({stride, zoff, coff} from gv_layout; ss = 2 or 4 scale bytes):
 * y[M, O] = x[M, I] @ W^T + bias (see the top of this file). Needs I % 64 == 0, g % 64 == 0, g <= 4096,
 * O % 8 == 0. Returns 0, -1 for bad arguments, -2 when out of memory. */
GV_API int gv_igemm4(const uint8_t *packed, int64_t stride, int64_t zoff, int64_t coff, int ss, int I, int O, int g,
                     const float *x, int64_t ldx, int M, const float *bias, float *y, int nthreads) {
    if (M <= 0 || O <= 0 || O % 8 || I <= 0 || I % 64 || g <= 0 || g % 64 || g > 4096 || I % g || ldx < I ||
        (ss != 2 && ss != 4))
        return -1;
    const wsrc_t W = {4, packed, stride, zoff, coff, ss, NULL, NULL, I, O, g, I / g};
    return igemm(&W, x, ldx, M, bias, y, nthreads);
}

/* INT8 layer: codes q [O, I], fp32 scales s [O, I/g]; the same product. Needs I % 64 == 0, g % 64 == 0,
 * g <= 256 (int32 sums), O % 8 == 0. Returns 0, -1 or -2 as gv_igemm4. */
GV_API int gv_igemm8(const int8_t *q, const float *s, int I, int O, int g, const float *x, int64_t ldx, int M,
                     const float *bias, float *y, int nthreads) {
    if (M <= 0 || O <= 0 || O % 8 || I <= 0 || I % 64 || g <= 0 || g % 64 || g > 256 || I % g || ldx < I) return -1;
    const wsrc_t W = {8, NULL, 0, 0, 0, 0, q, s, I, O, g, I / g};
    return igemm(&W, x, ldx, M, bias, y, nthreads);
}
