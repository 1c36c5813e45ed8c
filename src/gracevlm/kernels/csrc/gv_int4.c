/* Native INT4 kernels for gracevlm on CPU: repack, small-M matmul, dequantize.
 *
 * Plain C with GCC/Clang builtins; no Python or PyTorch headers. gracevlm/kernels/native.py calls
 * these functions through ctypes on raw tensor pointers. All matrices are row-major.
 *
 * Repacked layout: one record of `stride` bytes per output row o (rows back to back).
 *   [0, G*ss)          scales s[o, 0..G): fp32 (ss=4) or fp16 bits (ss=2), the stored values unchanged
 *   [zoff, zoff+G)     zero points z[o, 0..G) as uint8 (0..15)
 *   [coff, coff+I/2)   codes: per chunk c (inputs k = 64c .. 64c+63) 32 bytes; byte j holds
 *                      u[o, 64c+j] in its low nibble and u[o, 64c+32+j] in its high nibble
 * coff and stride are multiples of 64 (a row's codes start on a cache line). Requires I % 64 == 0 and g == 32 or g % 64 == 0 (g <= 4096).
 * Weights: W[o, k] = (u[o, k] - z[o, k/g]) * s[o, k/g], exactly as the AWQ tensors define them.
 *
 * Modes of the small-M matmul (gv_matmul). All keep the weights exact and factor the group scale out
 * of the inner loop: y = sum_g s_g * (sum_{k in g} u_k x_k - z_g * sum_{k in g} x_k). In every mode (on
 * a given code path, AVX2 or scalar) an output row is computed by the same operations whatever M, the
 * row's place among them and the thread count: y[m] is bitwise the result for x[m] alone.
 *   GV_MODE_F32   fp32 activations, fp32 FMA accumulation.
 *   GV_MODE_I8X2  each activation group is rounded to 16-bit fixed point, q = round(x / d) with
 *                 d = max|x| / 32639, written as two int8 digits q = 256*q1 + q0; the integer dot
 *                 products sum u*q_j run on vpmaddubsw (32 multiply-adds per instruction). The one error
 *                 is that rounding, |x - d*q| <= d/2 (about 2e-5 relative on outputs).
 *   GV_MODE_I8X3  the same with 24-bit fixed point (three digits, d = max|x| / 8355711): the rounding
 *                 is at the level of fp32 itself; outputs agree with the fp32 reference to ~1e-6.
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

/* Software prefetch distance in bytes of packed weights (measured on the 2-core development VM, M=1,
 * weights out of cache: 4 KiB ahead takes the AVX-512 kernel from ~9 to ~15 GB/s; the hardware
 * prefetchers alone keep too few lines in flight). Rows are back to back, so it runs into the next rows. */
#ifndef GV_PF
#define GV_PF 4096
#endif

enum { GV_MODE_F32 = 0, GV_MODE_I8X2 = 2, GV_MODE_I8X3 = 3 };
#define MAX_PLANES 3
#define MT_MAX 4     /* activation rows handled per pass over a weight row (the row stays in L1) */
#define MT_F32 2     /* the same for the fp32 kernel (its accumulators fill the registers) */
#define K_BLOCK 2048 /* inputs per pass for tiles of 2+ rows: 2 fp32 or 4 int8x3 rows of it are <= 24 KB */
#define ROWS_MAX 64  /* output rows per scheduling task */
#define SCRATCH_FLOATS(G) ((size_t)(2 + MT_MAX) * (G) + (size_t)ROWS_MAX * MT_MAX * 32 + 16)

/* Integer modes: a group whose max |x| is below TINY is taken as zero (qmax / max|x| would overflow);
 * a group holding inf or NaN gets step NaN, so the outputs it touches are NaN as in fp32. */
#define TINY 1e-30f

/* Largest q for n balanced base-256 digits with the top digit in [-127, 127] and the others in
 * [-128, 127]: 127*256 + 127 and 127*65536 + 127*256 + 127. */
static float qmax(int planes) { return planes == 2 ? 32639.f : 8355711.f; }

/* ------------------------------------------------------------------------------------------ */
/* Runtime dispatch                                                                            */

static int g_isa = -1; /* 3: AVX-512 F/BW/VL/VNNI on top of 2, 2: AVX2+FMA+F16C, 0: scalar */

#ifdef GV_X86
/* XCR0 bits the OS must enable: SSE+AVX state (0x6), and for AVX-512 also opmask and ZMM (0xE0). */
static unsigned long long xcr0(void) {
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((unsigned long long)hi << 32) | lo;
}
#endif

static int detect_isa(void) {
#ifdef GV_X86
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & bit_F16C) || !(c & bit_OSXSAVE)) return 0;
    const unsigned long long x = xcr0();
    if ((x & 0x6) != 0x6) return 0;
#ifndef GV_NO_AVX512
    if ((x & 0xE6) == 0xE6 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 3;
#endif
    return 2;
#else
    return 0;
#endif
}

static int isa(void) {
    if (g_isa < 0) g_isa = detect_isa();
    return g_isa;
}

/* The code path in use: 3 = AVX-512 VNNI, 2 = AVX2/FMA/F16C, 0 = portable scalar. */
GV_API int gv_isa(void) { return isa(); }

/* Use code path `level` (0, 2 or 3) if this CPU has it, else the best it has; level < 0: detect. For
 * tests and benchmarks. Returns the path now in use. */
GV_API int gv_set_isa(int level) {
    const int best = detect_isa();
    g_isa = level < 0 || level > best ? best : level >= 3 ? 3 : level >= 2 ? 2 : 0;
    return g_isa;
}

static int g_multi_row = 2;

/* The AVX-512 path's M = 1 loop: 2 (default) four rows from the four quarters of a task (rows_512_m1), 1 two or four
 * adjacent rows, 0 one row at a time; all give the same bits. Returns the previous setting, changing nothing for
 * other values. For tests and A/B timing. */
GV_API int gv_set_multi_row(int on) {
    const int prev = g_multi_row;
    if (on >= 0 && on <= 2) g_multi_row = on;
    return prev;
}

GV_API const char *gv_source_hash(void) { return GV_SOURCE_HASH; }

GV_API int gv_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------ */
/* Layout                                                                                      */

typedef struct {
    const uint8_t *base;
    int64_t stride, zoff, coff;
    int I, O, g, G, ss;
} layout_t;

static layout_t make_layout(const uint8_t *base, int I, int O, int g, int ss) {
    layout_t L;
    L.base = base; L.I = I; L.O = O; L.g = g; L.G = I / g; L.ss = ss;
    L.zoff = (int64_t)L.G * ss;
    L.coff = (L.zoff + L.G + 63) / 64 * 64;
    L.stride = L.coff + I / 2;
    return L;
}

/* Writes {stride, zoff, coff} in bytes for in_features I, group size g, scale size ss; 0 or -1.
 * Supported: I % 64 == 0, g == 32 or g % 64 == 0, g <= 4096 (int32 sums of a group cannot overflow). */
GV_API int gv_layout(int I, int g, int ss, int64_t *out3) {
    if (I <= 0 || I % 64 || !(g == 32 || (g > 0 && g % 64 == 0)) || I % g || g > 4096 || (ss != 2 && ss != 4))
        return -1;
    layout_t L = make_layout(NULL, I, 0, g, ss);
    out3[0] = L.stride; out3[1] = L.zoff; out3[2] = L.coff;
    return 0;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* r + sum_{k0 <= k < k1} float(w[k]) * x[k], one product at a time; w holds fp16 (bf16 = 0) or bf16 bits. */
static float half_dot(const uint16_t *w, const float *x, int k0, int k1, int bf16, float r) {
    for (int k = k0; k < k1; k++) {
        const uint32_t bits = (uint32_t)w[k] << 16;
        float v;
        if (bf16) memcpy(&v, &bits, 4);
        else v = half_to_float(w[k]);
        r += v * x[k];
    }
    return r;
}

/* Row header -> s[G] and zs[G] = z * s (exact for fp16 scales: a 4-bit integer times an 11-bit
 * significand fits fp32). */
static void header_scalar(const layout_t *L, const uint8_t *row, float *s, float *zs) {
    const uint8_t *z = row + L->zoff;
    for (int i = 0; i < L->G; i++) {
        float v;
        if (L->ss == 2) {
            uint16_t h;
            memcpy(&h, row + 2 * (size_t)i, 2);
            v = half_to_float(h);
        } else {
            memcpy(&v, row + 4 * (size_t)i, 4);
        }
        s[i] = v;
        zs[i] = (float)z[i] * v;
    }
}

/* t[j] = the bytes j of e[0], e[1], e[2], e[3] (in that order, little endian). */
static inline void transpose4x4_bytes(const uint32_t *e, uint32_t *t) {
    const uint32_t lo01 = (e[0] & 0x00FF00FFu) | (e[1] & 0x00FF00FFu) << 8; /* e0[0] e1[0] e0[2] e1[2] */
    const uint32_t hi01 = (e[0] >> 8 & 0x00FF00FFu) | (e[1] & 0xFF00FF00u);  /* e0[1] e1[1] e0[3] e1[3] */
    const uint32_t lo23 = (e[2] & 0x00FF00FFu) | (e[3] & 0x00FF00FFu) << 8;
    const uint32_t hi23 = (e[2] >> 8 & 0x00FF00FFu) | (e[3] & 0xFF00FF00u);
    t[0] = (lo01 & 0xFFFFu) | lo23 << 16;
    t[1] = (hi01 & 0xFFFFu) | hi23 << 16;
    t[2] = lo01 >> 16 | (lo23 & 0xFFFF0000u);
    t[3] = hi01 >> 16 | (hi23 & 0xFFFF0000u);
}

/* qweight words (8 outputs each) per repack task: 4 lines of a qweight row per fetch; the task's 512 output
 * rows x 64 bytes of codes being written stay in L1/L2. */
#ifndef RP_WORDS
#define RP_WORDS 64
#endif

#ifdef GV_X86
GV_INLINE GV_AVX2 void transpose4x4_bytes_avx2(const __m256i *e, __m256i *t) {
    const __m256i m00ff = _mm256_set1_epi32(0x00FF00FF), mff00 = _mm256_set1_epi32((int)0xFF00FF00u);
    const __m256i mlo = _mm256_set1_epi32(0xFFFF), mhi = _mm256_set1_epi32((int)0xFFFF0000u);
    const __m256i lo01 = _mm256_or_si256(_mm256_and_si256(e[0], m00ff), _mm256_slli_epi32(_mm256_and_si256(e[1], m00ff), 8));
    const __m256i hi01 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(e[0], 8), m00ff), _mm256_and_si256(e[1], mff00));
    const __m256i lo23 = _mm256_or_si256(_mm256_and_si256(e[2], m00ff), _mm256_slli_epi32(_mm256_and_si256(e[3], m00ff), 8));
    const __m256i hi23 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(e[2], 8), m00ff), _mm256_and_si256(e[3], mff00));
    t[0] = _mm256_or_si256(_mm256_and_si256(lo01, mlo), _mm256_slli_epi32(lo23, 16));
    t[1] = _mm256_or_si256(_mm256_and_si256(hi01, mlo), _mm256_slli_epi32(hi23, 16));
    t[2] = _mm256_or_si256(_mm256_srli_epi32(lo01, 16), _mm256_and_si256(lo23, mhi));
    t[3] = _mm256_or_si256(_mm256_srli_epi32(hi01, 16), _mm256_and_si256(hi23, mhi));
}

/* The inner step of gv_repack for 8 words c .. c+7 at a time (same bytes as the scalar loop); returns the
 * first word it left for the scalar loop. dst: the codes byte of inputs k..k+3 in output row 0. */
static GV_AVX2 int repack_quad_avx2(const uint32_t *ra, const uint32_t *rb, int ncol, int c0, int c1,
                                    uint8_t *dst, int64_t stride) {
    static const int even_col[4] = {0, 4, 1, 5}, odd_col[4] = {2, 6, 3, 7};
    const __m256i m0f = _mm256_set1_epi32(0x0F0F0F0F), mf0 = _mm256_set1_epi32((int)0xF0F0F0F0u);
    int c = c0;
    for (; c + 8 <= c1; c += 8) {
        __m256i even[4], odd[4], te[4], to[4];
        for (int i = 0; i < 4; i++) {
            const __m256i a = _mm256_loadu_si256((const __m256i *)(ra + (size_t)i * ncol + c));
            const __m256i b = _mm256_loadu_si256((const __m256i *)(rb + (size_t)i * ncol + c));
            even[i] = _mm256_or_si256(_mm256_and_si256(a, m0f), _mm256_slli_epi32(_mm256_and_si256(b, m0f), 4));
            odd[i] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(a, 4), m0f), _mm256_and_si256(b, mf0));
        }
        transpose4x4_bytes_avx2(even, te);
        transpose4x4_bytes_avx2(odd, to);
        uint32_t lanes[8][8]; /* [j or 4 + j][word] */
        for (int j = 0; j < 4; j++) {
            _mm256_storeu_si256((__m256i *)lanes[j], te[j]);
            _mm256_storeu_si256((__m256i *)lanes[4 + j], to[j]);
        }
        for (int l = 0; l < 8; l++) {
            uint8_t *rows = dst + (size_t)8 * (c + l) * stride;
            for (int j = 0; j < 4; j++) {
                memcpy(rows + (size_t)even_col[j] * stride, &lanes[j][l], 4);
                memcpy(rows + (size_t)odd_col[j] * stride, &lanes[4 + j][l], 4);
            }
        }
    }
    return c;
}
#endif

/* Repack AWQ GEMM tensors into the layout above.
 * qweight int32 [I, O/8], qzeros int32 [I/g, O/8], scales [I/g, O] (fp16 bits if ss == 2, fp32 if 4);
 * out: O * stride bytes. Returns 0, or -1 for an unsupported shape. */
GV_API int gv_repack(const int32_t *qweight, const int32_t *qzeros, const void *scales,
                     int I, int O, int g, int ss, uint8_t *out, int nthreads) {
    int64_t info[3];
    if (O <= 0 || O % 8 || gv_layout(I, g, ss, info)) return -1;
    const layout_t L = make_layout(out, I, O, g, ss);
    const int ncol = O / 8, nblk = (ncol + RP_WORDS - 1) / RP_WORDS;
    /* AWQ stores the outputs 8c + {0, 2, 4, 6, 1, 3, 5, 7} in nibbles 0..7 of word c. For inputs k and k+32
     * (the low and high nibble of one code byte), with a = qweight[k, c] and b = qweight[k + 32, c]:
     *   even = (a & 0x0F0F0F0F) | (b & 0x0F0F0F0F) << 4   holds the bytes of nibbles 0, 2, 4, 6,
     *   odd  = (a >> 4 & 0x0F0F0F0F) | (b & 0xF0F0F0F0)   those of nibbles 1, 3, 5, 7;
     * byte j of even belongs to output 8c + {0, 4, 1, 5}[j], byte j of odd to 8c + {2, 6, 3, 7}[j]. */
    static const int even_col[4] = {0, 4, 1, 5}, odd_col[4] = {2, 6, 3, 7};
    const int avx2 = isa() >= 2;
    (void)nthreads;
    (void)avx2;
GV_OMP(omp parallel for schedule(dynamic, 1) num_threads(nthreads))
    for (int blk = 0; blk < nblk; blk++) {
        const int c0 = blk * RP_WORDS, c1 = c0 + RP_WORDS < ncol ? c0 + RP_WORDS : ncol;
        for (int kc = 0; kc < I / 64; kc++)
            for (int k = 64 * kc; k < 64 * kc + 32; k += 4) { /* 4 inputs: one 32-bit store per output row */
                const size_t byte = (size_t)L.coff + (size_t)kc * 32 + (k - 64 * kc);
                const uint32_t *ra = (const uint32_t *)qweight + (size_t)k * ncol, *rb = ra + (size_t)32 * ncol;
                int c = c0;
#ifdef GV_X86
                if (avx2) c = repack_quad_avx2(ra, rb, ncol, c0, c1, out + byte, L.stride);
#endif
                for (; c < c1; c++) {
                    uint32_t even[4], odd[4];
                    for (int i = 0; i < 4; i++) {
                        const uint32_t a = ra[(size_t)i * ncol + c], b = rb[(size_t)i * ncol + c];
                        even[i] = (a & 0x0F0F0F0Fu) | (b & 0x0F0F0F0Fu) << 4;
                        odd[i] = (a >> 4 & 0x0F0F0F0Fu) | (b & 0xF0F0F0F0u);
                    }
                    uint32_t te[4], to[4];
                    transpose4x4_bytes(even, te); /* te[j]: byte j of even[0..3], the 4 inputs of one row */
                    transpose4x4_bytes(odd, to);
                    uint8_t *rows = out + (size_t)8 * c * L.stride + byte;
                    for (int j = 0; j < 4; j++) {
                        memcpy(rows + (size_t)even_col[j] * L.stride, &te[j], 4);
                        memcpy(rows + (size_t)odd_col[j] * L.stride, &to[j], 4);
                    }
                }
            }
        for (int gi = 0; gi < L.G; gi++)
            for (int c = c0; c < c1; c++) {
                const uint32_t zw = (uint32_t)qzeros[(size_t)gi * ncol + c];
                for (int n = 0; n < 8; n++) {
                    const int o = 8 * c + (n < 4 ? 2 * n : 2 * (n - 4) + 1); /* nibble n -> column offset */
                    uint8_t *row = out + (size_t)o * L.stride;
                    row[L.zoff + gi] = (uint8_t)((zw >> (4 * n)) & 0xF);
                    memcpy(row + (size_t)gi * ss, (const uint8_t *)scales + ((size_t)gi * O + o) * ss, ss);
                }
            }
        for (int c = c0; c < c1; c++) /* padding between the zero points and the codes */
            for (int n = 0; n < 8; n++)
                memset(out + (size_t)(8 * c + n) * L.stride + L.zoff + L.G, 0, (size_t)(L.coff - L.zoff - L.G));
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Activations                                                                                 */

/* Prepared activations. f32 mode: xsum[m, g] = sum of x over group g. Integer modes with P digit
 * planes: q[m, c, j, 0..63] (int8) holds digit j of the inputs of chunk c, so that one pointer per row
 * m reaches every plane at a constant offset; q = sum_j 256^j digit_j; step d[m, g]; xsum = d * sum(q). */
typedef struct {
    const float *x; /* [M, ldx] */
    int64_t ldx;
    int M, mode;
    int8_t *q;       /* [M, I/64, P, 64], or with blk128 [M, I/128, P, 128] */
    float *d, *xsum; /* [M, G] */
    int blk128;      /* the AVX-512 order: see digit_at */
} acts_t;

/* Where digit j of input k of row m lives. Any 32 inputs k..k+31 (k % 32 == 0) are 32 bytes in a row.
 * blk128 (AVX-512 path, g % 128 == 0): per 128-input block and plane, 128 bytes in the order of the two
 * nibble vectors of the block's 64 code bytes: low nibbles = inputs 0..31, 64..95; high = 32..63, 96..127. */
static int8_t *digit_at(const layout_t *L, const acts_t *A, int m, int k, int j) {
    const int P = A->mode;
    int8_t *row = A->q + (size_t)m * L->I * P;
    if (A->blk128) {
        const int r = k % 128, hi = (r / 32) & 1, pos = r % 32 + (r >= 64 ? 32 : 0);
        return row + (size_t)(k / 128) * 128 * P + j * 128 + hi * 64 + pos;
    }
    return row + (size_t)(k / 64) * 64 * P + j * 64 + k % 64;
}

static void prep_row_scalar(const layout_t *L, const acts_t *A, int m) {
    const float *x = A->x + (size_t)m * A->ldx;
    const int g = L->g, P = A->mode;
    for (int gi = 0; gi < L->G; gi++) {
        const float *xg = x + (size_t)gi * g;
        const size_t gm = (size_t)m * L->G + gi;
        if (A->mode == GV_MODE_F32) {
            float sum = 0.f;
            for (int k = 0; k < g; k++) sum += xg[k];
            A->xsum[gm] = sum;
            continue;
        }
        const float qm = qmax(P);
        float amax = 0.f, sum = 0.f;
        for (int k = 0; k < g; k++) {
            amax = fmaxf(amax, fabsf(xg[k]));
            sum += xg[k];
        }
        const float inv = amax >= TINY ? qm / amax : 0.f;
        int64_t qsum = 0;
        for (int k = 0; k < g; k++) {
            int32_t q = (int32_t)nearbyintf(fminf(fmaxf(xg[k] * inv, -qm), qm));
            qsum += q;
            for (int j = 0; j < P; j++) { /* balanced base-256 digits, the top one takes the rest */
                const int32_t digit = j == P - 1 ? q : ((q + 128) & 255) - 128;
                *digit_at(L, A, m, gi * g + k, j) = (int8_t)digit;
                q = (q - digit) >> 8;
            }
        }
        A->d[gm] = isfinite(sum) ? (amax >= TINY ? amax / qm : 0.f) : NAN;
        A->xsum[gm] = (float)((double)A->d[gm] * (double)qsum);
    }
}

#ifdef GV_X86
GV_INLINE GV_AVX2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

GV_INLINE GV_AVX2 int64_t hsum8i(__m256i v) {
    __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                 _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
    __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}

/* 32 int32 (4 vectors, values in int8 range) -> 32 int8 in order. */
GV_INLINE GV_AVX2 __m256i pack32_i8(const __m256i *v) {
    __m256i ab = _mm256_packs_epi32(v[0], v[1]), cd = _mm256_packs_epi32(v[2], v[3]);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

static GV_AVX2 void prep_row_avx2(const layout_t *L, const acts_t *A, int m) {
    const float *x = A->x + (size_t)m * A->ldx;
    const int g = L->g, P = A->mode;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int gi = 0; gi < L->G; gi++) {
        const float *xg = x + (size_t)gi * g;
        const size_t gm = (size_t)m * L->G + gi;
        if (A->mode == GV_MODE_F32) {
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
            for (int k = 0; k < g; k += 16) {
                s0 = _mm256_add_ps(s0, _mm256_loadu_ps(xg + k));
                s1 = _mm256_add_ps(s1, _mm256_loadu_ps(xg + k + 8));
            }
            A->xsum[gm] = hsum8(_mm256_add_ps(s0, s1));
            continue;
        }
        __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int k = 0; k < g; k += 8) {
            const __m256 v = _mm256_loadu_ps(xg + k);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v, absmask));
            sum = _mm256_add_ps(sum, v);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4), qm = qmax(P);
        const __m256 vinv = _mm256_set1_ps(amax >= TINY ? qm / amax : 0.f), vq = _mm256_set1_ps(qm);
        const __m256 vnq = _mm256_set1_ps(-qm);
        const __m256i c128 = _mm256_set1_epi32(128), c255 = _mm256_set1_epi32(255);
        __m256i qs = _mm256_setzero_si256();
        for (int k = 0; k < g; k += 32) {
            __m256i digit[MAX_PLANES][4];
            for (int i = 0; i < 4; i++) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xg + k + 8 * i), vinv);
                __m256i q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, vnq), vq));
                qs = _mm256_add_epi32(qs, q);
                for (int j = 0; j < P; j++) {
                    digit[j][i] = j == P - 1 ? q
                                  : _mm256_sub_epi32(_mm256_and_si256(_mm256_add_epi32(q, c128), c255), c128);
                    q = _mm256_srai_epi32(_mm256_sub_epi32(q, digit[j][i]), 8);
                }
            }
            for (int j = 0; j < P; j++)
                _mm256_storeu_si256((__m256i *)digit_at(L, A, m, gi * g + k, j), pack32_i8(digit[j]));
        }
        A->d[gm] = isfinite(hsum8(sum)) ? (amax >= TINY ? amax / qm : 0.f) : NAN;
        A->xsum[gm] = (float)((double)A->d[gm] * (double)hsum8i(qs));
    }
}

/* header_scalar for groups g0 .. g0+n-1 of the row: s[0..n), zs[0..n). */
static GV_AVX2 void header_avx2(const layout_t *L, const uint8_t *row, int g0, int n, float *s, float *zs) {
    const uint8_t *sp = row + (size_t)g0 * L->ss, *z = row + L->zoff + g0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = L->ss == 2 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sp + 2 * (size_t)i)))
                              : _mm256_loadu_ps((const float *)(sp + 4 * (size_t)i));
        __m256 zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z + i))));
        _mm256_storeu_ps(s + i, v);
        _mm256_storeu_ps(zs + i, _mm256_mul_ps(zf, v));
    }
    for (; i < n; i++) {
        float v;
        if (L->ss == 2) {
            uint16_t h;
            memcpy(&h, sp + 2 * (size_t)i, 2);
            v = _cvtsh_ss(h);
        } else {
            memcpy(&v, sp + 4 * (size_t)i, 4);
        }
        s[i] = v;
        zs[i] = (float)z[i] * v;
    }
}

GV_INLINE GV_AVX2 float dot_avx2(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float r = hsum8(acc);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

GV_INLINE GV_AVX2 void mul_avx2(const float *a, const float *b, float *out, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    for (; i < n; i++) out[i] = a[i] * b[i];
}

/* ---- f32 mode: out[m] = sum_g s_g * sum_{k in g} u_k x_mk (the zero term is added by the caller) */

/* One chunk (64 inputs) into the accumulator pairs acc[2*(m*NP + p)] (low half) and [.. + 1] (high). */
GV_INLINE GV_AVX2 void f32_chunk(const uint8_t *p, const float *const *x, size_t off, int MT, int NP, __m256 *acc) {
    const __m256i m4 = _mm256_set1_epi32(0xF);
    _mm_prefetch((const char *)(p + GV_PF), _MM_HINT_T0);
    for (int q = 0; q < 4; q++) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * q)));
        __m256 flo = _mm256_cvtepi32_ps(_mm256_and_si256(b, m4));
        __m256 fhi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        for (int m = 0; m < MT; m++) {
            const float *xm = x[m] + off + 8 * q;
            __m256 *a = acc + 2 * (m * NP + q % NP);
            a[0] = _mm256_fmadd_ps(flo, _mm256_loadu_ps(xm), a[0]);
            a[1] = _mm256_fmadd_ps(fhi, _mm256_loadu_ps(xm + 32), a[1]);
        }
    }
}

/* Every row gets the same NP = 2 accumulator pairs whatever MT is (1 or 2), so a row's result does not
 * depend on the rows it is tiled with. */
GV_INLINE GV_AVX2 void tile_f32_avx2(const uint8_t *codes, int nchunk, int g, const float *s,
                                     const float *const *x, int MT, float *state) {
    const int NP = 2, na = 2 * MT * NP;
    __m256 tot[MT_F32], acc[2 * MT_F32 * 2];
    for (int m = 0; m < MT; m++) tot[m] = _mm256_loadu_ps(state + 8 * m);
    if (g == 32) { /* the low half of chunk c is group 2c, the high half group 2c+1 */
        for (int c = 0; c < nchunk; c++) {
            for (int i = 0; i < na; i++) acc[i] = _mm256_setzero_ps();
            f32_chunk(codes + 32 * (size_t)c, x, 64 * (size_t)c, MT, NP, acc);
            const __m256 s0 = _mm256_set1_ps(s[2 * c]), s1 = _mm256_set1_ps(s[2 * c + 1]);
            for (int m = 0; m < MT; m++) {
                __m256 a0 = acc[2 * m * NP], a1 = acc[2 * m * NP + 1];
                for (int j = 1; j < NP; j++) {
                    a0 = _mm256_add_ps(a0, acc[2 * (m * NP + j)]);
                    a1 = _mm256_add_ps(a1, acc[2 * (m * NP + j) + 1]);
                }
                tot[m] = _mm256_fmadd_ps(a1, s1, _mm256_fmadd_ps(a0, s0, tot[m]));
            }
        }
    } else {
        const int cpg = g / 64, G = nchunk / cpg;
        for (int gi = 0, c = 0; gi < G; gi++) {
            for (int i = 0; i < na; i++) acc[i] = _mm256_setzero_ps();
            for (int e = c + cpg; c < e; c++) f32_chunk(codes + 32 * (size_t)c, x, 64 * (size_t)c, MT, NP, acc);
            const __m256 sg = _mm256_set1_ps(s[gi]);
            for (int m = 0; m < MT; m++) {
                __m256 a = _mm256_add_ps(acc[2 * m * NP], acc[2 * m * NP + 1]);
                for (int j = 1; j < NP; j++)
                    a = _mm256_add_ps(a, _mm256_add_ps(acc[2 * (m * NP + j)], acc[2 * (m * NP + j) + 1]));
                tot[m] = _mm256_fmadd_ps(a, sg, tot[m]);
            }
        }
    }
    for (int m = 0; m < MT; m++) _mm256_storeu_ps(state + 8 * m, tot[m]);
}

/* ---- integer modes: out[m] = sum_g (s_g d_mg) * sum_{k in g} u_k q_mk */

/* p[j] += u . (32 bytes of digit plane j at q + j*64) in int16 lanes. One vpmaddubsw lane is at most
 * 2*15*128 = 3840 in magnitude, so up to 8 of them can be summed without saturation. */
GV_INLINE GV_AVX2 void dig_dot(__m256i u, const int8_t *q, int P, __m256i *p) {
    for (int j = 0; j < P; j++)
        p[j] = _mm256_add_epi16(p[j], _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(q + 64 * j))));
}

/* int16 digit sums -> int32: a += 256*p[P-1] + p[P-2]; with three digits also b += p[0] (its relative
 * weight 1/256 is applied in float, as 65536*sum(u*q2) could overflow int32). */
GV_INLINE GV_AVX2 void dig_flush(const __m256i *p, int P, __m256i *a, __m256i *b) {
    const __m256i c256 = _mm256_set1_epi16(256), c1 = _mm256_set1_epi16(1);
    *a = _mm256_add_epi32(*a, _mm256_add_epi32(_mm256_madd_epi16(p[P - 1], c256), _mm256_madd_epi16(p[P - 2], c1)));
    if (P == 3) *b = _mm256_add_epi32(*b, _mm256_madd_epi16(p[0], c1));
}

GV_INLINE GV_AVX2 __m256 dig_scale(__m256i a, __m256i b, const float *sd, int P, __m256 tot) {
    __m256 v = _mm256_cvtepi32_ps(a);
    if (P == 3) v = _mm256_fmadd_ps(v, _mm256_set1_ps(256.f), _mm256_cvtepi32_ps(b));
    return _mm256_fmadd_ps(v, _mm256_broadcast_ss(sd), tot);
}

#define ZERO_PLANES(p) do { p[0] = p[1] = p[2] = _mm256_setzero_si256(); } while (0)

/* xq[m]: the digit planes of activation row m; sd[m][g] = s_g * d_mg. */
GV_INLINE GV_AVX2 void tile_int_avx2(const uint8_t *codes, int nchunk, int g, const int8_t *const *xq,
                                     const float *const *sd, int MT, int P, float *state) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const size_t cs = 64 * (size_t)P; /* bytes of one chunk in a row's digit planes */
    __m256 tot[MT_MAX];
    for (int m = 0; m < MT; m++) tot[m] = _mm256_loadu_ps(state + 8 * m);
    if (g == 32) { /* the low half of chunk c is group 2c, the high half group 2c+1 */
        for (int c = 0; c < nchunk; c++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(codes + 32 * (size_t)c));
            _mm_prefetch((const char *)(codes + 32 * (size_t)c + GV_PF), _MM_HINT_T0);
            const __m256i u0 = _mm256_and_si256(w, m4), u1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
            for (int m = 0; m < MT; m++) {
                const int8_t *q = xq[m] + c * cs;
                __m256i p[MAX_PLANES], a = _mm256_setzero_si256(), b = a;
                ZERO_PLANES(p);
                dig_dot(u0, q, P, p);
                dig_flush(p, P, &a, &b);
                tot[m] = dig_scale(a, b, sd[m] + 2 * c, P, tot[m]);
                ZERO_PLANES(p);
                a = b = _mm256_setzero_si256();
                dig_dot(u1, q + 32, P, p);
                dig_flush(p, P, &a, &b);
                tot[m] = dig_scale(a, b, sd[m] + 2 * c + 1, P, tot[m]);
            }
        }
    } else if (g == 64) { /* chunk c is group c */
        for (int c = 0; c < nchunk; c++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(codes + 32 * (size_t)c));
            _mm_prefetch((const char *)(codes + 32 * (size_t)c + GV_PF), _MM_HINT_T0);
            const __m256i u0 = _mm256_and_si256(w, m4), u1 = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
            for (int m = 0; m < MT; m++) {
                const int8_t *q = xq[m] + c * cs;
                __m256i p[MAX_PLANES], a = _mm256_setzero_si256(), b = a;
                ZERO_PLANES(p);
                dig_dot(u0, q, P, p);
                dig_dot(u1, q + 32, P, p);
                dig_flush(p, P, &a, &b);
                tot[m] = dig_scale(a, b, sd[m] + c, P, tot[m]);
            }
        }
    } else if (g == 128) { /* chunks 2gi, 2gi+1 are group gi: one int16 flush per group */
        for (int gi = 0; gi < nchunk / 2; gi++) {
            const int c = 2 * gi;
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(codes + 32 * (size_t)c));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(codes + 32 * (size_t)c + 32));
            _mm_prefetch((const char *)(codes + 32 * (size_t)c + GV_PF), _MM_HINT_T0);
            const __m256i u0 = _mm256_and_si256(w0, m4), u1 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), m4);
            const __m256i u2 = _mm256_and_si256(w1, m4), u3 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), m4);
            for (int m = 0; m < MT; m++) {
                const int8_t *q = xq[m] + c * cs;
                __m256i p[MAX_PLANES], a = _mm256_setzero_si256(), b = a;
                ZERO_PLANES(p);
                dig_dot(u0, q, P, p);
                dig_dot(u1, q + 32, P, p);
                dig_dot(u2, q + cs, P, p);
                dig_dot(u3, q + cs + 32, P, p);
                dig_flush(p, P, &a, &b);
                tot[m] = dig_scale(a, b, sd[m] + gi, P, tot[m]);
            }
        }
    } else { /* g = 64 * cpg, cpg >= 3: flush int16 sums every two chunks (and after an odd last one) */
        const int cpg = g / 64, G = nchunk / cpg;
        for (int gi = 0; gi < G; gi++) {
            __m256i a[MT_MAX], b[MT_MAX];
            for (int m = 0; m < MT; m++) a[m] = b[m] = _mm256_setzero_si256();
            for (int c = gi * cpg, e = c + cpg; c < e; c += 2) {
                const int two = c + 1 < e;
                const __m256i w0 = _mm256_loadu_si256((const __m256i *)(codes + 32 * (size_t)c));
                _mm_prefetch((const char *)(codes + 32 * (size_t)c + GV_PF), _MM_HINT_T0);
                const __m256i w1 = two ? _mm256_loadu_si256((const __m256i *)(codes + 32 * (size_t)c + 32))
                                       : _mm256_setzero_si256();
                const __m256i u0 = _mm256_and_si256(w0, m4), u1 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), m4);
                const __m256i u2 = _mm256_and_si256(w1, m4), u3 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), m4);
                for (int m = 0; m < MT; m++) {
                    const int8_t *q = xq[m] + c * cs;
                    __m256i p[MAX_PLANES];
                    ZERO_PLANES(p);
                    dig_dot(u0, q, P, p);
                    dig_dot(u1, q + 32, P, p);
                    if (two) {
                        dig_dot(u2, q + cs, P, p);
                        dig_dot(u3, q + cs + 32, P, p);
                    }
                    dig_flush(p, P, &a[m], &b[m]);
                }
            }
            for (int m = 0; m < MT; m++) tot[m] = dig_scale(a[m], b[m], sd[m] + gi, P, tot[m]);
        }
    }
    for (int m = 0; m < MT; m++) _mm256_storeu_ps(state + 8 * m, tot[m]);
}

/* Calls CALL with the compile-time constant `mt` = MT (1..4) so that loops over m unroll. */
#define GV_DISPATCH_MT(MT, CALL)               \
    switch (MT) {                              \
    case 1: { enum { mt = 1 }; CALL; } break;  \
    case 2: { enum { mt = 2 }; CALL; } break;  \
    case 3: { enum { mt = 3 }; CALL; } break;  \
    default: { enum { mt = 4 }; CALL; } break; \
    }

/* Tiles over `nchunk` chunks of codes (groups of size g aligned with them) for MT = 1..4 activation rows:
 * state[8m .. 8m+8) += the lane sums of row m (the caller reduces them once the row is complete). */
static GV_AVX2 void tile_f32_any(const uint8_t *codes, int nchunk, int g, const float *s, const float *const *x,
                                 int MT, float *state) {
    if (MT == 1) tile_f32_avx2(codes, nchunk, g, s, x, 1, state);
    else tile_f32_avx2(codes, nchunk, g, s, x, 2, state);
}

static GV_AVX2 void tile_i8x2_any(const uint8_t *codes, int nchunk, int g, const int8_t *const *xq,
                                  const float *const *sd, int MT, float *state) {
    GV_DISPATCH_MT(MT, tile_int_avx2(codes, nchunk, g, xq, sd, mt, 2, state));
}

static GV_AVX2 void tile_i8x3_any(const uint8_t *codes, int nchunk, int g, const int8_t *const *xq,
                                  const float *const *sd, int MT, float *state) {
    GV_DISPATCH_MT(MT, tile_int_avx2(codes, nchunk, g, xq, sd, mt, 3, state));
}

/* Output rows o0..o1 (at most ROWS_MAX) for all M activation rows. Loop order: tiles of activation rows,
 * then (for tiles of 2+ rows and I > K_BLOCK) blocks of inputs, then weight rows, so that the tile's
 * activations stay in L1 while the task's weight rows come from DRAM once and then from L2. A row's lane
 * sums are carried across blocks in `tots` and reduced once, so blocking never changes the arithmetic:
 * a row's result is the same in every tile. scratch: SCRATCH_FLOATS(G) floats. */
static GV_AVX2 void rows_avx2(const layout_t *L, const acts_t *A, const float *bias, float *y,
                              int o0, int o1, float *scratch) {
    const int G = L->G, P = A->mode, g = L->g;
    float *s = scratch, *zs = s + G, *sdbuf = zs + G, *tots = sdbuf + (size_t)MT_MAX * G;
    const int mt_max = P == GV_MODE_F32 ? MT_F32 : MT_MAX;
    for (int m0 = 0; m0 < A->M; m0 += mt_max) {
        const int MT = A->M - m0 < mt_max ? A->M - m0 : mt_max;
        const int kb = MT == 1 || L->I <= K_BLOCK ? L->I : g > K_BLOCK ? g : K_BLOCK / g * g; /* whole groups */
        for (int k0 = 0; k0 < L->I; k0 += kb) {
            const int kn = L->I - k0 < kb ? L->I - k0 : kb, g0 = k0 / g, gn = kn / g, last = k0 + kn == L->I;
            for (int o = o0; o < o1; o++) {
                const uint8_t *row = L->base + (size_t)o * L->stride, *codes = row + L->coff + k0 / 2;
                float *state = tots + (size_t)(o - o0) * MT_MAX * 8;
                if (k0 == 0) memset(state, 0, sizeof(float) * 8 * MT);
                header_avx2(L, row, g0, gn, s, zs);
                if (P == GV_MODE_F32) {
                    const float *x[MT_MAX];
                    for (int m = 0; m < MT; m++) x[m] = A->x + (size_t)(m0 + m) * A->ldx + k0;
                    tile_f32_any(codes, kn / 64, g, s, x, MT, state);
                } else {
                    const int8_t *xq[MT_MAX];
                    const float *sd[MT_MAX];
                    for (int m = 0; m < MT; m++) {
                        xq[m] = A->q + ((size_t)(m0 + m) * L->I + k0) * P;
                        mul_avx2(s, A->d + (size_t)(m0 + m) * G + g0, sdbuf + (size_t)m * G, gn);
                        sd[m] = sdbuf + (size_t)m * G;
                    }
                    if (P == GV_MODE_I8X2) tile_i8x2_any(codes, kn / 64, g, xq, sd, MT, state);
                    else tile_i8x3_any(codes, kn / 64, g, xq, sd, MT, state);
                }
                if (!last) continue;
                if (k0 > 0) header_avx2(L, row, 0, G, s, zs); /* the zero term needs every group's z*s */
                for (int m = 0; m < MT; m++) {
                    const float zt = dot_avx2(zs, A->xsum + (size_t)(m0 + m) * G, G);
                    y[(size_t)(m0 + m) * L->O + o] = hsum8(_mm256_loadu_ps(state + 8 * m)) - zt + (bias ? bias[o] : 0.f);
                }
            }
        }
    }
}

static GV_AVX2 void dequant_rows_avx2(const layout_t *L, float *w, int64_t ldw, int o0, int o1, float *scratch) {
    const __m256i m4 = _mm256_set1_epi32(0xF);
    const int upg = L->g / 32; /* 32-input units per group */
    float *s = scratch, *zs = s + L->G;
    for (int o = o0; o < o1; o++) {
        const uint8_t *row = L->base + (size_t)o * L->stride, *codes = row + L->coff;
        float *wr = w + (size_t)(o - o0) * ldw;
        header_avx2(L, row, 0, L->G, s, zs);
        for (int c = 0, gi = 0, used = 0; c < L->I / 64; c++) {
            const int glo = gi;
            if (++used == upg) { used = 0; gi++; }
            const int ghi = gi;
            if (++used == upg) { used = 0; gi++; }
            const __m256 slo = _mm256_set1_ps(s[glo]), zlo = _mm256_set1_ps(zs[glo]);
            const __m256 shi = _mm256_set1_ps(s[ghi]), zhi = _mm256_set1_ps(zs[ghi]);
            for (int q = 0; q < 4; q++) {
                __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + 32 * c + 8 * q)));
                /* u*s - z*s: both products exact, so the one rounding gives (u - z)*s exactly */
                _mm256_storeu_ps(wr + 64 * c + 8 * q,
                                 _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, m4)), slo, zlo));
                _mm256_storeu_ps(wr + 64 * c + 32 + 8 * q,
                                 _mm256_fmsub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), shi, zhi));
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* AVX-512 VNNI path: integer modes, g % 128 == 0 (left out with -DGV_NO_AVX512, for compilers without
 * these intrinsics: the build retries that way before giving up on the library)                */
#ifndef GV_NO_AVX512
#define GV_HAVE_AVX512 1

#define GV_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* The scales of groups g0 .. g0+15 of a row as fp32 lanes (lanes outside mask k are 0). */
GV_INLINE GV_AVX512 __m512 scales16(const layout_t *L, const uint8_t *row, int g0, __mmask16 k) {
    return L->ss == 2 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, row + 2 * (size_t)g0))
                      : _mm512_maskz_loadu_ps(k, row + 4 * (size_t)g0);
}

/* Groups [g0, g0 + gn) of one weight row against activation rows m0 .. m0+MT-1, everything in registers:
 *   tot[m] += sum_g (s_g d_mg) * (16 lanes of u . q over the group), the integer dot products on vpdpbusd
 *   (per lane at most 8 * g/128 products |u * digit| <= 15 * 128, so 256 * lane fits int32 for g <= 4096);
 *   zt[m]  += z_g s_g xsum_mg, one group per lane.
 * The same operations for a row whatever MT and its place in the tile. */
GV_INLINE GV_AVX512 void row_int_512(const layout_t *L, const uint8_t *row, int g0, int gn, const acts_t *A,
                                     int m0, int MT, int P, __m512 *tot, __m512 *zt) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int cpb = L->g / 128, G = L->G;
    const size_t bs = 128 * (size_t)P; /* bytes of one 128-input block in a row's digit planes */
    const uint8_t *codes = row + L->coff + (size_t)g0 * L->g / 2;
    const int8_t *xq[MT_MAX];
    const float *d[MT_MAX], *xs[MT_MAX];
    for (int m = 0; m < MT; m++) {
        xq[m] = A->q + ((size_t)(m0 + m) * L->I + (size_t)g0 * L->g) * P;
        d[m] = A->d + (size_t)(m0 + m) * G + g0;
        xs[m] = A->xsum + (size_t)(m0 + m) * G + g0;
    }
    float sdb[MT_MAX][16] __attribute__((aligned(64)));
    for (int i = 0, b = 0; i < gn; i += 16) {
        const int n = gn - i < 16 ? gn - i : 16;
        const __mmask16 k = (__mmask16)((1u << n) - 1);
        const __m512 s = scales16(L, row, g0 + i, k);
        const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, row + L->zoff + g0 + i)));
        const __m512 zs = _mm512_mul_ps(z, s); /* exact: a 4-bit integer times an fp16 value */
        for (int m = 0; m < MT; m++) {
            _mm512_store_ps(sdb[m], _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, d[m] + i)));
            zt[m] = _mm512_fmadd_ps(zs, _mm512_maskz_loadu_ps(k, xs[m] + i), zt[m]);
        }
        for (int j = 0; j < n; j++) {
            __m512i acc[MT_MAX][MAX_PLANES];
            for (int m = 0; m < MT; m++)
                for (int p = 0; p < P; p++) acc[m][p] = _mm512_setzero_si512();
            for (int e = b + cpb; b < e; b++) {
                const __m512i w = _mm512_loadu_si512((const void *)(codes + 64 * (size_t)b));
                _mm_prefetch((const char *)(codes + 64 * (size_t)b + GV_PF), _MM_HINT_T0);
                const __m512i lo = _mm512_and_si512(w, m4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                for (int m = 0; m < MT; m++) {
                    const int8_t *q = xq[m] + b * bs;
                    for (int p = 0; p < P; p++) {
                        acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], lo, _mm512_loadu_si512((const void *)(q + 128 * p)));
                        acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], hi, _mm512_loadu_si512((const void *)(q + 128 * p + 64)));
                    }
                }
            }
            for (int m = 0; m < MT; m++) {
                __m512 v = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(acc[m][P - 1], 8), acc[m][P - 2]));
                if (P == 3) v = _mm512_fmadd_ps(v, _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(acc[m][0]));
                tot[m] = _mm512_fmadd_ps(v, _mm512_set1_ps(sdb[m][j]), tot[m]);
            }
        }
    }
}

/* One activation row m against weight rows row0 .. row0 + NR - 1 (NR <= 4, g == 128: one 64-byte block of
 * codes per group): each block's activation digits are loaded once for the NR rows, since loads, not
 * vpdpbusd, bound the one-row loop. Per row the operations of row_int_512 with MT = 1: integer sums are
 * exact in any order (each plane's products accumulate onto the shifted sum of the planes above it: vpdpbusd
 * wraps like an add, so this is the int32 that summing each plane apart gives, in two fewer instructions per
 * block: +3-8% where the loop is compute-bound), and joining the digit planes in int32 gives exactly the value
 * the fp32 join gives (one rounding of the same integer; |sum| <= 15360 * 65793 < 2^31), so a row's bits do
 * not depend on M. */
GV_INLINE GV_AVX512 void rows_int_512_m1(const layout_t *L, const uint8_t *row0, size_t rstep, const acts_t *A,
                                         int m, int NR, int P, int LIN, int PF, __m512 *tot, __m512 *zt) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int G = L->G;
    const size_t bs = 128 * (size_t)P;
    const int8_t *xq = A->q + (size_t)m * L->I * P;
    const float *d = A->d + (size_t)m * G, *xs = A->xsum + (size_t)m * G;
    const uint8_t *rows[4], *codes[4];
    for (int r = 0; r < NR; r++) {
        rows[r] = row0 + (size_t)r * rstep;
        codes[r] = rows[r] + L->coff;
    }
        const size_t ahead = (size_t)NR * L->stride; /* the next NR rows */
    float sdb[4][16] __attribute__((aligned(64)));
    for (int i = 0; i < G; i += 16) {
        const int n = G - i < 16 ? G - i : 16;
        const __mmask16 k = (__mmask16)((1u << n) - 1);
        const __m512 dv = _mm512_maskz_loadu_ps(k, d + i), xv = _mm512_maskz_loadu_ps(k, xs + i);
        for (int r = 0; r < NR; r++) {
            const __m512 s = scales16(L, rows[r], i, k);
            const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, rows[r] + L->zoff + i)));
            _mm512_store_ps(sdb[r], _mm512_mul_ps(s, dv));
            zt[r] = _mm512_fmadd_ps(_mm512_mul_ps(z, s), xv, zt[r]);
        }
        for (int j = 0; j < n; j++) {
            const size_t b = (size_t)(i + j);
            const int8_t *q = xq + b * bs;
            __m512i xa[MAX_PLANES], xb[MAX_PLANES];
            for (int p = 0; p < P; p++) {
                xa[p] = _mm512_loadu_si512((const void *)(q + 128 * p));
                xb[p] = _mm512_loadu_si512((const void *)(q + 128 * p + 64));
            }
            for (int r = 0; r < NR; r++) {
                const __m512i w = _mm512_loadu_si512((const void *)(codes[r] + 64 * b));
                if (PF)
                    _mm_prefetch((const char *)(LIN ? row0 + ahead + 64 * (NR * b + r) : codes[r] + 64 * b + ahead),
                                 _MM_HINT_T0);
                const __m512i lo = _mm512_and_si512(w, m4), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
                __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xa[P - 1]), hi, xb[P - 1]);
                for (int p = P - 2; p >= 0; p--)
                    t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), lo, xa[p]), hi, xb[p]);
                tot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(sdb[r][j]), tot[r]);
            }
        }
    }
}

/* rows_512_tile for MT = 1 and g == 128, several weight rows at a time, their activation loads shared.
 * Default (g_multi_row 2): rows o0 + i + k * q (k = 0..3, q = a quarter of the task) together, so each thread
 * reads four long sequential streams, which the hardware prefetcher follows without software prefetches. A raw
 * read in that pattern (Zen 4, out of cache, alternated in one run) got ~22 GB/s on one thread against ~13 for
 * four adjacent ~2 KiB rows, and 28-30 against 24-25 GB/s on two; whole decode steps, alternated in one
 * process (benchmarks/bench_decode_layers.py --row-orders), took 0.79-0.96x the time on LLaVA-7B W4 (median
 * 0.91x of 7 rounds) and 0.76-1.01x on Qwen3-VL-2B W4 (median 0.87x of 6), the same bits. The same order in
 * gv_int8.c's M = 1 loop measured no gain (9 rounds on Qwen3-VL-2B W8, +-20% either way), so it is not there.
 * g_multi_row 1: 2 or 4 adjacent rows; for short rows (~4 KiB together) the next such span read ahead in
 * address order (+15-20% over one row at a time), for long rows 4 rows with one prefetch stream each, 4 rows
 * ahead (+30-50%). */
GV_INLINE GV_AVX512 void rows_512_m1(const layout_t *L, const acts_t *A, const float *bias, float *y,
                                     int o0, int o1, int m, int P) {
    const int lin = 4 * L->stride <= 5120 ? 4 : 2 * L->stride <= 5120 ? 2 : 0, step = lin ? lin : 4;
    const size_t stride = L->stride;
    int o = o0;
    if (g_multi_row == 2) {
        /* each row's operations are those of the other loops: only the order of the rows changes */
        const int q = (o1 - o0) / 4;
        for (int i = 0; i < q; i++) {
            __m512 tot[4], zt[4];
            for (int r = 0; r < 4; r++) tot[r] = zt[r] = _mm512_setzero_ps();
            rows_int_512_m1(L, L->base + (size_t)(o0 + i) * stride, (size_t)q * stride, A, m, 4, P, 0, 0, tot, zt);
            for (int r = 0; r < 4; r++) {
                const int oi = o0 + i + r * q;
                y[(size_t)m * L->O + oi] = _mm512_reduce_add_ps(_mm512_sub_ps(tot[r], zt[r])) + (bias ? bias[oi] : 0.f);
            }
        }
        o = o0 + 4 * q;
    }
    for (; o < o1; o += step) {
        const int NR = o1 - o < step ? o1 - o : step;
        __m512 tot[4], zt[4];
        for (int r = 0; r < 4; r++) tot[r] = zt[r] = _mm512_setzero_ps();
        const uint8_t *row0 = L->base + (size_t)o * stride;
        if (NR == 4 && lin) rows_int_512_m1(L, row0, stride, A, m, 4, P, 1, 1, tot, zt);
        else if (NR == 4) rows_int_512_m1(L, row0, stride, A, m, 4, P, 0, 1, tot, zt);
        else if (NR == 2 && lin) rows_int_512_m1(L, row0, stride, A, m, 2, P, 1, 1, tot, zt);
        else rows_int_512_m1(L, row0, stride, A, m, NR, P, lin != 0, 1, tot, zt);
        for (int r = 0; r < NR; r++)
            y[(size_t)m * L->O + o + r] = _mm512_reduce_add_ps(_mm512_sub_ps(tot[r], zt[r])) + (bias ? bias[o + r] : 0.f);
    }
}

/* Output rows o0..o1 for activation rows m0..m0+MT-1 (MT, P compile-time constants after inlining). Same
 * loop order and K blocking as rows_avx2; a row's two accumulators stay in registers, and in `state`
 * (32 floats per activation row) only between K blocks. */
GV_INLINE GV_AVX512 void rows_512_tile(const layout_t *L, const acts_t *A, const float *bias, float *y,
                                       int o0, int o1, int m0, int MT, int P, float *tots) {
    const int g = L->g;
    const int kb = MT == 1 || L->I <= K_BLOCK ? L->I : g > K_BLOCK ? g : K_BLOCK / g * g; /* whole groups */
    for (int k0 = 0; k0 < L->I; k0 += kb) {
        const int kn = L->I - k0 < kb ? L->I - k0 : kb, last = k0 + kn == L->I;
        for (int o = o0; o < o1; o++) {
            const uint8_t *row = L->base + (size_t)o * L->stride;
            float *state = tots + (size_t)(o - o0) * MT_MAX * 32;
            __m512 tot[MT_MAX], zt[MT_MAX];
            for (int m = 0; m < MT; m++) {
                tot[m] = k0 ? _mm512_loadu_ps(state + 32 * m) : _mm512_setzero_ps();
                zt[m] = k0 ? _mm512_loadu_ps(state + 32 * m + 16) : _mm512_setzero_ps();
            }
            row_int_512(L, row, k0 / g, kn / g, A, m0, MT, P, tot, zt);
            if (!last) {
                for (int m = 0; m < MT; m++) {
                    _mm512_storeu_ps(state + 32 * m, tot[m]);
                    _mm512_storeu_ps(state + 32 * m + 16, zt[m]);
                }
                continue;
            }
            for (int m = 0; m < MT; m++)
                y[(size_t)(m0 + m) * L->O + o] = _mm512_reduce_add_ps(_mm512_sub_ps(tot[m], zt[m])) + (bias ? bias[o] : 0.f);
        }
    }
}

/* rows_avx2 for the integer modes on the AVX-512 path (g % 128 == 0). */
static GV_AVX512 void rows_avx512(const layout_t *L, const acts_t *A, const float *bias, float *y,
                                  int o0, int o1, float *scratch) {
    for (int m0 = 0; m0 < A->M; m0 += MT_MAX) {
        const int MT = A->M - m0 < MT_MAX ? A->M - m0 : MT_MAX;
        if (MT == 1 && L->g == 128 && g_multi_row) {
            if (A->mode == GV_MODE_I8X2) rows_512_m1(L, A, bias, y, o0, o1, m0, 2);
            else rows_512_m1(L, A, bias, y, o0, o1, m0, 3);
        } else if (A->mode == GV_MODE_I8X2) {
            GV_DISPATCH_MT(MT, rows_512_tile(L, A, bias, y, o0, o1, m0, mt, 2, scratch));
        } else {
            GV_DISPATCH_MT(MT, rows_512_tile(L, A, bias, y, o0, o1, m0, mt, 3, scratch));
        }
    }
}

/* ---- dense fp16 / bf16 weights (the lm_head): y[m, o] = sum_k float(w[o, k]) * x[m, k] */

GV_INLINE GV_AVX512 __m512 half16_512(const uint16_t *p, int bf16) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

/* Four independent lane accumulators per row over 64 inputs at a time, then the inputs past I - I % 64 one
 * by one: the same operations for every row whatever MT. */
/* One row at a time and no software prefetch: each thread then reads one sequential stream, which the hardware
 * prefetcher follows best (Zen 4, 2 threads, a [151936, 2048] bf16 head out of cache, alternated in one run:
 * 27.7-28.5 GB/s, against 21.5-21.9 for 4 rows with prefetches 8 KiB ahead and 19.9-20.8 for 1 row with them;
 * a streaming read of the same buffer: 32-39 GB/s). */
#define GV_HALF_ROWS 1
/* half_rows_512 for M = 1 on NR weight rows at once, each row with its own four accumulators in the same
 * order (the one-row bits), the x loads shared by the NR rows. */
GV_INLINE GV_AVX512 void half_rows_512_m1(const uint16_t *w, int I, int bf16, const float *x, float *y, int o,
                                          int NR) {
    const int main_end = I / 64 * 64;
    const uint16_t *wr[4];
    __m512 acc[4][4];
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (size_t)(o + r) * I;
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    }
    for (int k = 0; k < main_end; k += 64) {
        __m512 xv[4];
        for (int j = 0; j < 4; j++) xv[j] = _mm512_loadu_ps(x + k + 16 * j);
        for (int r = 0; r < NR; r++) {
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(half16_512(wr[r] + k + 16 * j, bf16), xv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < NR; r++) {
        const float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                           _mm512_add_ps(acc[r][2], acc[r][3])));
        y[o + r] = half_dot(wr[r], x, main_end, I, bf16, t);
    }
}

static GV_AVX512 void half_rows_512(const uint16_t *w, int I, int bf16, const float *x, int64_t ldx, int M,
                                    float *y, int O, int o0, int o1) {
    const int main_end = I / 64 * 64;
    if (M == 1 && g_multi_row) {
        for (int o = o0; o < o1; o += GV_HALF_ROWS) {
            if (o1 - o >= GV_HALF_ROWS) half_rows_512_m1(w, I, bf16, x, y, o, GV_HALF_ROWS);
            else half_rows_512_m1(w, I, bf16, x, y, o, o1 - o);
        }
        return;
    }
    for (int m0 = 0; m0 < M; m0 += MT_MAX) {
        const int MT = M - m0 < MT_MAX ? M - m0 : MT_MAX;
        for (int o = o0; o < o1; o++) {
            const uint16_t *wr = w + (size_t)o * I;
            __m512 acc[MT_MAX][4];
            for (int m = 0; m < MT; m++)
                for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
            for (int k = 0; k < main_end; k += 64) {
                _mm_prefetch((const char *)(wr + k) + GV_PF, _MM_HINT_T0);
                _mm_prefetch((const char *)(wr + k) + GV_PF + 64, _MM_HINT_T0);
                __m512 wv[4];
                for (int j = 0; j < 4; j++) wv[j] = half16_512(wr + k + 16 * j, bf16);
                for (int m = 0; m < MT; m++) {
                    const float *xm = x + (size_t)(m0 + m) * ldx + k;
                    for (int j = 0; j < 4; j++) acc[m][j] = _mm512_fmadd_ps(wv[j], _mm512_loadu_ps(xm + 16 * j), acc[m][j]);
                }
            }
            for (int m = 0; m < MT; m++) {
                const float *xm = x + (size_t)(m0 + m) * ldx;
                const float r = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]),
                                                                   _mm512_add_ps(acc[m][2], acc[m][3])));
                y[(size_t)(m0 + m) * O + o] = half_dot(wr, xm, main_end, I, bf16, r);
            }
        }
    }
}

#endif /* GV_NO_AVX512 */

GV_INLINE GV_AVX2 __m256 half8_256(const uint16_t *p, int bf16) {
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

/* half_rows_512 with 8-lane vectors (four accumulators over 32 inputs at a time). */
static GV_AVX2 void half_rows_avx2(const uint16_t *w, int I, int bf16, const float *x, int64_t ldx, int M,
                                   float *y, int O, int o0, int o1) {
    const int main_end = I / 32 * 32;
    for (int m0 = 0; m0 < M; m0 += MT_MAX) {
        const int MT = M - m0 < MT_MAX ? M - m0 : MT_MAX;
        for (int o = o0; o < o1; o++) {
            const uint16_t *wr = w + (size_t)o * I;
            __m256 acc[MT_MAX][4];
            for (int m = 0; m < MT; m++)
                for (int j = 0; j < 4; j++) acc[m][j] = _mm256_setzero_ps();
            for (int k = 0; k < main_end; k += 32) {
                _mm_prefetch((const char *)(wr + k) + GV_PF, _MM_HINT_T0);
                __m256 wv[4];
                for (int j = 0; j < 4; j++) wv[j] = half8_256(wr + k + 8 * j, bf16);
                for (int m = 0; m < MT; m++) {
                    const float *xm = x + (size_t)(m0 + m) * ldx + k;
                    for (int j = 0; j < 4; j++) acc[m][j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xm + 8 * j), acc[m][j]);
                }
            }
            for (int m = 0; m < MT; m++) {
                const float *xm = x + (size_t)(m0 + m) * ldx;
                const float r = hsum8(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]),
                                                    _mm256_add_ps(acc[m][2], acc[m][3])));
                y[(size_t)(m0 + m) * O + o] = half_dot(wr, xm, main_end, I, bf16, r);
            }
        }
    }
}
#endif /* GV_X86 */

/* ------------------------------------------------------------------------------------------ */
/* Portable scalar path (same arithmetic, one weight at a time)                                */

static int code_at(const uint8_t *codes, int k) {
    const uint8_t byte = codes[(k / 64) * 32 + (k % 32)];
    return (k % 64) >= 32 ? byte >> 4 : byte & 0xF;
}

static void rows_scalar(const layout_t *L, const acts_t *A, const float *bias, float *y,
                        int o0, int o1, float *scratch) {
    const int G = L->G, g = L->g, P = A->mode;
    float *s = scratch, *zs = s + G;
    for (int o = o0; o < o1; o++) {
        const uint8_t *row = L->base + (size_t)o * L->stride, *codes = row + L->coff;
        header_scalar(L, row, s, zs);
        for (int m = 0; m < A->M; m++) {
            const float *x = A->x + (size_t)m * A->ldx;
            float tot = 0.f, zt = 0.f;
            for (int gi = 0; gi < G; gi++) {
                if (A->mode == GV_MODE_F32) {
                    float acc = 0.f;
                    for (int k = gi * g; k < (gi + 1) * g; k++) acc += (float)code_at(codes, k) * x[k];
                    tot += s[gi] * acc;
                } else {
                    int32_t a = 0, b = 0; /* as dig_flush: a = sum u*(256*q_top + q_next), b = sum u*q_0 */
                    for (int k = gi * g; k < (gi + 1) * g; k++) {
                        const int u = code_at(codes, k);
                        a += u * (256 * *digit_at(L, A, m, k, P - 1) + *digit_at(L, A, m, k, P - 2));
                        if (P == 3) b += u * *digit_at(L, A, m, k, 0);
                    }
                    const float sd = s[gi] * A->d[(size_t)m * G + gi];
                    tot += (P == 3 ? (float)a * 256.f + (float)b : (float)a) * sd;
                }
                zt += zs[gi] * A->xsum[(size_t)m * G + gi];
            }
            y[(size_t)m * L->O + o] = tot - zt + (bias ? bias[o] : 0.f);
        }
    }
}

static void dequant_rows_scalar(const layout_t *L, float *w, int64_t ldw, int o0, int o1, float *scratch) {
    float *s = scratch, *zs = s + L->G;
    for (int o = o0; o < o1; o++) {
        const uint8_t *row = L->base + (size_t)o * L->stride, *codes = row + L->coff;
        float *wr = w + (size_t)(o - o0) * ldw;
        header_scalar(L, row, s, zs);
        for (int gi = 0; gi < L->G; gi++)
            for (int k = gi * L->g; k < (gi + 1) * L->g; k++) wr[k] = (float)code_at(codes, k) * s[gi] - zs[gi];
    }
}

static void half_rows_scalar(const uint16_t *w, int I, int bf16, const float *x, int64_t ldx, int M,
                             float *y, int O, int o0, int o1) {
    for (int o = o0; o < o1; o++) {
        const uint16_t *wr = w + (size_t)o * I;
        for (int m = 0; m < M; m++) {
            y[(size_t)m * O + o] = half_dot(wr, x + (size_t)m * ldx, 0, I, bf16, 0.f);
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Entry points                                                                                */

/* Output rows per scheduling task: ~8 tasks per thread for balance, 4..ROWS_MAX rows each. */
static int rows_per_task(int O, int nthreads) {
    int r = O / (nthreads * 8);
    return r < 4 ? 4 : r > ROWS_MAX ? ROWS_MAX : r;
}

#define M1_ROWS_MAX 1024
static int rows_per_task_m1(int O, int nthreads) {
    int r = O / (nthreads * 4);
    return r < 4 ? 4 : r > M1_ROWS_MAX ? M1_ROWS_MAX : r;
}

static int clamp_threads(int nthreads, int ntasks) {
    if (nthreads < 1) nthreads = 1;
    return nthreads > ntasks ? ntasks : nthreads;
}

/* y[M, O] = x[M, I] @ W^T + bias in fp32. x rows have stride ldx (elements, >= I); bias [O] or NULL;
 * y contiguous [M, O]. mode: GV_MODE_F32, GV_MODE_I8X2 or GV_MODE_I8X3. nthreads: OpenMP threads, which
 * split the output rows. Returns 0, -1 for bad arguments, -2 when out of memory. */
GV_API int gv_matmul(const uint8_t *packed, int I, int O, int g, int ss, const float *x, int64_t ldx, int M,
                     const float *bias, float *y, int mode, int nthreads) {
    int64_t info[3];
    if (M <= 0 || O <= 0 || ldx < I || gv_layout(I, g, ss, info) ||
        (mode != GV_MODE_F32 && mode != GV_MODE_I8X2 && mode != GV_MODE_I8X3))
        return -1;
    const layout_t L = make_layout(packed, I, O, g, ss);
    /* M = 1 with quarter streams: tasks of up to M1_ROWS_MAX rows (that loop keeps no per-row state), so the
     * streams stay long; else up to ROWS_MAX */
#ifdef GV_HAVE_AVX512
    const int m1_streams = M == 1 && g_multi_row == 2 && g == 128 && isa() == 3 && mode != GV_MODE_F32;
#else
    const int m1_streams = 0;
#endif
    const int G = L.G, R = m1_streams ? rows_per_task_m1(O, nthreads) : rows_per_task(O, nthreads);
    const int ntasks = (O + R - 1) / R;
    nthreads = clamp_threads(nthreads, ntasks);
    const size_t per_thread = SCRATCH_FLOATS(G); /* its +16 keeps threads' scratch off a shared line */
    const size_t nf = ((size_t)M * G * 2 + (size_t)nthreads * per_thread + 15) / 16 * 16; /* digits on a line */
    const size_t nq = mode == GV_MODE_F32 ? 0 : (size_t)M * I * mode;
    float *mem = NULL;
    if (posix_memalign((void **)&mem, 64, nf * sizeof(float) + nq)) return -2;
    const int use_avx512 = isa() == 3 && mode != GV_MODE_F32 && g % 128 == 0;
    const int use_avx2 = isa() >= 2;
    (void)use_avx2;
    acts_t A = {x, ldx, M, mode, nq ? (int8_t *)(mem + nf) : NULL, mem, mem + (size_t)M * G, use_avx512};
    float *scratch = mem + (size_t)M * G * 2;
    GV_OMP(omp parallel num_threads(nthreads))
    {
        GV_OMP(omp for schedule(static))
        for (int m = 0; m < M; m++) {
#ifdef GV_X86
            if (use_avx2) prep_row_avx2(&L, &A, m);
            else
#endif
                prep_row_scalar(&L, &A, m);
        }
        float *mine = scratch + (size_t)thread_id() * per_thread;
        GV_OMP(omp for schedule(dynamic, 1))
        for (int t = 0; t < ntasks; t++) {
            const int o0 = t * R, o1 = o0 + R < O ? o0 + R : O;
#ifdef GV_X86
#ifdef GV_HAVE_AVX512
            if (use_avx512) rows_avx512(&L, &A, bias, y, o0, o1, mine);
            else
#endif
            if (use_avx2) rows_avx2(&L, &A, bias, y, o0, o1, mine);
            else
#endif
                rows_scalar(&L, &A, bias, y, o0, o1, mine);
        }
    }
    free(mem);
    return 0;
}

/* w[o - o0, k] = W[o, k] in fp32, bit-exact, for output rows o0 <= o < o1; rows of w have stride ldw >= I.
 * Returns 0, -1 for bad arguments, -2 when out of memory. */
GV_API int gv_dequant(const uint8_t *packed, int I, int O, int g, int ss, int o0, int o1, float *w, int64_t ldw,
                      int nthreads) {
    int64_t info[3];
    if (o0 < 0 || o1 > O || o0 >= o1 || ldw < I || gv_layout(I, g, ss, info)) return -1;
    const layout_t L = make_layout(packed, I, O, g, ss);
    const int G = L.G, R = 8, ntasks = (o1 - o0 + R - 1) / R;
    nthreads = clamp_threads(nthreads, ntasks);
    const size_t per_thread = (size_t)2 * G + 16;
    float *scratch = malloc((size_t)nthreads * per_thread * sizeof(float));
    if (!scratch) return -2;
    const int use_avx2 = isa() >= 2;
    (void)use_avx2;
    GV_OMP(omp parallel num_threads(nthreads))
    {
        float *mine = scratch + (size_t)thread_id() * per_thread;
        GV_OMP(omp for schedule(dynamic, 4))
        for (int t = 0; t < ntasks; t++) {
            const int a = o0 + t * R, b = a + R < o1 ? a + R : o1;
            float *wt = w + (size_t)(a - o0) * ldw;
#ifdef GV_X86
            if (use_avx2) dequant_rows_avx2(&L, wt, ldw, a, b, mine);
            else
#endif
                dequant_rows_scalar(&L, wt, ldw, a, b, mine);
        }
    }
    free(scratch);
    return 0;
}

/* y[M, O] = x[M, I] @ w^T in fp32 for a dense weight w [O, I] of fp16 (bf16 = 0) or bf16 (bf16 = 1) values,
 * each converted exactly to fp32 (the lm_head, read at half the bytes of an fp32 copy). x rows have stride
 * ldx >= I; y contiguous [M, O]. Output rows are split across threads; every y[m, o] is computed by the
 * same operations whatever M and the thread count. Returns 0 or -1 for bad arguments. */
GV_API int gv_matmul_half(const uint16_t *w, int I, int O, int bf16, const float *x, int64_t ldx, int M,
                          float *y, int nthreads) {
    if (I <= 0 || O <= 0 || M <= 0 || ldx < I) return -1;
    const int R = rows_per_task(O, nthreads), ntasks = (O + R - 1) / R, level = isa();
    (void)level;
    nthreads = clamp_threads(nthreads, ntasks);
    GV_OMP(omp parallel for schedule(dynamic, 1) num_threads(nthreads))
    for (int t = 0; t < ntasks; t++) {
        const int o0 = t * R, o1 = o0 + R < O ? o0 + R : O;
#ifdef GV_X86
#ifdef GV_HAVE_AVX512
        if (level == 3) half_rows_512(w, I, bf16, x, ldx, M, y, O, o0, o1);
        else
#endif
        if (level == 2) half_rows_avx2(w, I, bf16, x, ldx, M, y, O, o0, o1);
        else
#endif
            half_rows_scalar(w, I, bf16, x, ldx, M, y, O, o0, o1);
    }
    return 0;
}

/* Inverse of gv_repack: the AWQ GEMM tensors back from the layout, bit-exact. qweight int32 [I, O/8],
 * qzeros int32 [I/g, O/8], scales [I/g, O] (ss bytes each, as stored). Returns 0 or -1. */
GV_API int gv_unpack(const uint8_t *packed, int I, int O, int g, int ss, int32_t *qweight, int32_t *qzeros,
                     void *scales, int nthreads) {
    int64_t info[3];
    if (O <= 0 || O % 8 || gv_layout(I, g, ss, info)) return -1;
    const layout_t L = make_layout(packed, I, O, g, ss);
    const int ncol = O / 8;
    (void)nthreads;
GV_OMP(omp parallel for schedule(static) num_threads(nthreads))
    for (int k = 0; k < I; k++) {
        const size_t byte = (size_t)L.coff + (size_t)(k / 64) * 32 + (k % 32);
        const int shift = (k % 64) >= 32 ? 4 : 0;
        for (int c = 0; c < ncol; c++) {
            uint32_t w = 0;
            for (int n = 0; n < 8; n++) {
                const int o = 8 * c + (n < 4 ? 2 * n : 2 * (n - 4) + 1); /* nibble n -> column offset */
                w |= (uint32_t)((L.base[(size_t)o * L.stride + byte] >> shift) & 0xF) << (4 * n);
            }
            qweight[(size_t)k * ncol + c] = (int32_t)w;
        }
    }
    for (int gi = 0; gi < L.G; gi++)
        for (int c = 0; c < ncol; c++) {
            uint32_t w = 0;
            for (int n = 0; n < 8; n++) {
                const int o = 8 * c + (n < 4 ? 2 * n : 2 * (n - 4) + 1);
                const uint8_t *row = L.base + (size_t)o * L.stride;
                w |= (uint32_t)(row[L.zoff + gi] & 0xF) << (4 * n);
                memcpy((uint8_t *)scales + ((size_t)gi * O + o) * ss, row + (size_t)gi * ss, ss);
            }
            qzeros[(size_t)gi * ncol + c] = (int32_t)w;
        }
    return 0;
}

/* Reads n bytes (n % 64 == 0) once with nthreads threads, each a contiguous part, and returns the XOR of
 * all 64-bit words: a memory-bandwidth probe for the benchmarks, with the kernels' access pattern
 * (sequential streams, software prefetch GV_PF bytes ahead). */
GV_API uint64_t gv_stream_read(const uint8_t *buf, int64_t n, int nthreads) {
    uint64_t total = 0;
    (void)nthreads;
GV_OMP(omp parallel num_threads(nthreads) reduction(^ : total))
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        const int64_t lines = n / 64, lo = lines * t / nt * 64, hi = lines * (t + 1) / nt * 64;
        uint64_t acc[8] = {0};
        for (int64_t i = lo; i < hi; i += 64) {
#ifdef GV_X86
            _mm_prefetch((const char *)(buf + i + GV_PF), _MM_HINT_T0);
#endif
            for (int j = 0; j < 8; j++) {
                uint64_t w;
                memcpy(&w, buf + i + 8 * j, 8);
                acc[j] ^= w;
            }
        }
        for (int j = 0; j < 8; j++) total ^= acc[j];
    }
    return total;
}
