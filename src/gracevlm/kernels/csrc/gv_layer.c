/* A decoder's single-sequence decode step in one call, and the SwiGLU activation, for gracevlm on CPU (fp32).
 *
 * Built into one library with gv_int8.c, gv_attn.c and gv_norm.c. Called through ctypes
 * (gracevlm/kernels/decode_layers.py).
 *
 * gv_silu_mul: out[r, j] = silu(gate[r, j]) * up[r, j], silu(x) = x * sigmoid(x), sigmoid from our own exp
 *   (below) on e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) for x < 0, so it is accurate for every x
 *   (within ~2 ulp of the exact value; torch's x / (1 + exp(-x)) differs at that level). The AVX2 and scalar
 *   paths run the same roundings in the same order (fmaf where the vector code has an FMA), so an element's
 *   bits depend on nothing but its inputs: not on the code path, the row count or its place in the row.
 *
 * gv_decode_layers: for n pre-norm decoder layers (LLaMA / Qwen3: RMSNorm, fused q/k/v projection, optional
 *   QK-norm, rotary, attention over the cached prefix, o_proj, residual, RMSNorm, fused gate/up projection,
 *   SwiGLU, down_proj, residual), one token of one sequence: x [D] is updated in place. Each step is the same
 *   C function the separate Python-driven calls make (gv_rms_norm, the linears' own matmul entry points
 *   through function pointers, gv_attn_block_decode, gv_silu_mul, fp32 adds), with the same arguments, in the
 *   same order, so the result is bitwise the layer-by-layer path's. What it saves is the Python between them.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
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
int gv_rms_norm(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy, int rows, int d, double eps);
int gv_attn_block_decode(const float *qkv, int H, int KVH, int d, const float *qw, const float *kw, double eps,
                         const float *c, const float *s, void *k, void *v, int64_t hs, int64_t ps, int S, int dt,
                         float scale, float *out, int nthreads);

/* exp(t) for t in [-87, 0] (callers clamp): t = n ln2 + r, |r| <= ln2/2, e^r by its degree-7 Taylor polynomial
 * in Horner form (truncation < 6e-9 relative), times 2^n built from the exponent bits. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
static const float exp_c[8] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};

static GV_NO_CONTRACT float sigmoid_scalar(float x) {
    GV_NO_CONTRACT_BODY
    float t = -fabsf(x);
    if (t < -87.f) t = -87.f;
    const float n = nearbyintf(t * EXP_LOG2E);
    float r = fmaf(-n, EXP_LN2_HI, t);
    r = fmaf(-n, EXP_LN2_LO, r);
    float p = exp_c[0];
    for (int i = 1; i < 8; i++) p = fmaf(p, r, exp_c[i]);
    union { uint32_t u; float f; } two = {(uint32_t)((int32_t)n + 127) << 23};
    const float e = p * two.f;
    const float one_e = 1.f + e;
    return x >= 0.f ? 1.f / one_e : e / one_e;
}

static GV_NO_CONTRACT void silu_mul_scalar(const float *g, const float *u, float *o, int n) {
    GV_NO_CONTRACT_BODY
    for (int j = 0; j < n; j++) {
        const float s = g[j] * sigmoid_scalar(g[j]);
        o[j] = s * u[j];
    }
}

#ifdef GV_X86
static GV_AVX2 void silu_mul_avx2(const float *g, const float *u, float *o, int n) {
    const __m256 sign = _mm256_set1_ps(-0.f), lo = _mm256_set1_ps(-87.f), l2e = _mm256_set1_ps(EXP_LOG2E);
    const __m256 hi_c = _mm256_set1_ps(EXP_LN2_HI), lo_c = _mm256_set1_ps(EXP_LN2_LO), one = _mm256_set1_ps(1.f);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 x = _mm256_loadu_ps(g + j);
        const __m256 t = _mm256_max_ps(_mm256_or_ps(x, sign), lo); /* -|x|, clamped */
        const __m256 nn = _mm256_round_ps(_mm256_mul_ps(t, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 neg = _mm256_xor_ps(nn, sign);
        __m256 r = _mm256_fmadd_ps(neg, hi_c, t);
        r = _mm256_fmadd_ps(neg, lo_c, r);
        __m256 p = _mm256_set1_ps(exp_c[0]);
        for (int i = 1; i < 8; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(exp_c[i]));
        const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(nn), _mm256_set1_epi32(127)), 23);
        const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
        const __m256 one_e = _mm256_add_ps(one, e);
        const __m256 pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GE_OQ);
        const __m256 sig = _mm256_div_ps(_mm256_blendv_ps(e, one, pos), one_e);
        _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + j)));
    }
    silu_mul_scalar(g + j, u + j, o + j, n - j);
}
#endif

/* gate rows of stride ldg, up rows of stride ldu, out rows of stride ldo (elements), rows x n. Returns 0 or -1. */
GV_API int gv_silu_mul(const float *gate, int64_t ldg, const float *up, int64_t ldu, float *out, int64_t ldo,
                       int rows, int n) {
    if (rows < 0 || n < 0 || ldg < n || ldu < n || ldo < n) return -1;
    for (int r = 0; r < rows; r++) {
        const float *g = gate + (size_t)r * ldg, *u = up + (size_t)r * ldu;
        float *o = out + (size_t)r * ldo;
#ifdef GV_X86
        if (gv8_isa() >= 2) {
            silu_mul_avx2(g, u, o, n);
            continue;
        }
#endif
        silu_mul_scalar(g, u, o, n);
    }
    return 0;
}

/* One linear's matmul entry point and its bound arguments (kernels/decode_layers.py fills these). kind 4:
 * gv_matmul(w0, I, O, g, ss, x, ldx, M, bias, y, mode, threads); kind 8: gv8_matmul(w0, w1, I, O, g, x, ldx,
 * M, bias, y, threads). */
typedef int (*matmul4_fn)(const void *, int, int, int, int, const float *, int64_t, int, const float *, float *,
                          int, int);
typedef int (*matmul8_fn)(const void *, const void *, int, int, int, const float *, int64_t, int, const float *,
                          float *, int);
typedef struct {
    void *fn;
    const void *w0, *w1;
    const float *bias;
    int64_t kind, in_f, out_f, group, ss, mode;
} gv_linear_t;

typedef struct {
    const float *in_norm, *post_norm, *q_norm, *k_norm; /* q_norm, k_norm: NULL without QK-norm */
    gv_linear_t qkv, o, gate_up, down;
} gv_layer_t;

static int run_linear(const gv_linear_t *L, const float *x, float *y, int nthreads) {
    if (L->kind == 4)
        return ((matmul4_fn)L->fn)(L->w0, (int)L->in_f, (int)L->out_f, (int)L->group, (int)L->ss, x, L->in_f, 1,
                                   L->bias, y, (int)L->mode, nthreads);
    if (L->kind == 8)
        return ((matmul8_fn)L->fn)(L->w0, L->w1, (int)L->in_f, (int)L->out_f, (int)L->group, x, L->in_f, 1,
                                   L->bias, y, nthreads);
    return -1;
}

static GV_NO_CONTRACT void add_into(float *x, const float *y, int n) {
    GV_NO_CONTRACT_BODY
    for (int i = 0; i < n; i++) x[i] = x[i] + y[i];
}

/* n layers (see the top): x [D] in/out; c, s [d] this position's rotary tables; the KV of layer l at
 * kv + l * layer_stride (K) and + v_offset (V) bytes, heads hs and positions ps elements apart, dt 0 fp32 /
 * 1 bf16; this token's K/V go to position S - 1 and attention spans 0..S-1. H, KVH heads of d; I the MLP
 * width; eps the norms' epsilon (qk_eps the QK-norm's). scratch: at least D + (H + 2 KVH) d + H d + D +
 * 3 I floats. Returns 0, or the first failing call's code (negative), or -1 for bad arguments. */
GV_API int gv_decode_layers(const gv_layer_t *layers, int n, int D, int H, int KVH, int d, int I, double eps,
                            double qk_eps, float *x, const float *c, const float *s, char *kv, int64_t layer_stride,
                            int64_t v_offset, int64_t hs, int64_t ps, int S, int dt, float scale, float *scratch,
                            int nthreads) {
    if (n < 0 || D <= 0 || H <= 0 || KVH <= 0 || d <= 0 || I <= 0 || S <= 0 || !x || !scratch) return -1;
    float *h = scratch, *qkv = h + D, *att = qkv + (size_t)(H + 2 * KVH) * d, *o = att + (size_t)H * d;
    float *gu = o + D, *m = gu + 2 * (size_t)I;
    for (int l = 0; l < n; l++) {
        const gv_layer_t *L = layers + l;
        char *k = kv + (size_t)l * layer_stride;
        int rc;
        if ((rc = gv_rms_norm(x, D, L->in_norm, h, D, 1, D, eps))) return rc;
        if ((rc = run_linear(&L->qkv, h, qkv, nthreads))) return rc;
        if ((rc = gv_attn_block_decode(qkv, H, KVH, d, L->q_norm, L->k_norm, qk_eps, c, s, k, k + v_offset, hs, ps,
                                       S, dt, scale, att, nthreads)))
            return rc;
        if ((rc = run_linear(&L->o, att, o, nthreads))) return rc;
        add_into(x, o, D);
        if ((rc = gv_rms_norm(x, D, L->post_norm, h, D, 1, D, eps))) return rc;
        if ((rc = run_linear(&L->gate_up, h, gu, nthreads))) return rc;
        gv_silu_mul(gu, 2 * (int64_t)I, gu + I, 2 * (int64_t)I, m, I, 1, I);
        if ((rc = run_linear(&L->down, m, o, nthreads))) return rc;
        add_into(x, o, D);
    }
    return 0;
}
