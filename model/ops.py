"""The block's elementwise pieces with hand-written backward passes that save less.

Autograd through the plain expressions keeps what each small op needs: RMSNorm an fp32 copy
of its input, SwiGLU silu(gate) beside gate and up. These functions compute the same forward
(the same expressions, so the same bits) and keep only what their backward cannot rebuild
cheaply:

    rms_norm   x in its own dtype and one fp32 rstd per row (not x in fp32)
    swiglu     gate and up (silu(gate) is recomputed in backward)

Under bf16 that is 2 × dim + 2 × hidden_dim bytes per token per block fewer (rotary
embeddings need nothing of the kind: autograd keeps only the shared cos/sin tables there).
Gradients equal autograd's up to fp32 rounding order (tests/test_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        # Statistics in fp32 whatever the compute dtype: bf16 sums of squares lose digits.
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        g = (dy * weight).float()  # the gradient at xhat (its rounding to x.dtype passes it on)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * xhat.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        return dx.to(x.dtype), dw, None


def rms_norm(x, weight, eps: float):
    """weight * (x / rms(x)), the statistics in fp32, rounded to x's dtype before the weight
    (HF's LlamaRMSNorm)."""
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        d_up = dy * F.silu(gate)
        d_gate = torch.ops.aten.silu_backward(dy * up, gate)
        return d_gate, d_up


def swiglu(gate, up):
    """silu(gate) * up."""
    return _SwiGLU.apply(gate, up)
