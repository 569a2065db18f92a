"""Fused LoRA linear layer in Triton, forward and backward.

    y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ,        s = alpha / r

x (M, K) is the input with any leading batch shape flattened into M, W (N, K) the frozen base
weight, A (r, K) and B (N, r) the adapter. drop(x) = x ∘ m / (1 - p) with a 0/1 mask m of x's
shape, and drop(x) = x when dropout is off. Dropout touches only the adapter's input (as in
peft's lora.Linear); the base path always sees x.

Chain rule, with dy = ∂L/∂y (M, N), xa = drop(x) Aᵀ (M, r) and g = s · dy B (M, r):
    y = x Wᵀ + s · xa Bᵀ       ⇒  ∂L/∂xa     = s · dy B = g
                                   ∂L/∂B      = s · dyᵀ xa
    xa = drop(x) Aᵀ            ⇒  ∂L/∂A      = gᵀ drop(x)           = gᵀ (x ∘ m) / (1 - p)
                                   ∂L/∂drop(x) = g A
    drop(x) = x ∘ m / (1 - p)  ⇒  ∂L/∂x      = dy W + (g A) ∘ m / (1 - p)
W is frozen: there is no ∂L/∂W, and lora_linear refuses a W that requires grad instead of
silently dropping its gradient.

Launches. Forward: `_lora_down_kernel` computes xa (fp32) reading x and the mask once;
`_lora_fwd_kernel` is a tiled GEMM x Wᵀ whose epilogue adds s · xa Bᵀ, so y is written once and
no (M, N) LoRA intermediate exists. Backward: `_lora_down_kernel` on dy and Bᵀ gives g;
`_lora_bwd_dx_kernel` is the GEMM dy W whose epilogue adds (g A) ∘ m / (1 - p); ∂L/∂A and ∂L/∂B
are torch matmuls on the saved (M, r) tensors.

Why xa (and g) is its own pass instead of being accumulated inside the GEMM's K loop: in-loop,
every one of the N / BLOCK_N column programs would recompute the same xa tile, an extra
BLOCK_R / BLOCK_N of tensor-core work (r = 8 pads to 16: +12.5% at BLOCK_N = 128; r = 64: +50%),
hold a second accumulator in registers, re-read the dropout mask N / BLOCK_N times and route the
x tile through registers before its dot. The separate pass costs one extra read of x, whatever r
is (about 64 MB, ~15 µs on an H200, at M = 8192, K = 4096: a few % of the GEMM).
Why ∂L/∂A and ∂L/∂B are torch matmuls: they are rank-r products reducing over M, the long axis.
In Triton they need either a split over M with atomics (fp32 atomics make the result
nondeterministic; bf16 atomics do not exist) or only K / BLOCK_K programs; cuBLAS already splits
such skinny products well. The cost is one more read of x (and the mask) and of dy.
Both arguments are estimates: no GPU has measured them yet (bench/bench_lora.py will).

Dropout contract: the mask is a bool tensor of x's shape made by torch (`make_dropout_mask`, or
passed in), not Philox inside the kernel. The reference and the interpreter reproduce it bit for
bit, on any Triton version. Its memory cost is M·K bytes kept from forward to backward (half a
bf16 x: 90 MB at 8192 × 11008) plus one RNG pass; in-kernel Philox would save that and is left
for when a GPU run shows it matters. p = 0 or training=False takes a path with no mask at all.

Dtype contract: x and W share the compute dtype (fp16, bf16, fp32 or fp64). A and B share a
floating dtype that may differ (fp32 adapters with bf16 activations, as under autocast); the
kernels round them to the compute dtype, as autocast would. Every product accumulates in fp32
(fp64 for fp64) and fp32 products are IEEE, not TF32; xa and g stay fp32 and are rounded to the
compute dtype only as operands of the next product. y and ∂L/∂x have x's dtype, ∂L/∂A has A's
dtype, ∂L/∂B has B's dtype. fp64 (meant for gradcheck) runs on CUDA cores without tl.dot.

Sources: Hu et al. 2021 (LoRA); Triton tutorial 03 (tiled matmul, grouped program order, masked
loads); Liger-Kernel ops/ (kernel → launcher → autograd.Function layout); unsloth
kernels/fast_lora.py (LoRA_W: the backward written with the low-rank factors kept apart, never
forming W + s·BA); peft tuners/lora (dropout on the adapter input only).
"""

import os

import torch
import triton
import triton.language as tl

# The torch maths and the dropout mask are shared with the model's CPU path.
from model.lora import lora_reference, make_dropout_mask

# Triton decides at decoration time whether @triton.jit builds an interpreted function, from
# this variable; read it the same way, once.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Fallback rule (see `fused_is_faster`). Unmeasured: no GPU has timed these yet.
MIN_FUSED_TOKENS = 64
MAX_FUSED_RANK = 128


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
    # Grouped program order (tutorial 03): GROUP_M row-tiles share each column of b in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

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


def _check_inputs(x, weight, lora_a, lora_b, dropout_p, dropout_mask):
    """Shared by the fused path and the reference, so both reject the same inputs."""
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 1 or weight.dim() != 2 or lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(
            "lora_linear: expected x (..., K), weight (N, K), lora_a (r, K), lora_b (N, r); got "
            f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, lora_a {tuple(lora_a.shape)}, "
            f"lora_b {tuple(lora_b.shape)}")
    (n, k), r = weight.shape, lora_a.shape[0]
    if x.shape[-1] != k or lora_a.shape[1] != k or lora_b.shape != (n, r):
        raise ValueError(
            f"lora_linear: shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)} "
            f"(N, K), lora_a {tuple(lora_a.shape)} (r, K), lora_b {tuple(lora_b.shape)} (N, r)")
    devices = {t.device for t in (x, weight, lora_a, lora_b)}
    if len(devices) != 1:
        raise ValueError(f"lora_linear: tensors on different devices: {sorted(map(str, devices))}")
    if x.dtype not in _COMPUTE_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: x and weight must share one of {_COMPUTE_DTYPES}, got "
                        f"{x.dtype} and {weight.dtype} (cast the weight once, not per call)")
    if not lora_a.dtype.is_floating_point or lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_linear: lora_a and lora_b must share a floating dtype, got "
                        f"{lora_a.dtype} and {lora_b.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_mask is not None:
        if dropout_p == 0.0:
            raise ValueError("lora_linear: dropout_mask given but dropout is off "
                             "(dropout_p == 0 or training=False)")
        if (dropout_mask.dtype != torch.bool or dropout_mask.shape != x.shape
                or dropout_mask.device != x.device):
            raise ValueError(f"lora_linear: dropout_mask must be bool with x's shape "
                             f"{tuple(x.shape)} on {x.device}, got {dropout_mask.dtype} "
                             f"{tuple(dropout_mask.shape)} on {dropout_mask.device}")


def use_triton(x: torch.Tensor, *, allow_interpreter: bool = False) -> bool:
    """Whether the fused kernels can run on x: CUDA tensors, or CPU tensors when the caller
    asks for it and TRITON_INTERPRET=1 was set before this module was imported."""
    return x.is_cuda or (allow_interpreter and _INTERPRET and x.device.type == "cpu")


def fused_is_faster(num_tokens: int, rank: int) -> bool:
    """Fallback hook: False where the plain-torch path should be used instead.

    Deliberately simple and unmeasured (no GPU yet): below MIN_FUSED_TOKENS rows the layer is a
    weight-bandwidth-bound GEMV that cuBLAS handles better than 128-row tiles, and above
    MAX_FUSED_RANK the (BLOCK_M, r) and (r, BLOCK_N) epilogue tiles crowd the registers."""
    return num_tokens >= MIN_FUSED_TOKENS and rank <= MAX_FUSED_RANK


def _launch_config(dtype: torch.dtype, m: int, n: int, k: int) -> tuple[dict, dict]:
    """Block sizes for the GEMM kernels and the down kernel. Unmeasured GPU defaults."""
    if _INTERPRET:
        # The interpreter pays per program and per op; numpy does the tile work, so use few,
        # large tiles.
        def fit(v, hi):
            return min(hi, max(16, triton.next_power_of_2(v)))
        gemm = dict(BLOCK_M=fit(m, 64), BLOCK_N=fit(n, 128), BLOCK_K=fit(k, 128))
        return gemm, dict(BLOCK_M=fit(m, 64), BLOCK_K=fit(k, 128))
    if dtype in (torch.float16, torch.bfloat16):
        gemm = dict(BLOCK_M=128 if m > 64 else 64, BLOCK_N=128, BLOCK_K=64,
                    num_warps=8, num_stages=3)
        return gemm, dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3)
    if dtype == torch.float32:  # IEEE fp32 runs on CUDA cores: smaller tiles
        return (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
                dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=2))
    return (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2),
            dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2))


def _flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=_INTERPRET and dtype in (torch.float16, torch.bfloat16),
                IEEE=dtype in (torch.float32, torch.float64), ACC_FP64=dtype == torch.float64,
                ROUND_BF16=_INTERPRET and dtype == torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _down(x2, a_ptr, r, a_strides, mask2, scale):
    """(M, r) = scale · (x2 ∘ mask2) aᵀ, a the (r, K) matrix read from a_ptr through strides."""
    m, k = x2.shape
    out = torch.empty((m, r), dtype=_acc_dtype(x2.dtype), device=x2.device)
    _, cfg = _launch_config(x2.dtype, m, r, k)
    mask_arg = mask2.view(torch.uint8) if mask2 is not None else x2  # x2: never read
    mask_strides = mask2.stride() if mask2 is not None else (0, 0)
    _lora_down_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x2, a_ptr, mask_arg, out,
        m, k, r, scale,
        *x2.stride(), *a_strides, *mask_strides, *out.stride(),
        BLOCK_R=max(16, triton.next_power_of_2(r)), HAS_MASK=mask2 is not None,
        **_flags(x2.dtype), **cfg,
    )
    return out


def _gemm_grid(m, n, cfg):
    return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)


def lora_forward(x, weight, lora_a, lora_b, scale, dropout_p=0.0, dropout_mask=None):
    """y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ. Returns (y, x2, mask2, xa): y with x's leading shape and
    dtype, and what the backward needs (x and the mask flattened to 2-D, xa in fp32)."""
    _check_inputs(x, weight, lora_a, lora_b, dropout_p, dropout_mask)
    if not use_triton(x, allow_interpreter=True):
        raise RuntimeError("lora_linear: the Triton kernels need CUDA tensors (or "
                           "TRITON_INTERPRET=1 on CPU); use lora_linear_reference elsewhere")
    (n, k), r = weight.shape, lora_a.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    mask2 = dropout_mask.reshape(m, k) if dropout_mask is not None else None
    keep_scale = 1.0 / (1.0 - dropout_p) if mask2 is not None else 1.0
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n), x2, mask2, x2.new_empty((0, r), dtype=torch.float32)
    xa = _down(x2, lora_a, r, lora_a.stride(), mask2, keep_scale)
    cfg, _ = _launch_config(x.dtype, m, n, k)
    _lora_fwd_kernel[_gemm_grid(m, n, cfg)](
        x2, weight, xa, lora_b, y,
        m, n, k, r, scale,
        *x2.stride(), *weight.stride(), *xa.stride(), *lora_b.stride(), *y.stride(),
        BLOCK_R=max(16, triton.next_power_of_2(r)), GROUP_M=8, **_flags(x.dtype), **cfg,
    )
    return y.reshape(*x.shape[:-1], n), x2, mask2, xa


def lora_backward(dy, x2, weight, lora_a, lora_b, xa, scale, dropout_p, mask2,
                  needs=(True, True, True)):
    """(∂L/∂x as (M, K), ∂L/∂A, ∂L/∂B) from dy (..., N); an entry is None where `needs`
    (x, A, B) says it is not wanted."""
    (n, k), r = weight.shape, lora_a.shape[0]
    m = x2.shape[0]
    dy2 = dy.reshape(m, n).to(x2.dtype)
    keep_scale = 1.0 / (1.0 - dropout_p) if mask2 is not None else 1.0
    need_dx, need_da, need_db = needs
    dx = da = db = None
    if m == 0:
        return (x2.new_zeros((0, k)) if need_dx else None,
                torch.zeros_like(lora_a) if need_da else None,
                torch.zeros_like(lora_b) if need_db else None)
    if need_dx or need_da:
        # g = s · dy B, with B read as the (r, N) matrix Bᵀ through its strides.
        g = _down(dy2, lora_b, r, (lora_b.stride(1), lora_b.stride(0)), None, scale)
    if need_dx:
        dx = torch.empty((m, k), dtype=x2.dtype, device=x2.device)
        cfg, _ = _launch_config(x2.dtype, m, k, n)
        mask_arg = mask2.view(torch.uint8) if mask2 is not None else dy2  # dy2: never read
        _lora_bwd_dx_kernel[_gemm_grid(m, k, cfg)](
            dy2, weight, g, lora_a, mask_arg, dx,
            m, n, k, r, keep_scale,
            *dy2.stride(), *weight.stride(), *g.stride(), *lora_a.stride(),
            *(mask2.stride() if mask2 is not None else (0, 0)), *dx.stride(),
            BLOCK_R=max(16, triton.next_power_of_2(r)), GROUP_M=8,
            HAS_MASK=mask2 is not None, **_flags(x2.dtype), **cfg,
        )
    cdt = x2.dtype
    if need_da:  # gᵀ (x ∘ m) / (1 - p); x ∘ m is exact, 1 / (1 - p) folded into g in fp32
        xm = x2 if mask2 is None else x2 * mask2
        da = ((g * keep_scale).to(cdt).t() @ xm).to(lora_a.dtype)
    if need_db:  # s · dyᵀ xa
        db = (dy2.t() @ (xa * scale).to(cdt)).to(lora_b.dtype)
    return dx, da, db


class LoRAFunction(torch.autograd.Function):
    """Autograd wrapper: apply(x, weight, lora_a, lora_b, scale, dropout_p, dropout_mask), all
    positional; dropout_mask is None exactly when dropout is off. Prefer `lora_linear`."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, dropout_p, dropout_mask):
        y, x2, mask2, xa = lora_forward(x, weight, lora_a, lora_b, scale, dropout_p, dropout_mask)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, xa, mask2)
        ctx.scale, ctx.dropout_p, ctx.x_shape = scale, dropout_p, x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, xa, mask2 = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        dx, da, db = lora_backward(dy, x2, weight, lora_a, lora_b, xa, ctx.scale,
                                   ctx.dropout_p, mask2, needs)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return dx, None, da, db, None, None, None


def lora_linear(x, weight, lora_a, lora_b, scale, dropout_p=0.0, training=True,
                dropout_mask=None):
    """Fused y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ (Triton). Dropout is active iff training and
    dropout_p > 0; then a mask is drawn with `make_dropout_mask` unless one is given."""
    p = float(dropout_p) if training else 0.0
    _check_inputs(x, weight, lora_a, lora_b, p, dropout_mask)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_linear: weight requires grad, but the base weight is frozen and "
                         "no gradient is computed for it; call weight.requires_grad_(False)")
    if p > 0.0 and dropout_mask is None:
        dropout_mask = make_dropout_mask(x, p)
    return LoRAFunction.apply(x, weight, lora_a, lora_b, float(scale), p, dropout_mask)


def lora_linear_reference(x, weight, lora_a, lora_b, scale, dropout_p=0.0, training=True,
                          dropout_mask=None):
    """Plain-torch lora_linear, same signature, maths and dtype contract; autograd does the
    backward. Used by tests, benchmarks, and by the model off CUDA."""
    p = float(dropout_p) if training else 0.0
    _check_inputs(x, weight, lora_a, lora_b, p, dropout_mask)
    return lora_reference(x, weight, lora_a, lora_b, scale, p, dropout_mask)
