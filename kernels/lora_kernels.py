"""The Triton kernels of the fused LoRA linear (maths, launches and design: kernels/lora.py).

Kernel arguments are grouped by role: pointers, sizes, strides, constexpr flags. Every product
accumulates in fp32 (fp64 for fp64 inputs).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr, FP64: tl.constexpr):
    if FP64:
        # fp64 (used by gradcheck only) multiplies and reduces without tl.dot: Triton 3.7's fp64
        # MMA asserts ("fp64 don't support largeK MMA") when an operand comes from registers.
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    # The interpreter's bf16 tl.dot multiplies raw bit patterns (Triton #11584): there 16-bit
    # tiles go through fp32, which holds their products exactly.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
    return acc


@triton.jit
def _round(t, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    # Round t to dtype. The interpreter truncates fp32 -> bf16 where GPUs round to nearest even;
    # there (ROUND_BF16) round on the fp32 bits and keep the fp32 tile, which _dot upcasts anyway.
    if ROUND_BF16:
        bits = t.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return t.to(dtype)


@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) of an (M, N) output in grouped order (Triton
    tutorial 03): GROUP_M row tiles run one after another on each column tile, so the column
    block of the right-hand matrix they all read stays in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _lora_down_kernel(
    x_ptr, a_ptr, mask_ptr, out_ptr,  # pointers
    M, K, R, scale,  # sizes
    stride_xm, stride_xk, stride_ar, stride_ak, stride_mm, stride_mk, stride_om, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC_FP64: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """out (M, R) = scale · (x ∘ m) Aᵀ with x (M, K), A (R, K); one program per BLOCK_M rows.

    Forward: xa = drop(x) Aᵀ (scale = 1 / (1 - p)). Backward: g = s · dy B (x := dy, A := Bᵀ
    by strides, no mask). out is fp32 (fp64 for fp64 inputs)."""
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        xk_ok = m_ok[:, None] & (k < K)[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=xk_ok, other=0.0)
        if HAS_MASK:
            keep = tl.load(mask_ptr + offs_m[:, None] * stride_mm + k[None, :] * stride_mk,
                           mask=xk_ok, other=0)
            x = tl.where(keep != 0, x, tl.zeros_like(x))
        # A tile read transposed, (BLOCK_K, BLOCK_R), rounded to the compute dtype.
        a_t = tl.load(a_ptr + offs_r[None, :] * stride_ar + k[:, None] * stride_ak,
                      mask=r_ok[None, :] & (k < K)[:, None], other=0.0)
        acc = _dot(x, _round(a_t, x_ptr.dtype.element_ty, ROUND_BF16), acc, UPCAST, IEEE, ACC_FP64)
    acc = acc * scale
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or, acc,
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _matmul_lowrank(
    a_ptr, b_ptr, l_ptr, u_ptr, mask_ptr, out_ptr,
    M, N, K, R, scale,
    stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_ur, stride_un,
    stride_mm, stride_mn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ACC_FP64: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    # out (M, N) = a (M, K) @ b (K, N) + scale · [m ∘] (l (M, R) @ u (R, N)), one tile per program.
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    n_ok = offs_n < N
    cdt = a_ptr.dtype.element_ty
    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(k < K)[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, UPCAST, IEEE, ACC_FP64)

    # Epilogue: the rank-R term, reduced over BLOCK_R (≥ 16, the smallest tl.dot) in one dot.
    r_ok = offs_r < R
    low = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                  mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    up = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    up = _round(up, cdt, ROUND_BF16)
    out_ok = m_ok[:, None] & n_ok[None, :]
    if HAS_MASK:
        lora = tl.zeros_like(acc)
        lora = _dot(_round(low, cdt, ROUND_BF16), up, lora, UPCAST, IEEE, ACC_FP64)
        keep = tl.load(mask_ptr + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                       mask=out_ok, other=0)
        acc += tl.where(keep != 0, lora * scale, tl.zeros_like(lora))
    else:
        acc = _dot(_round(low * scale, cdt, ROUND_BF16), up, acc, UPCAST, IEEE, ACC_FP64)
    # Rounded to nearest here, the interpreter's truncating store of a bf16 value is exact.
    out = _round(acc, out_ptr.dtype.element_ty, ROUND_BF16)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, xa_ptr, b_ptr, y_ptr,  # pointers
    M, N, K, R, scale,  # sizes
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xam, stride_xar, stride_bn, stride_br,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC_FP64: tl.constexpr,
    ROUND_BF16: tl.constexpr,
):
    """y = x Wᵀ + s · xa Bᵀ: GEMM over K with Wᵀ read through W's strides, then the rank-r
    epilogue with Bᵀ read through B's strides. xa = drop(x) Aᵀ comes from _lora_down_kernel."""
    _matmul_lowrank(
        x_ptr, w_ptr, xa_ptr, b_ptr, x_ptr, y_ptr,
        M, N, K, R, scale,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_xam, stride_xar, stride_br, stride_bn,
        0, 0, stride_ym, stride_yn,
        BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, False, UPCAST, IEEE, ACC_FP64, ROUND_BF16,
    )


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, mask_ptr, dx_ptr,  # pointers
    M, N, K, R, keep_scale,  # sizes: dy (M, N), W (N, K), g (M, R), A (R, K)
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_mm, stride_mk, stride_dxm, stride_dxk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ACC_FP64: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """∂L/∂x = dy W + (g A) ∘ m / (1 - p), g = s · dy B from _lora_down_kernel: GEMM reducing
    over N, then the rank-r epilogue; the mask applies to the adapter term only."""
    _matmul_lowrank(
        dy_ptr, w_ptr, g_ptr, a_ptr, mask_ptr, dx_ptr,
        M, K, N, R, keep_scale,
        stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
        stride_mm, stride_mk, stride_dxm, stride_dxk,
        BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, GROUP_M, HAS_MASK, UPCAST, IEEE, ACC_FP64,
        ROUND_BF16,
    )
