"""kernels/quant_matmul.py (Triton) and the torch path against dequantize-then-matmul.

Under TRITON_INTERPRET=1 (tests/conftest.py) the kernel runs on CPU tensors; with
TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled (bench/gpu_check.sh). The truth
is x · dequantize(W, x.dtype)ᵀ and dy · dequantize(W, x.dtype) in fp64: the kernel's contract is
to round the dequantized W to the compute dtype once, so each tolerance measures its own error.
GGUF blocks come from the gguf package's quantizer, an implementation independent of ours.
"""

import os
import subprocess
import sys

import pytest
import torch

from kernels.quant_reference import (
    QWeight,
    dequantize,
    quant_linear_reference,
    quantize_int8,
    quantize_nf4,
)
from tests.kernel_devices import DEVICES, needs_kernels

FORMATS = ("int8", "nf4", "nf4-dq", "q8_0", "q4_0", "q4_1")
# Relative to max |expected|; the kernel measured ~2e-7 (fp32), ~4e-4 (fp16), ~3e-3 (bf16).
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
CASES = {  # (leading shape of x, K, N): partial tiles on M, N and K; K a multiple of 64
    "5x192-77": ((5,), 192, 77),
    "2x3x64-33": ((2, 3), 64, 33),
    "70x320-150": ((70,), 320, 150),
}


def make_qweight(fmt: str, n: int, k: int, seed: int = 0, device="cpu") -> QWeight:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    w[0, :5] *= 8  # an outlier row segment: scales must differ across rows and blocks
    if fmt == "int8":
        qw = quantize_int8(w)
    elif fmt in ("nf4", "nf4-dq"):
        qw = quantize_nf4(w, double_quant=fmt == "nf4-dq")
    else:
        import gguf

        qt = gguf.GGMLQuantizationType[fmt.upper()]
        qw = QWeight(fmt, n, k, torch.from_numpy(gguf.quants.quantize(w.numpy(), qt)))
    move = {f: getattr(qw, f).to(device) for f in ("data", "scales", "scales2")
            if getattr(qw, f) is not None}
    return qw._replace(**move)


def assert_close_rel(actual, expected, rel):
    expected = expected.detach().to(torch.float64).cpu()
    torch.testing.assert_close(actual.detach().to(torch.float64).cpu(), expected, rtol=0,
                               atol=rel * expected.abs().max().item())


def truth(x, qw, dy):
    """fp64 dequantize-then-matmul, from W rounded to x's dtype, and its ∂L/∂x."""
    w = dequantize(qw, x.dtype).cpu().double()
    x64 = x.detach().cpu().double().requires_grad_()
    y = x64 @ w.t()
    y.backward(dy.cpu().double())
    return y, x64.grad


def run(fn, x, qw, dy):
    x = x.detach().clone().requires_grad_()
    y = fn(x, qw)
    y.backward(dy)
    return y, x.grad


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_dequantize_then_matmul(device, dtype, fmt, case):
    from kernels.quant_matmul import quant_matmul

    lead, k, n = CASES[case]
    qw = make_qweight(fmt, n, k, device=device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, k, generator=gen).to(dtype).to(device)
    dy = torch.randn(*lead, n, generator=gen).to(dtype).to(device)
    y, dx = run(quant_matmul, x, qw, dy)
    y_ref, dx_ref = truth(x, qw, dy)
    assert y.dtype == dx.dtype == dtype and y.shape == (*lead, n) and dx.shape == x.shape
    assert_close_rel(y, y_ref, TOL[dtype])
    assert_close_rel(dx, dx_ref, TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_int8_any_k_and_noncontiguous_x(device):
    from kernels.quant_matmul import quant_matmul

    qw = make_qweight("int8", 40, 123, seed=2, device=device)  # int8 has no block: K = 123
    x = torch.randn(123, 6).to(device).t()  # (6, 123), transposed storage
    dy = torch.randn(40, 6).to(device).t()
    assert not x.is_contiguous() and not dy.is_contiguous()
    y, dx = run(quant_matmul, x, qw, dy)
    y_ref, dx_ref = truth(x, qw, dy)
    assert_close_rel(y, y_ref, TOL[torch.float32])
    assert_close_rel(dx, dx_ref, TOL[torch.float32])


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_path_matches_and_keeps_no_dense_weight(fmt):
    """The CPU path dequantizes per call: same y and ∂L/∂x as the dense product, and autograd
    holds no (N, K) tensor between forward and backward."""
    n, k = 48, 128
    qw = make_qweight(fmt, n, k)
    x = torch.randn(3, 5, k, dtype=torch.float64)
    dy = torch.randn(3, 5, n, dtype=torch.float64)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    xg = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = quant_linear_reference(xg, qw)
    y.backward(dy)
    assert (n, k) not in saved and (k, n) not in saved, saved
    y_ref, dx_ref = truth(x, qw, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xg.grad, dx_ref, rtol=1e-12, atol=1e-12)


@needs_kernels
def test_kernel_errors():
    from kernels.quant_matmul import quant_matmul

    qw = make_qweight("nf4", 8, 64)
    with pytest.raises(ValueError, match=r"expected x \(\.\.\., 64\)"):
        quant_matmul(torch.randn(2, 32), qw)
    with pytest.raises(TypeError, match="fp64 has the torch path"):
        quant_matmul(torch.randn(2, 64, dtype=torch.float64), qw)


def test_kernel_refuses_cpu_without_interpreter():
    code = ("import torch; from kernels.quant_reference import quantize_int8;"
            "from kernels.quant_matmul import quant_matmul;"
            "quant_matmul(torch.randn(2, 8), quantize_int8(torch.randn(4, 8)))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode != 0 and "needs CUDA tensors" in r.stderr, r.stderr[-2000:]
