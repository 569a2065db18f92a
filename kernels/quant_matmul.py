"""Matmul with a quantized frozen weight in Triton, forward and backward, dequantizing inside the
GEMM's main loop: no dense copy of W exists in memory, only one (BLOCK_R, BLOCK_P) tile of it
in registers at a time.

    y  = x Wᵀ          x (M, K), W (N, K) quantized, y (M, N)
    dx = dy W          ∂L/∂x from dy = ∂L/∂y (M, N): W is needed again, read quantized again

W is frozen: there is no ∂L/∂W, so backward is the second GEMM only. Both GEMMs are one kernel,
`_quant_mm_kernel`: out (M, P) = a (M, R) · B with B = Wᵀ (forward: R = K, P = N) or B = W
(backward: R = N, P = K), B's tile built from W's storage by `_dequant`:

    int8   W[n, k] = s[n] · q[n, k]
    nf4    W[n, k] = NF4[code[n, k]] · absmax[n, k // 64]       (code: nibble k % 2 of byte k // 2)
           absmax = c · s2[(n · K/64 + k // 64) // 256] + offset   when double-quantized
    q8_0   W[n, k] = d · q                                       block k // 32, element k % 32
    q4_0   W[n, k] = d · (nib - 8)
    q4_1   W[n, k] = d · nib + m
(kernels/quant_reference.py states the byte layouts). The tile is computed in fp32, rounded to
the compute dtype once (as the reference `dequantize(W, x.dtype)` rounds), and fed to tl.dot
with fp32 accumulation; fp32 products are IEEE, not TF32.

Why gathers, not vectorised unpacking: every element's byte, scale and code-book entry is an
indexed load, so one kernel serves five layouts and both orientations, at the price of repeated
loads of the same byte and scale (served from L1). Unmeasured on a GPU so far: the bench
(bench/bench_quant.py) compares it with dequantize-then-cuBLAS.

Sources: Dettmers et al. 2022 (LLM.int8(), whose outlier split we leave out), 2023 (QLoRA: NF4,
double quantization); llama.cpp ggml-quants.c (Q8_0 / Q4_0 / Q4_1 blocks); Triton tutorial 03
(tiled matmul, grouped program order); kernels/lora_kernels.py (the interpreter's dot and
bf16 rounding).
"""

import torch
import triton
import triton.language as tl

from kernels.dispatch import INTERPRET as _INTERPRET
from kernels.lora_kernels import _dot, _grouped_tile, _round
from kernels.quant_reference import GGUF_BLOCK_BYTES, NF4, QWeight, check_input

FMT_IDS = {"int8": 0, "nf4": 1, "q8_0": 2, "q4_0": 3, "q4_1": 4}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _dequant(q_ptr, s_ptr, s2_ptr, cb_ptr, n, k, ok, K, offset, stride_qn, stride_sn,
             FMT: tl.constexpr, DQ: tl.constexpr):
    """fp32 W[n, k] for broadcastable int64 index tiles n, k (masked by ok, 0 outside)."""
    if FMT == 0:  # int8, per-row scale
        q = tl.load(q_ptr + n * stride_qn + k, mask=ok, other=0).to(tl.float32)
        w = q * tl.load(s_ptr + n + k * 0, mask=ok, other=0.0)
    elif FMT == 1:  # nf4, 64-value blocks
        byte = tl.load(q_ptr + n * stride_qn + k // 2, mask=ok, other=0).to(tl.int32)
        code = (byte >> ((k % 2) * 4).to(tl.int32)) & 0xF
        v = tl.load(cb_ptr + code, mask=ok, other=0.0)
        blk = k // 64
        if DQ:
            c = tl.load(s_ptr + n * stride_sn + blk, mask=ok, other=0).to(tl.float32)
            g = (n * (K // 64) + blk) // 256
            absmax = c * tl.load(s2_ptr + g, mask=ok, other=0.0) + offset
        else:
            absmax = tl.load(s_ptr + n * stride_sn + blk, mask=ok, other=0.0)
        w = v * absmax
    else:  # GGUF: q_ptr the row bytes, s_ptr the same bytes read as fp16 (stride in halves)
        blk = k // 32
        j = k % 32
        if FMT == 2:  # q8_0: fp16 d, 32 int8 (34 bytes = 17 halves)
            d = tl.load(s_ptr + n * stride_sn + blk * 17, mask=ok, other=0.0).to(tl.float32)
            q = tl.load(q_ptr + n * stride_qn + blk * 34 + 2 + j, mask=ok, other=0)
            w = d * q.to(tl.int8, bitcast=True).to(tl.float32)
        elif FMT == 3:  # q4_0: fp16 d, 16 bytes (18 bytes = 9 halves)
            d = tl.load(s_ptr + n * stride_sn + blk * 9, mask=ok, other=0.0).to(tl.float32)
            byte = tl.load(q_ptr + n * stride_qn + blk * 18 + 2 + j % 16, mask=ok,
                           other=0).to(tl.int32)
            nib = (byte >> ((j // 16) * 4).to(tl.int32)) & 0xF
            w = d * (nib.to(tl.float32) - 8.0)
        else:  # q4_1: fp16 d, fp16 m, 16 bytes (20 bytes = 10 halves)
            d = tl.load(s_ptr + n * stride_sn + blk * 10, mask=ok, other=0.0).to(tl.float32)
            m = tl.load(s_ptr + n * stride_sn + blk * 10 + 1, mask=ok, other=0.0).to(tl.float32)
            byte = tl.load(q_ptr + n * stride_qn + blk * 20 + 4 + j % 16, mask=ok,
                           other=0).to(tl.int32)
            nib = (byte >> ((j // 16) * 4).to(tl.int32)) & 0xF
            w = d * nib.to(tl.float32) + m
    return w


@triton.jit
def _quant_mm_kernel(
    a_ptr, q_ptr, s_ptr, s2_ptr, cb_ptr, out_ptr,  # pointers
    M, P, R, K, offset,  # sizes: a (M, R), out (M, P); K = W's in_features
    stride_am, stride_ar, stride_qn, stride_sn, stride_om, stride_op,  # strides
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    FMT: tl.constexpr, DQ: tl.constexpr, W_ROWS_ON_P: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """out = a · B, B[r, p] = W[p, r] (W_ROWS_ON_P: forward, y = x Wᵀ) or W[r, p] (backward,
    dx = dy W), each (BLOCK_R, BLOCK_P) tile of B dequantized from W's storage in the loop."""
    pid_m, pid_p = _grouped_tile(M, P, BLOCK_M, BLOCK_P, GROUP_M)  # W's column blocks in L2

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    m_ok = offs_m < M
    p_ok = offs_p < P
    cdt = a_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + offs_r
        r_ok = r < R
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + r[None, :] * stride_ar,
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        if W_ROWS_ON_P:
            n_idx, k_idx = offs_p[None, :], r[:, None]
        else:
            n_idx, k_idx = r[:, None], offs_p[None, :]
        w = _dequant(q_ptr, s_ptr, s2_ptr, cb_ptr, n_idx, k_idx, r_ok[:, None] & p_ok[None, :],
                     K, offset, stride_qn, stride_sn, FMT, DQ)
        acc = _dot(a, _round(w, cdt, ROUND_BF16), acc, UPCAST, IEEE, False)
    out = _round(acc, out_ptr.dtype.element_ty, ROUND_BF16)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op,
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & p_ok[None, :])


def _launch_config(dtype: torch.dtype, m: int, p: int, r: int) -> dict:
    """Block sizes. Unmeasured GPU defaults (no GPU run yet)."""
    if _INTERPRET:  # few, large tiles: the interpreter pays per program and per op
        def fit(v, hi):
            return min(hi, max(16, triton.next_power_of_2(v)))
        return dict(BLOCK_M=fit(m, 64), BLOCK_P=fit(p, 64), BLOCK_R=fit(r, 64))
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=128 if m > 64 else 64, BLOCK_P=128, BLOCK_R=64, num_warps=8,
                    num_stages=3)
    return dict(BLOCK_M=64, BLOCK_P=64, BLOCK_R=32, num_warps=4, num_stages=2)


def _storage_args(qw: QWeight):
    """(q, s, s2, code book, stride_qn, stride_sn) for the kernel from a QWeight."""
    cb = NF4.to(qw.data.device)
    if qw.fmt in GGUF_BLOCK_BYTES:
        data = qw.data if qw.data.is_contiguous() else qw.data.contiguous()
        halves = data.view(torch.float16)  # each block is an even number of bytes: d, m align
        q = data.view(torch.int8) if qw.fmt == "q8_0" else data
        return q, halves, cb, cb, data.stride(0), halves.stride(0)
    if qw.data.stride(-1) != 1 or (qw.scales.dim() == 2 and qw.scales.stride(-1) != 1):
        raise ValueError("quant_matmul: quantized storage must be row-contiguous")
    s2 = qw.scales2 if qw.scales2 is not None else cb  # cb: never read
    stride_s = qw.scales.stride(0) if qw.scales.dim() == 2 else 1
    return qw.data, qw.scales, s2, cb, qw.data.stride(0), stride_s


def _check(x: torch.Tensor, qw: QWeight, backward: bool = False):
    if backward:  # dy (..., N): check it as an input of the transposed product
        check_input(x, qw._replace(n=qw.k, k=qw.n), "quant_matmul backward")
    else:
        check_input(x, qw, "quant_matmul")
    if not (x.is_cuda or (_INTERPRET and x.device.type == "cpu")):
        raise RuntimeError(f"quant_matmul: the Triton kernel needs CUDA tensors (or "
                           f"TRITON_INTERPRET=1 on CPU), got {x.device}; use "
                           f"quant_linear_reference (torch) elsewhere")
    if x.dtype not in _DTYPES:
        raise TypeError(f"quant_matmul: x must be one of {_DTYPES}, got {x.dtype} (fp64 has "
                        f"the torch path, quant_linear_reference)")
    if qw.fmt not in FMT_IDS:
        raise ValueError(f"quant_matmul: unknown format {qw.fmt!r}; choose among "
                         f"{tuple(FMT_IDS)}")


def _run(a2: torch.Tensor, qw: QWeight, forward: bool) -> torch.Tensor:
    m, r = a2.shape
    p = qw.n if forward else qw.k
    out = torch.empty((m, p), dtype=a2.dtype, device=a2.device)
    if m == 0:
        return out
    q, s, s2, cb, stride_qn, stride_sn = _storage_args(qw)
    cfg = _launch_config(a2.dtype, m, p, r)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(p, cfg["BLOCK_P"]),)
    _quant_mm_kernel[grid](
        a2, q, s, s2, cb, out,
        m, p, r, qw.k, float(qw.offset),
        *a2.stride(), stride_qn, stride_sn, *out.stride(),
        GROUP_M=8, FMT=FMT_IDS[qw.fmt], DQ=qw.scales2 is not None, W_ROWS_ON_P=forward,
        UPCAST=_INTERPRET and a2.dtype != torch.float32, IEEE=a2.dtype == torch.float32,
        ROUND_BF16=_INTERPRET and a2.dtype == torch.bfloat16, **cfg,
    )
    return out


def quant_matmul_forward(x: torch.Tensor, qw: QWeight) -> torch.Tensor:
    """y = x Wᵀ, (..., K) -> (..., N) in x's dtype."""
    _check(x, qw)
    return _run(x.reshape(-1, qw.k), qw, True).reshape(*x.shape[:-1], qw.n)


def quant_matmul_backward(dy: torch.Tensor, qw: QWeight) -> torch.Tensor:
    """∂L/∂x = dy W, (..., N) -> (..., K) in dy's dtype."""
    _check(dy, qw, backward=True)
    return _run(dy.reshape(-1, qw.n), qw, False).reshape(*dy.shape[:-1], qw.k)


class QuantMatmulFunction(torch.autograd.Function):
    """apply(x, qw): y = x Wᵀ; backward returns ∂L/∂x only (W is frozen storage, no grad)."""

    @staticmethod
    def forward(ctx, x, qw):
        ctx.qw = qw  # the quantized tensors, no copy; nothing dense is saved
        return quant_matmul_forward(x, qw)

    @staticmethod
    def backward(ctx, dy):
        return quant_matmul_backward(dy, ctx.qw), None


quant_matmul = QuantMatmulFunction.apply
