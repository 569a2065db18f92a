"""model/ops.py against autograd through the plain expressions (the reference HF's LLaMA
writes): the same forward bits, gradients equal to fp32/fp64 rounding, and less kept for
backward."""

import pytest
import torch
import torch.nn.functional as F

from model.ops import rms_norm, swiglu


def ref_rms_norm(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ref_swiglu(gate, up):
    return F.silu(gate) * up


def cases(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).to(dtype)
    w = (1 + 0.1 * torch.randn(16, generator=g, dtype=torch.float64)).to(dtype)
    gate = torch.randn(2, 5, 12, generator=g, dtype=torch.float64).to(dtype)
    up = torch.randn(2, 5, 12, generator=g, dtype=torch.float64).to(dtype)
    return [
        (rms_norm, ref_rms_norm, (x, w), (1e-5,)),
        (swiglu, ref_swiglu, (gate, up), ()),
    ]


def grads(fn, inputs, rest, dy_seed=1):
    leaves = [t.clone().requires_grad_() for t in inputs]
    y = fn(*leaves, *rest)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed),
                     dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                       (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("which", [0, 1], ids=["rms_norm", "swiglu"])
def test_forward_bits_and_gradients_match_autograd(dtype, tol, which):
    fn, ref, inputs, rest = cases(dtype)[which]
    y, g = grads(fn, inputs, rest)
    y_ref, g_ref = grads(ref, inputs, rest)
    assert torch.equal(y, y_ref)  # the same expressions: the same bits
    if fn is rms_norm:  # its statistics are fp32 even for fp64 input (HF's RMSNorm)
        tol = max(tol, 1e-5)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def saved_bytes(fn, inputs, rest, frozen=()):
    """Bytes autograd keeps for backward (each storage once), inputs at `frozen` indices not
    requiring grad (RMSNorm's weight is frozen under LoRA)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = [t.clone().requires_grad_(i not in frozen) for i, t in enumerate(inputs)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves, *rest)
    return sum(kept.values())


@pytest.mark.parametrize("which", [0, 1], ids=["rms_norm", "swiglu"])
def test_keeps_less_for_backward_than_autograd(which):
    fn, ref, inputs, rest = cases(torch.bfloat16)[which]
    frozen = (1,) if fn is rms_norm else ()
    ours = saved_bytes(fn, inputs, rest, frozen)
    theirs = saved_bytes(ref, inputs, rest, frozen)
    x = inputs[0]
    # rms_norm: x in bf16 + rstd instead of x in fp32 + rstd (saves 2 bytes per element);
    # swiglu: gate and up, not silu(gate) too (saves 2 bytes per element of gate).
    assert theirs - ours >= x.numel() * x.element_size()
