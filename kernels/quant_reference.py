"""Quantized frozen weights in plain torch: the storage formats, dequantization, and the
dequantize-per-call linear layer that is the CPU path and the maths `kernels/quant_matmul.py`
is checked against. Imports torch only (the CPU path needs no Triton).

A weight W (N, K) (out × in, as nn.Linear) is stored in one of five formats; blocks run along
K, so a block never crosses a row:

    int8   q int8 (N, K), s fp32 (N,):          W[n, k] = s[n] · q[n, k]
           weight-only absmax per output channel, s = max_k |W[n, k]| / 127. No outlier split:
           unlike bitsandbytes' LLM.int8() (Dettmers et al. 2022) no column runs in fp16, every
           input feature goes through the int8 weights (and x stays in the compute dtype).
    nf4    codes uint8 (N, K/2), two 4-bit codes a byte (element 2j low nibble, 2j+1 high),
           absmax fp32 (N, K/64):              W[n, k] = NF4[code[n, k]] · absmax[n, k // 64]
           QLoRA's 4-bit NormalFloat (Dettmers et al. 2023) with 64-value blocks. Double
           quantization (optional) stores absmax as int8 c (N, K/64) with one fp32 scale s2 per
           256 consecutive blocks (row-major) and one fp32 offset: absmax = c · s2[g] + offset.
           QLoRA quantizes the second level to 8-bit floats; ours is a linear int8 code.
    q8_0   GGUF block of 32: fp16 d, 32 int8 q            (34 bytes):  w = d · q
    q4_0   GGUF block of 32: fp16 d, 16 bytes of nibbles  (18 bytes):  w = d · (nib - 8)
    q4_1   GGUF block of 32: fp16 d, fp16 m, 16 bytes     (20 bytes):  w = d · nib + m
           (llama.cpp ggml-quants.c; in a 16-byte run, element j < 16 is the low nibble of byte
           j and element j + 16 its high nibble). The bytes are kept exactly as in the file:
           data uint8 (N, K/32 · block bytes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels.cpu_bf16 import linear

NF4_BLOCK = 64
NF4_DQ_GROUP = 256  # blocks per second-level scale (QLoRA's double quantization)
GGUF_BLOCK = 32
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
FORMATS = ("int8", "nf4", "q8_0", "q4_0", "q4_1")


def nf4_code() -> torch.Tensor:
    """QLoRA's NF4 values (Dettmers et al. 2023, §3 and appendix E), from the definition: the
    quantiles of N(0, 1), an asymmetric code with 8 positive and 7 negative levels and an exact
    zero, normalised to [-1, 1]. The outermost quantile is taken at the offset
    δ = ½ (1 - 1/(2·15) + 1 - 1/(2·16)), halfway between the two halves' sample-quantile rules,
    so that ±1 are finite."""
    delta = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    ndtri = torch.special.ndtri
    pos = ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64)[:-1])  # 8 positive levels
    neg = -ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64)[:-1])  # 7 negative levels
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)])
    v = v / v.abs().max()
    return v.sort().values.to(torch.float32)


NF4 = nf4_code()


class QWeight(NamedTuple):
    """A quantized (N, K) weight: `fmt` among FORMATS, `data` the codes (int8, or uint8 bytes),
    `scales` (int8: (N,) fp32; nf4: absmax (N, K/64) fp32, or int8 codes when double-quantized;
    GGUF: None, the scales live inside `data`), `scales2` (nf4 double quantization: fp32 per
    256 blocks, else None), `offset` (the same: the absmax mean)."""
    fmt: str
    n: int
    k: int
    data: torch.Tensor
    scales: torch.Tensor | None = None
    scales2: torch.Tensor | None = None
    offset: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.data, self.scales, self.scales2) if t is not None)


def block_size(fmt: str) -> int:
    """How many consecutive K elements share a scale (int8: the whole row; 1 = any K)."""
    return {"int8": 1, "nf4": NF4_BLOCK}.get(fmt, GGUF_BLOCK)


def storage_bytes(fmt: str, n: int, k: int, double_quant: bool = False) -> int:
    """Bytes an (n, k) weight takes in `fmt` (what QWeight.nbytes counts; the planner's count)."""
    if fmt == "int8":
        return n * k + 4 * n  # int8 codes + an fp32 scale per row
    if fmt == "nf4":
        blocks = n * k // NF4_BLOCK
        if double_quant:  # int8 absmax codes + an fp32 scale per 256 blocks
            return n * k // 2 + blocks + 4 * math.ceil(blocks / NF4_DQ_GROUP)
        return n * k // 2 + 4 * blocks
    if fmt in GGUF_BLOCK_BYTES:
        return n * k // GGUF_BLOCK * GGUF_BLOCK_BYTES[fmt]
    raise ValueError(f"unknown quantized format {fmt!r}; choose among {FORMATS}")


def check_shape(fmt: str, n: int, k: int, what: str = "weight"):
    b = block_size(fmt)
    if k % b:
        raise ValueError(f"{what}: in_features {k} is not divisible by the {fmt} block size {b} "
                         f"(the blocks run along the input dimension); use --quant int8, which "
                         f"takes any shape")


# -- quantizers (dense fp -> QWeight) --------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> QWeight:
    w = w.float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QWeight("int8", w.shape[0], w.shape[1], q.contiguous(), scale.contiguous())


def quantize_nf4(w: torch.Tensor, double_quant: bool = False) -> QWeight:
    n, k = w.shape
    check_shape("nf4", n, k)
    blocks = w.float().reshape(n, k // NF4_BLOCK, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=-1)  # (N, K/64)
    scales2, offset = None, 0.0
    if double_quant:
        absmax, scales2, offset = _quantize_absmax(absmax)
        absmax_used = dequantize_absmax(absmax, scales2, offset)
    else:
        absmax_used = absmax
    # Normalise each block by the absmax the dequantizer will see, then take the nearest level
    # (the midpoints between sorted levels are the decision boundaries).
    safe = torch.where(absmax_used > 0, absmax_used, torch.ones_like(absmax_used))
    normed = (blocks / safe[..., None]).clamp_(-1, 1).reshape(n, k)
    mids = (NF4[1:] + NF4[:-1]) / 2
    codes = torch.bucketize(normed, mids).to(torch.uint8)  # (N, K) in 0..15
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return QWeight("nf4", n, k, packed.contiguous(), absmax.contiguous(), scales2, offset)


def _quantize_absmax(absmax: torch.Tensor):
    """Second level: int8 codes of (absmax - mean), one fp32 scale per 256 blocks."""
    flat = absmax.reshape(-1)
    offset = float(flat.mean())
    centered = flat - offset
    groups = math.ceil(flat.numel() / NF4_DQ_GROUP)
    padded = F.pad(centered, (0, groups * NF4_DQ_GROUP - flat.numel()))
    gmax = padded.reshape(groups, NF4_DQ_GROUP).abs().amax(dim=1)
    s2 = torch.where(gmax > 0, gmax / 127, torch.ones_like(gmax))
    c = torch.round(padded.reshape(groups, -1) / s2[:, None]).clamp_(-127, 127).to(torch.int8)
    return c.reshape(-1)[:flat.numel()].reshape(absmax.shape).contiguous(), s2, offset


def dequantize_absmax(codes: torch.Tensor, scales2: torch.Tensor, offset: float):
    flat = codes.reshape(-1).float()
    g = torch.arange(flat.numel(), device=codes.device) // NF4_DQ_GROUP
    return (flat * scales2[g] + offset).reshape(codes.shape)


# -- dequantization (QWeight -> dense) -------------------------------------------------------

def dequantize(qw: QWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense (N, K) weight, computed in fp32 and rounded once to `dtype`."""
    n, k = qw.shape
    if qw.fmt == "int8":
        w = qw.data.float() * qw.scales[:, None]
    elif qw.fmt == "nf4":
        codes = torch.stack([qw.data & 0xF, qw.data >> 4], dim=-1).reshape(n, k).long()
        absmax = (qw.scales if qw.scales2 is None
                  else dequantize_absmax(qw.scales, qw.scales2, qw.offset))
        w = (NF4.to(qw.data.device)[codes].reshape(n, k // NF4_BLOCK, NF4_BLOCK)
             * absmax[..., None]).reshape(n, k)
    elif qw.fmt in GGUF_BLOCK_BYTES:
        blocks = qw.data.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK_BYTES[qw.fmt])
        d = blocks[..., 0:2].contiguous().view(torch.float16).float()  # (N, K/32, 1)
        if qw.fmt == "q8_0":
            q = blocks[..., 2:].contiguous().view(torch.int8).float()
            w = d * q
        else:
            qs = blocks[..., 4:] if qw.fmt == "q4_1" else blocks[..., 2:]
            nib = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()  # elements 0..15, 16..31
            if qw.fmt == "q4_0":
                w = d * (nib - 8)
            else:
                w = d * nib + blocks[..., 2:4].contiguous().view(torch.float16).float()
        w = w.reshape(n, k)
    else:
        raise ValueError(f"unknown quantized format {qw.fmt!r}; choose among {FORMATS}")
    return w.to(dtype)


# -- the torch linear layer: dequantize per call, forward and backward -----------------------

class QuantLinearTorch(torch.autograd.Function):
    """y = x Wᵀ with W dequantized for this call only; backward ∂L/∂x = dy W dequantizes it
    again. Only the quantized storage is saved for backward, never the dense W (a plain
    F.linear(x, dequantize(W)) would keep one dense W per layer alive until backward). W is
    frozen: no ∂L/∂W."""

    @staticmethod
    def forward(ctx, x, qw: QWeight):
        ctx.qw = qw  # the quantized tensors themselves, no copy
        return linear(x, dequantize(qw, x.dtype))

    @staticmethod
    def backward(ctx, dy):
        return linear(dy, dequantize(ctx.qw, dy.dtype).t()), None


def check_input(x: torch.Tensor, qw: QWeight, where: str = "quant_linear"):
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != qw.k:
        raise ValueError(f"{where}: expected x (..., {qw.k}) for a {qw.fmt} weight "
                         f"({qw.n}, {qw.k}), got {tuple(getattr(x, 'shape', ()))}")
    if x.device != qw.data.device:
        raise ValueError(f"{where}: x is on {x.device} but the weight on {qw.data.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{where}: x must be floating point, got {x.dtype}")


def quant_linear_reference(x: torch.Tensor, qw: QWeight) -> torch.Tensor:
    """The CPU path: x Wᵀ, W dequantized per call to x's dtype (autograd: ∂L/∂x only)."""
    check_input(x, qw)
    return QuantLinearTorch.apply(x, qw)


def dense_reference(x: torch.Tensor, qw: QWeight) -> torch.Tensor:
    """Dequantize, then matmul: the truth the kernels and the torch path are tested against."""
    return F.linear(x, dequantize(qw, x.dtype))
