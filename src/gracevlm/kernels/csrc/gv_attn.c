/* Decode attention for gracevlm on CPU: one query position per head over a KV cache, grouped-query aware.
 *
 * Built into one library with gv_int8.c (its code-path switch gv8_isa applies here too). Called through
 * ctypes (gracevlm/kernels/attention.py).
 *
 * gv_attn_decode: q fp32 [H, d] (head h at q + h*d), K and V of KVH = H / groups heads, S positions each, stored
 * as fp32, bf16 or fp16 with element strides hs (between heads) and ps (between positions), the d values of one
 * position contiguous. Head h reads KV head h / groups (the repeat_interleave convention). For every head:
 *   s_t = scale * (q . k_t),  p_t = exp(s_t - max s) / sum_u exp(s_u - max s),  out = sum_t p_t v_t
 * in fp32 (K/V converted exactly), i.e. softmax(q K^T * scale) V with every position visible (a decode step
 * attends to the whole prefix). Each KV head's `groups` query rows are computed by one thread with the same
 * operations whatever the thread count, so results do not depend on it. The AVX2 path evaluates exp with a
 * degree-7 polynomial after range reduction (<= 2 ulp); the scalar path uses expf.
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

enum { KV_F32 = 0, KV_BF16 = 1, KV_F16 = 2 };
#define D_MAX 512

int gv8_isa(void); /* gv_int8.c: 2 = AVX2/FMA/F16C, 0 = scalar */

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000 | (man << 13);
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else { /* subnormal: normalise */
        int e = -1;
        uint32_t m = man;
        do { m <<= 1; e++; } while (!(m & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float kv_at(const void *base, int64_t i, int dt) {
    if (dt == KV_F32) return ((const float *)base)[i];
    const uint16_t h = ((const uint16_t *)base)[i];
    if (dt == KV_F16) return half_to_float(h);
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* One KV head: q [g][d] -> out [g][d]; sc: g*S floats of scratch. */
static void head_scalar(const float *q, int g, int d, const void *k, const void *v, int64_t ps, int S, int dt,
                        float scale, float *sc, float *out) {
    for (int j = 0; j < g; j++) {
        float *s = sc + (size_t)j * S, mx = -INFINITY, sum = 0.f;
        for (int t = 0; t < S; t++) {
            float a = 0.f;
            for (int c = 0; c < d; c++) a += q[(size_t)j * d + c] * kv_at(k, (int64_t)t * ps + c, dt);
            s[t] = a * scale;
            mx = s[t] > mx ? s[t] : mx;
        }
        for (int t = 0; t < S; t++) sum += (s[t] = expf(s[t] - mx));
        float *o = out + (size_t)j * d;
        for (int c = 0; c < d; c++) o[c] = 0.f;
        for (int t = 0; t < S; t++)
            for (int c = 0; c < d; c++) o[c] += s[t] * kv_at(v, (int64_t)t * ps + c, dt);
        for (int c = 0; c < d; c++) o[c] /= sum;
    }
}

#ifdef GV_X86
GV_INLINE GV_AVX2 float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

GV_INLINE GV_AVX2 float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 consecutive K/V values at element i as fp32 (exact conversions). */
GV_INLINE GV_AVX2 __m256 kv8(const void *base, int64_t i, int dt) {
    if (dt == KV_F32) return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (dt == KV_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* exp(x) for x <= 0 (softmax after the max is subtracted): x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor
 * polynomial of degree 7 (truncation < 6e-9 relative), times 2^n; x below -87.3 (e^x under the smallest
 * normal float, -inf included) gives 0, NaN stays NaN. */
GV_INLINE GV_AVX2 __m256 exp8_nonpos(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(lo, x); /* NaN (second operand) passes through */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts: hi is exact in n*hi */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    /* n >= -126 here, so 2^n is a normal float */
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(underflow, y);
}

GV_INLINE GV_AVX2 void head_avx2(const float *q, int g, int d, const void *k, const void *v, int64_t ps, int S,
                                 int dt, float scale, float *sc, float *out) {
    const int nv = d / 8;
    /* scores, four positions at a time (four independent FMA chains per query row) */
    int t = 0;
    for (; t + 4 <= S; t += 4) {
        const int64_t b = (int64_t)t * ps;
        for (int j = 0; j < g; j++) {
            const float *qj = q + (size_t)j * d;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int c = 0; c < nv; c++) {
                const __m256 qv = _mm256_loadu_ps(qj + 8 * c);
                a0 = _mm256_fmadd_ps(kv8(k, b + 8 * c, dt), qv, a0);
                a1 = _mm256_fmadd_ps(kv8(k, b + ps + 8 * c, dt), qv, a1);
                a2 = _mm256_fmadd_ps(kv8(k, b + 2 * ps + 8 * c, dt), qv, a2);
                a3 = _mm256_fmadd_ps(kv8(k, b + 3 * ps + 8 * c, dt), qv, a3);
            }
            float *s = sc + (size_t)j * S + t;
            s[0] = hsum8(a0) * scale;
            s[1] = hsum8(a1) * scale;
            s[2] = hsum8(a2) * scale;
            s[3] = hsum8(a3) * scale;
        }
    }
    for (; t < S; t++) {
        const int64_t b = (int64_t)t * ps;
        for (int j = 0; j < g; j++) {
            const float *qj = q + (size_t)j * d;
            __m256 a0 = _mm256_setzero_ps();
            for (int c = 0; c < nv; c++) a0 = _mm256_fmadd_ps(kv8(k, b + 8 * c, dt), _mm256_loadu_ps(qj + 8 * c), a0);
            sc[(size_t)j * S + t] = hsum8(a0) * scale;
        }
    }
    /* softmax numerators in place; sums */
    float sums[64];
    for (int j = 0; j < g; j++) {
        float *s = sc + (size_t)j * S;
        __m256 m8 = _mm256_set1_ps(-INFINITY);
        int u = 0;
        for (; u + 8 <= S; u += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + u));
        float mx = hmax8(m8);
        for (; u < S; u++) mx = s[u] > mx ? s[u] : mx;
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 acc = _mm256_setzero_ps();
        for (u = 0; u + 8 <= S; u += 8) {
            const __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + u), vmx));
            _mm256_storeu_ps(s + u, e);
            acc = _mm256_add_ps(acc, e);
        }
        if (u < S) { /* the tail through the same vector code, padded with -inf (exp -> 0) */
            float tmp[8];
            for (int i = 0; i < 8; i++) tmp[i] = u + i < S ? s[u + i] - mx : -INFINITY;
            const __m256 e = exp8_nonpos(_mm256_loadu_ps(tmp));
            _mm256_storeu_ps(tmp, e);
            for (int i = 0; u + i < S; i++) s[u + i] = tmp[i];
            acc = _mm256_add_ps(acc, e);
        }
        sums[j] = hsum8(acc);
    }
    /* out = sum_t p_t v_t: 32 dims x up to 2 query rows in 8 register accumulators per pass over the positions */
    for (int j0 = 0; j0 < g; j0 += 2) {
        const int two = j0 + 1 < g;
        const float *p0 = sc + (size_t)j0 * S, *p1 = two ? p0 + S : p0;
        for (int c0 = 0; c0 < nv; c0 += 4) {
            const int nc = nv - c0 < 4 ? nv - c0 : 4;
            __m256 a[2][4];
            for (int i = 0; i < 4; i++) a[0][i] = a[1][i] = _mm256_setzero_ps();
            if (nc == 4) {
                for (t = 0; t < S; t++) {
                    const int64_t b = (int64_t)t * ps + 8 * c0;
                    const __m256 w0 = _mm256_set1_ps(p0[t]), w1 = _mm256_set1_ps(p1[t]);
                    for (int i = 0; i < 4; i++) {
                        const __m256 vv = kv8(v, b + 8 * i, dt);
                        a[0][i] = _mm256_fmadd_ps(w0, vv, a[0][i]);
                        a[1][i] = _mm256_fmadd_ps(w1, vv, a[1][i]);
                    }
                }
            } else {
                for (t = 0; t < S; t++) {
                    const int64_t b = (int64_t)t * ps + 8 * c0;
                    const __m256 w0 = _mm256_set1_ps(p0[t]), w1 = _mm256_set1_ps(p1[t]);
                    for (int i = 0; i < nc; i++) {
                        const __m256 vv = kv8(v, b + 8 * i, dt);
                        a[0][i] = _mm256_fmadd_ps(w0, vv, a[0][i]);
                        a[1][i] = _mm256_fmadd_ps(w1, vv, a[1][i]);
                    }
                }
            }
            for (int i = 0; i < nc; i++) {
                _mm256_storeu_ps(out + (size_t)j0 * d + 8 * (c0 + i), a[0][i]);
                if (two) _mm256_storeu_ps(out + (size_t)(j0 + 1) * d + 8 * (c0 + i), a[1][i]);
            }
        }
    }
    for (int j = 0; j < g; j++) {
        const __m256 vs = _mm256_set1_ps(sums[j]);
        float *o = out + (size_t)j * d;
        for (int c = 0; c < nv; c++) _mm256_storeu_ps(o + 8 * c, _mm256_div_ps(_mm256_loadu_ps(o + 8 * c), vs));
    }
}
/* head_avx2 with the K/V dtype a compile-time constant (no per-load branch). */
static GV_AVX2 void head_avx2_f32(const float *q, int g, int d, const void *k, const void *v, int64_t ps, int S,
                                  float scale, float *sc, float *out) {
    head_avx2(q, g, d, k, v, ps, S, KV_F32, scale, sc, out);
}
static GV_AVX2 void head_avx2_bf16(const float *q, int g, int d, const void *k, const void *v, int64_t ps, int S,
                                   float scale, float *sc, float *out) {
    head_avx2(q, g, d, k, v, ps, S, KV_BF16, scale, sc, out);
}
static GV_AVX2 void head_avx2_f16(const float *q, int g, int d, const void *k, const void *v, int64_t ps, int S,
                                  float scale, float *sc, float *out) {
    head_avx2(q, g, d, k, v, ps, S, KV_F16, scale, sc, out);
}
#endif /* GV_X86 */

/* See the file comment. groups = H / KVH <= 64, d <= D_MAX, S >= 1. dt: 0 fp32, 1 bf16, 2 fp16. Returns 0, -1 for
 * bad arguments, -2 when out of memory. */
GV_API int gv_attn_decode(const float *q, int H, int KVH, int d, const void *k, const void *v, int64_t hs,
                          int64_t ps, int S, int dt, float scale, float *out, int nthreads) {
    if (H <= 0 || KVH <= 0 || H % KVH || H / KVH > 64 || d <= 0 || d > D_MAX || S <= 0 || ps < d ||
        (dt != KV_F32 && dt != KV_BF16 && dt != KV_F16))
        return -1;
    const int g = H / KVH, esize = dt == KV_F32 ? 4 : 2;
    const int vec = gv8_isa() >= 2 && d % 8 == 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > KVH) nthreads = KVH;
    const size_t per = (size_t)g * S; /* scores of one KV head */
    float *scratch = NULL;
    if (posix_memalign((void **)&scratch, 64, (size_t)nthreads * (per + 16) * sizeof(float))) return -2;
    GV_OMP(omp parallel for schedule(static) num_threads(nthreads))
    for (int h = 0; h < KVH; h++) {
#ifdef _OPENMP
        float *sc = scratch + (size_t)omp_get_thread_num() * (per + 16);
#else
        float *sc = scratch;
#endif
        const char *kh = (const char *)k + (size_t)h * hs * esize, *vh = (const char *)v + (size_t)h * hs * esize;
        const float *qh = q + (size_t)h * g * d;
        float *oh = out + (size_t)h * g * d;
#ifdef GV_X86
        if (vec && dt == KV_F32) head_avx2_f32(qh, g, d, kh, vh, ps, S, scale, sc, oh);
        else if (vec && dt == KV_BF16) head_avx2_bf16(qh, g, d, kh, vh, ps, S, scale, sc, oh);
        else if (vec) head_avx2_f16(qh, g, d, kh, vh, ps, S, scale, sc, oh);
        else
#endif
            head_scalar(qh, g, d, kh, vh, ps, S, dt, scale, sc, oh);
    }
    (void)vec;
    free(scratch);
    return 0;
}

int gv_rms_norm(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int rows, int d, double eps);
int gv_rope(const float *x, int64_t ldx, const float *c, const float *s, float *y, int n, int H, int d);

/* fp32 -> bf16 bits as torch rounds them: to nearest, ties to even; NaN -> 0x7FC0. */
static uint16_t bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Write d values at dst (fp32 or bf16 cache). */
static void put_kv(void *dst, const float *src, int d, int dt) {
    if (dt == KV_F32) {
        memcpy(dst, src, (size_t)d * sizeof(float));
        return;
    }
    uint16_t *o = (uint16_t *)dst;
    for (int c = 0; c < d; c++) o[c] = bf16_bits(src[c]);
}

/* A decode step's attention for one sequence: the per-layer sequence of separate calls in one.
 * qkv: [(H + 2*KVH) * d], the H query heads, then KVH key heads, then KVH value heads (a fused projection's
 * output row). Query and key heads go through gv_rms_norm with qw / kw (QK-norm; NULL: none), then gv_rope with
 * this position's tables c, s [d]; the key and value heads are written at position S-1 of the caches k, v (fp32
 * or bf16, dt as gv_attn_decode; strides hs, ps in elements), and gv_attn_decode attends over positions 0..S-1
 * into out [H * d]. The same functions in the same order as the separate calls, so the same bits. Returns 0, -1
 * for bad arguments (nothing written), -2 when out of memory. */
GV_API int gv_attn_block_decode(const float *qkv, int H, int KVH, int d, const float *qw, const float *kw,
                                double eps, const float *c, const float *s, void *k, void *v, int64_t hs,
                                int64_t ps, int S, int dt, float scale, float *out, int nthreads) {
    if (H <= 0 || KVH <= 0 || H % KVH || H / KVH > 64 || d <= 0 || d > D_MAX || d % 2 || S <= 0 || ps < d ||
        (dt != KV_F32 && dt != KV_BF16) || !(eps >= 0))
        return -1;
    float *buf = NULL; /* normed q heads, then normed k heads; rotated q; rotated k */
    if (posix_memalign((void **)&buf, 64, (size_t)2 * (H + KVH) * d * sizeof(float))) return -2;
    float *normed = buf, *rq = buf + (size_t)(H + KVH) * d, *rk = rq + (size_t)H * d;
    const float *q_in = qkv, *k_in = qkv + (size_t)H * d, *v_in = k_in + (size_t)KVH * d;
    if (qw) gv_rms_norm(q_in, d, qw, normed, d, H, d, eps);
    if (kw) gv_rms_norm(k_in, d, kw, normed + (size_t)H * d, d, KVH, d, eps);
    gv_rope(qw ? normed : q_in, (int64_t)H * d, c, s, rq, 1, H, d);
    gv_rope(kw ? normed + (size_t)H * d : k_in, (int64_t)KVH * d, c, s, rk, 1, KVH, d);
    const size_t esize = dt == KV_F32 ? 4 : 2;
    for (int h = 0; h < KVH; h++) {
        const size_t at = ((size_t)h * hs + (size_t)(S - 1) * ps) * esize;
        put_kv((char *)k + at, rk + (size_t)h * d, d, dt);
        put_kv((char *)v + at, v_in + (size_t)h * d, d, dt);
    }
    const int rc = gv_attn_decode(rq, H, KVH, d, k, v, hs, ps, S, dt, scale, out, nthreads);
    free(buf);
    return rc;
}
