"""The Triton programs of the ``triton`` backend (imported only when that backend first runs, so that
``TRITON_INTERPRET`` set before then takes effect; see ``triton_w4a16``).

Weights: ``qw [K, N/8]`` int32 with 8 consecutive output columns per word, column ``8c + j`` in nibble ``j``
(the AWQ words with their nibbles put in logical order once at load); optional zero points ``zp [K/G, N]``
uint8 (None for GRACE layers, whose zero point is 8 everywhere); scales ``s [K/G, N]`` as stored (fp16).

Both programs compute, per group ``g`` of ``G`` inputs, ``acc_g = sum_k x[m, k] * (u[k, n] - z[g, n])`` (the
integer codes are exact in fp16/bf16/fp32, every product is exact in fp32, sums are fp32), then
``acc += acc_g * s[g, n]`` in fp32: the weights are exactly those of ``reference``; only the order of the
fp32 sums differs. Split-K: program ``(.., .., k)`` takes a contiguous range of groups and writes its fp32
partial sums ``part[k, m, n]``; ``_w4a16_reduce`` adds them in a fixed order (deterministic), adds the bias
and casts. With one split the epilogue is fused (bias, cast, store).
"""
import triton
import triton.language as tl


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k, stride_ps,
              SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # fp32 partial sums of this split
        ptrs = out_ptr + pid_k * stride_ps + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def w4a16_gemv_kernel(x_ptr, qw_ptr, zp_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_ps,
                      groups_per_split,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Few rows (decode): each program reads its ``[K range, BLOCK_N]`` tile of codes once and applies it to
    all ``BLOCK_M`` rows with fp32 multiply-adds (no tensor cores: the rows are too few)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = (offs_n % 8) * 4
    word_n = offs_n // 8
    n_groups = K // GROUP
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, n_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_ZEROS:
            z = tl.load(zp_ptr + g * N + offs_n, mask=mask_n, other=8).to(tl.int32)
        else:
            z = tl.full((BLOCK_N,), 8, tl.int32)
        for k0 in tl.static_range(0, GROUP, BLOCK_K):
            offs_k = g * GROUP + k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None],
                        other=0.0).to(tl.float32)
            w = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + word_n[None, :], mask=mask_n[None, :], other=0)
            q = (((w >> shifts[None, :]) & 0xF) - z[None, :]).to(tl.float32)
            acc_g += tl.sum(x[:, :, None] * q[None, :, :], axis=1)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += acc_g * s[None, :]
    _epilogue(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k, stride_ps, SPLIT_K, HAS_BIAS)


@triton.jit
def w4a16_gemm_kernel(x_ptr, qw_ptr, zp_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_ps,
                      groups_per_split,
                      GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Many rows (prefill): tiles ``[BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]`` on the tensor cores; each code
    tile is turned into exact integers ``u - z`` in registers, in x's dtype (fp16/bf16 hold them exactly), and
    the group scale is applied to the fp32 group sum. ``IEEE``: fp32 activations use exact fp32 products
    rather than TF32. ``UPCAST`` (Triton's CPU interpreter only, whose ``dot`` multiplies the raw bits of bf16
    values): both operands go to fp32 first, which keeps them exact."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shifts = (offs_n % 8) * 4
    word_n = offs_n // 8
    n_groups = K // GROUP
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, n_groups)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(g_start, g_end):
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_ZEROS:
            z = tl.load(zp_ptr + g * N + offs_n, mask=mask_n, other=8).to(tl.int32)
        else:
            z = tl.full((BLOCK_N,), 8, tl.int32)
        for k0 in tl.static_range(0, GROUP, BLOCK_K):
            offs_k = g * GROUP + k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
            w = tl.load(qw_ptr + offs_k[:, None] * (N // 8) + word_n[None, :], mask=mask_n[None, :], other=0)
            q = ((w >> shifts[None, :]) & 0xF) - z[None, :]
            if UPCAST:
                acc_g = tl.dot(x.to(tl.float32), q.to(tl.float32), acc_g, input_precision="ieee")
            elif IEEE:
                acc_g = tl.dot(x, q.to(x.dtype), acc_g, input_precision="ieee")
            else:
                acc_g = tl.dot(x, q.to(x.dtype), acc_g)
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += acc_g * s[None, :]
    _epilogue(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, pid_k, stride_ps, SPLIT_K, HAS_BIAS)


@triton.jit
def w4a16_reduce_kernel(part_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """``out = sum_k part[k] (+ bias)``, the splits added in order 0..SPLIT_K-1, cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for k in tl.static_range(1, SPLIT_K):
        acc += tl.load(part_ptr + k * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
