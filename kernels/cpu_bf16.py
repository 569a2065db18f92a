"""bf16 GEMMs on a CPU without bf16 instructions: an fp32 GEMM of the bf16 operands.

    linear(x, weight) -> x Wᵀ          (F.linear's contract, autocast's dtype rules)
    addmm_(y, a, b, alpha) -> y        (y.addmm_(a, b, alpha=alpha))
    attention(q, k, v, **kw)           (F.scaled_dot_product_attention)

A CPU with AVX512-BF16 or AMX-BF16 multiplies bf16 matrices in hardware; on one without (an
AVX2-only EPYC, 2026-12-02, 2 threads) torch 2.13 runs them in software: x Wᵀ at 2128 × 576 →
1536 took 245 ms in bf16 against 38 ms in fp32, the backward's g W 2,278 ms against 32, and a
cpu-preset grid run trained at 6 tokens/s instead of 350-610.

The product of two bf16 numbers is exact in fp32 (8 + 8 significant bits fit in 24), so an
fp32 GEMM of the bf16 operands, rounded once to bf16, is the computation a native bf16 GEMM
does (fp32 accumulation, one rounding at the end) up to the order of the sums. These functions
take that path, forward and backward, wherever the compute dtype is bf16 on such a CPU;
everywhere else (a CPU with bf16, fp32, fp16, CUDA) each is the torch call it stands for, the
same call and the same bits. The cost: fp32 copies of the operands per call, freed when the
call returns (what backward keeps stays bf16, except attention's inputs, below).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def cpu_bf16_support() -> tuple[bool, str]:
    """(native bf16?, why): AVX512-BF16 or AMX-BF16 compute bf16 in hardware; without them
    bf16 is emulated and slower than fp32. torch's own probe first, /proc/cpuinfo as backup."""
    probes = [("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")]
    for name, fn in probes:
        probe = getattr(torch.cpu, fn, None)
        if probe is not None and probe():
            return True, f"the CPU has {name}"
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        flags = set()
    for name, flag in (("AMX-BF16", "amx_bf16"), ("AVX512-BF16", "avx512_bf16")):
        if flag in flags:
            return True, f"the CPU has {name}"
    return False, "the CPU has neither AVX512-BF16 nor AMX-BF16 (bf16 would be emulated)"


@functools.cache
def _native() -> bool:
    return cpu_bf16_support()[0]


# None: detect (once per process); True/False: force, for tests and benchmarks.
FORCE_NATIVE: bool | None = None


def emulated(device: torch.device | str) -> bool:
    """Whether a bf16 GEMM on this device would run in software (a CPU without bf16)."""
    if torch.device(device).type != "cpu":
        return False
    return not (_native() if FORCE_NATIVE is None else FORCE_NATIVE)


class _Bf16LinearFp32(torch.autograd.Function):
    """x Wᵀ for bf16 x (..., K) and W (N, K): fp32 GEMMs, bf16 results and grads."""

    @staticmethod
    def forward(ctx, x, weight):
        # bf16, and only what a grad needs, as autograd saves for F.linear: x for ∂W, W for ∂x
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              weight if ctx.needs_input_grad[0] else None)
        return F.linear(x.float(), weight.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        g = dy.float()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight.float()).to(torch.bfloat16)
        if ctx.needs_input_grad[1]:
            k = x.shape[-1]
            dw = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, k).float()).to(torch.bfloat16)
        return dx, dw


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) (no bias) under the autocast state of the call. Where that computes
    in bf16 on a CPU without bf16 instructions, the operands are rounded to bf16 as autocast
    would and multiplied by an fp32 GEMM (module docstring); elsewhere this is F.linear."""
    if _compute_dtype(x) != torch.bfloat16 or not emulated(x.device):
        return F.linear(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        return _Bf16LinearFp32.apply(x.to(torch.bfloat16), weight.to(torch.bfloat16))


def addmm_(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """y.addmm_(a, b, alpha=alpha) (y += alpha · a b, in place, one rounding); for bf16 on a
    CPU that emulates it, the sum and product in fp32, rounded once into y (autograd-safe)."""
    if y.dtype != torch.bfloat16 or not emulated(y.device):
        return y.addmm_(a, b, alpha=alpha)
    with torch.autocast(y.device.type, enabled=False):  # autocast would make addmm bf16 again
        return y.copy_(torch.addmm(y.float(), a.float(), b.float(), alpha=alpha))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, **kw); for bf16 on a CPU that emulates it, in
    fp32 with the output rounded to bf16 (torch's bf16 backward took 6.7 s of a 28 s training
    step there, fp32 0.8 s). Autograd keeps the fp32 q, k, v for backward (twice the bf16
    bytes). The one place this path rounds differently from a native bf16 kernel, which also
    rounds the softmax weights to bf16 before it multiplies V by them."""
    if _compute_dtype(q) != torch.bfloat16 or not emulated(q.device):
        return F.scaled_dot_product_attention(q, k, v, **kw)
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw["attn_mask"] = mask.float()
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                              **kw).to(torch.bfloat16)
