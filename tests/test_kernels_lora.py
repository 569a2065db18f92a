"""kernels/lora.py: the fused Triton LoRA linear against its torch reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU. The truth is
the reference evaluated in fp64 with the kernel's inputs (adapters rounded to the compute dtype
first, as the dtype contract says), so each tolerance measures the kernel's own error.
"""

import os
import subprocess
import sys

import pytest
import torch

from kernels import dispatch, tuning
from kernels.dispatch import lora_path
from kernels.lora import (
    LoRAFunction,
    fused_is_faster,
    lora_linear,
    lora_linear_reference,
    make_dropout_mask,
    use_triton,
)
from tests.kernel_devices import DEVICES, INTERPRET, needs_kernels

# Relative to the magnitude of the expected tensor. bf16's ulp is 2^-7 ≈ 7.8e-3 at the top of a
# binade, so 1e-2 is just over one ulp; the kernels measure ~4e-3 (bf16), ~6e-4 (fp16), ~3e-7.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SCALE = 2.0  # makes the adapter term as large as the base term, so errors in it show


def assert_close_rel(actual, expected, rel):
    """Every element within rel · max|expected| (errors of a tiled dot scale with the tile's
    magnitude, not with each element's)."""
    expected = expected.detach().to(torch.float64).cpu()
    torch.testing.assert_close(actual.detach().to(torch.float64).cpu(), expected, rtol=0,
                               atol=rel * expected.abs().max().item())


def make_case(lead, k, n, r, dtype, adapter_dtype, device, p, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * std).to(dt).to(device)

    x = randn(*lead, k)
    weight = randn(n, k, std=k**-0.5)
    lora_a = randn(r, k, std=k**-0.5, dt=adapter_dtype)
    lora_b = randn(n, r, std=r**-0.5, dt=adapter_dtype)
    dy = randn(*lead, n)
    mask = (torch.rand(x.shape, generator=gen) >= p).to(device) if p > 0 else None
    return x, weight, lora_a, lora_b, dy, mask


def run(fn, x, weight, lora_a, lora_b, dy, p, mask, scale=SCALE):
    """Output and the three gradients of fn, on fresh leaf copies of the inputs."""
    x, lora_a, lora_b = (t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b))
    y = fn(x, weight, lora_a, lora_b, scale, p, True, mask)
    y.backward(dy)
    return y, x.grad, lora_a.grad, lora_b.grad


def truth(x, weight, lora_a, lora_b, dy, p, mask):
    # The kernels round the adapters to x's dtype (the contract); the truth starts from there.
    f64 = lambda t: t.detach().cpu().to(torch.float64)
    a, b = (f64(t.to(x.dtype)) for t in (lora_a, lora_b))
    m = mask.cpu() if mask is not None else None
    return run(lora_linear_reference, f64(x), f64(weight), a, b, f64(dy), p, m)


def check_against_truth(x, weight, lora_a, lora_b, dy, p, mask):
    got = run(lora_linear, x, weight, lora_a, lora_b, dy, p, mask)
    want = truth(x, weight, lora_a, lora_b, dy, p, mask)
    expected_dtypes = (x.dtype, x.dtype, lora_a.dtype, lora_b.dtype)
    for name, g, w, dt in zip(("y", "dx", "dA", "dB"), got, want, expected_dtypes, strict=True):
        assert g.dtype == dt and g.shape == w.shape and g.device == x.device, name
        assert_close_rel(g, w, TOL[x.dtype])


CASES = {  # (leading shape, K, N, r): odd sizes that cover partial tiles on every axis
    "5x123-77-r3": ((5,), 123, 77, 3),
    "2x3x40-33-r5": ((2, 3), 40, 33, 5),
    "70x300-150-r17": ((70,), 300, 150, 17),  # several tiles on M, N, K; r pads to 32
}


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("adapters", ["same", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_reference(device, dtype, adapters, case, p):
    if adapters == "fp32" and dtype == torch.float32:
        pytest.skip("same as adapters='same'")
    lead, k, n, r = CASES[case]
    adapter_dtype = dtype if adapters == "same" else torch.float32
    x, weight, lora_a, lora_b, dy, mask = make_case(lead, k, n, r, dtype, adapter_dtype, device, p)
    check_against_truth(x, weight, lora_a, lora_b, dy, p, mask)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    x, weight, lora_a, lora_b, dy, mask = make_case((6,), 48, 40, 4, torch.float32,
                                                    torch.float32, device, 0.25, seed=1)
    # Same values, transposed storage: x via a (K, M) buffer, W / A / B / dy via their transposes.
    t = lambda v: v.t().contiguous().t()
    x_nc, w_nc, a_nc, b_nc, dy_nc = map(t, (x, weight, lora_a, lora_b, dy))
    assert not any(v.is_contiguous() for v in (x_nc, w_nc, a_nc, b_nc, dy_nc))
    check_against_truth(x_nc, w_nc, a_nc, b_nc, dy_nc, 0.25, t(mask))


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    x, weight, lora_a, lora_b, _, mask = make_case((5,), 7, 6, 3, torch.float64, torch.float64,
                                                    device, 0.4, seed=2)
    for p, m in ((0.0, None), (0.4, mask)):
        f = lambda x_, a_, b_, p=p, m=m: lora_linear(x_, weight, a_, b_, 1.5, p, True, m)
        inputs = tuple(t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b))
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_off_keeps_no_mask(device):
    x, weight, lora_a, lora_b, dy, _ = make_case((5,), 32, 24, 2, torch.float32,
                                                 torch.float32, device, 0.0, seed=3)
    want = run(lora_linear, x, weight, lora_a, lora_b, dy, 0.0, None)
    for p, training in ((0.0, True), (0.5, False)):
        a = lora_a.detach().clone().requires_grad_()
        y = lora_linear(x, weight, a, lora_b, SCALE, dropout_p=p, training=training)
        assert all(t.dtype != torch.bool for t in y.grad_fn.saved_tensors if t is not None)
        assert sum(t is None for t in y.grad_fn.saved_tensors) == 1  # the mask slot
        torch.testing.assert_close(y, want[0], rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_drawn_mask_matches_reference_with_same_seed(device):
    x, weight, lora_a, lora_b, dy, _ = make_case((7,), 40, 24, 4, torch.float32,
                                                 torch.float32, device, 0.0, seed=4)
    torch.manual_seed(123)
    got = run(lora_linear, x, weight, lora_a, lora_b, dy, 0.5, None)
    torch.manual_seed(123)
    want = run(lora_linear_reference, x, weight, lora_a, lora_b, dy, 0.5, None)
    no_dropout = lora_linear_reference(x, weight, lora_a, lora_b, SCALE)
    assert not torch.allclose(want[0], no_dropout, atol=1e-3)  # dropout did act
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g, w, TOL[torch.float32])


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_gradients_only_where_needed(device):
    x, weight, lora_a, lora_b, dy, _ = make_case((5,), 30, 20, 3, torch.float32,
                                                 torch.float32, device, 0.0, seed=5)
    want = truth(x, weight, lora_a, lora_b, dy, 0.0, None)
    b = lora_b.detach().clone().requires_grad_()
    lora_linear(x, weight, lora_a, b, SCALE).backward(dy)  # only B trains; x, A frozen
    assert_close_rel(b.grad, want[3], TOL[torch.float32])
    # Through LoRAFunction.apply directly, asking for dx alone.
    x = x.detach().clone().requires_grad_()
    (dx,) = torch.autograd.grad(LoRAFunction.apply(x, weight, lora_a, b, SCALE, 0.0, None),
                                (x,), dy)
    assert_close_rel(dx, want[1], TOL[torch.float32])


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, weight, lora_a, lora_b, _, _ = make_case((0,), 16, 8, 2, torch.float32, torch.float32,
                                                device, 0.0)
    a = lora_a.clone().requires_grad_()
    y = lora_linear(x, weight, a, lora_b, SCALE)
    assert y.shape == (0, 8)
    y.sum().backward()
    torch.testing.assert_close(a.grad, torch.zeros_like(a), rtol=0, atol=0)


def test_dropout_mask_keeps_one_minus_p():
    mask = make_dropout_mask(torch.empty(400, 500), 0.3)
    assert mask.dtype == torch.bool and mask.shape == (400, 500)
    assert abs(mask.float().mean().item() - 0.7) < 0.01  # 200k draws: σ ≈ 1e-3
    # each of the four draws cut from one 64-bit word keeps 0.7 (50k each: σ ≈ 2e-3); the top
    # one has no sign bit, so unmasked draws would keep 0.85 in the other three
    rates = mask.view(-1, 4).float().mean(0)
    assert torch.all((rates - 0.7).abs() < 0.01), rates
    assert make_dropout_mask(torch.empty(3, 7), 0.0).all()
    assert not make_dropout_mask(torch.empty(3, 7), 1 - 1e-6).any()


def _bad(**changes):
    args = dict(x=torch.randn(2, 5, 8), weight=torch.randn(6, 8), lora_a=torch.randn(3, 8),
                lora_b=torch.randn(6, 3), scale=1.0, dropout_p=0.0, training=True,
                dropout_mask=None)
    args.update(changes)
    return args


BAD_INPUTS = {
    "x last dim": (_bad(x=torch.randn(2, 5, 7)), ValueError, "shape mismatch"),
    "A width": (_bad(lora_a=torch.randn(3, 9)), ValueError, "shape mismatch"),
    "A/B rank": (_bad(lora_b=torch.randn(6, 4)), ValueError, "shape mismatch"),
    "weight rank": (_bad(weight=torch.randn(1, 6, 8)), ValueError, "expected x"),
    "lora_a rank": (_bad(lora_a=torch.randn(3, 8, 1)), ValueError, "expected x"),
    "device": (_bad(lora_b=torch.randn(6, 3, device="meta")), ValueError, "different devices"),
    "x/W dtype": (_bad(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "share"),
    "A/B dtype": (_bad(lora_b=torch.randn(6, 3, dtype=torch.float64)), TypeError, "share"),
    "p = 1": (_bad(dropout_p=1.0), ValueError, "dropout_p"),
    "mask while off": (_bad(dropout_mask=torch.ones(2, 5, 8, dtype=torch.bool)), ValueError,
                       "dropout is off"),
    "mask shape": (_bad(dropout_p=0.1, dropout_mask=torch.ones(10, 8, dtype=torch.bool)),
                   ValueError, "dropout_mask must be"),
    "mask dtype": (_bad(dropout_p=0.1, dropout_mask=torch.ones(2, 5, 8)), ValueError,
                   "dropout_mask must be"),
    "weight trains": (_bad(weight=torch.randn(6, 8, requires_grad=True)), ValueError,
                      "frozen"),
}


@pytest.mark.parametrize("fn", [lora_linear, lora_linear_reference], ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(fn, name):
    args, error, match = BAD_INPUTS[name]
    if name == "weight trains" and fn is lora_linear_reference:
        pytest.skip("the reference lets autograd compute dW")
    with pytest.raises(error, match=match):
        fn(**args)


def test_use_triton_and_fallback_rule(monkeypatch):
    assert not use_triton(torch.empty(2, 3))
    assert use_triton(torch.empty(2, 3), allow_interpreter=True) == INTERPRET
    assert use_triton(torch.empty(2, 3, device="meta"), allow_interpreter=True) is False
    # Unmeasured (an empty table): "auto" takes the torch (addmm_) path everywhere.
    monkeypatch.setattr(dispatch, "MEASURED_FASTER", {})
    assert not fused_is_faster(4096, 16, torch.bfloat16)
    assert lora_path("auto", "cuda", torch.bfloat16, 4096, 16) == "torch"
    monkeypatch.setattr(dispatch, "MEASURED_FASTER", {torch.bfloat16: (1024, 64)})
    assert lora_path("auto", "cuda", torch.bfloat16, 4096, 16) == "triton"
    assert lora_path("auto", "cuda", torch.bfloat16, 512, 16) == "torch"  # too few rows
    assert lora_path("auto", "cuda", torch.bfloat16, 4096, 128) == "torch"  # rank too large
    assert lora_path("auto", "cuda", torch.float16, 4096, 16) == "torch"  # dtype unmeasured
    monkeypatch.setattr(dispatch, "MEASURED_FASTER", {torch.float32: (1, 64)})
    assert lora_path("auto", "cuda", torch.float32, 4096, 16) == "torch"  # never fp32
    assert lora_path("auto", "cpu", torch.bfloat16, 4096, 16) == "torch"
    assert lora_path("off", "cuda", torch.bfloat16, 4096, 16) == "torch"
    assert lora_path("force", "cpu", torch.float32, 1, 1) == "triton"
    with pytest.raises(ValueError, match="kernel mode"):
        lora_path("on", "cuda", torch.bfloat16, 4096, 16)
    if not INTERPRET and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            lora_linear(torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 4),
                        torch.randn(3, 1), 1.0)


def test_tolerances_can_fail():
    # A kernel bug the size of one dropped factor 1 / (1 - p) or a missing s must not pass.
    want = torch.randn(50, 40, dtype=torch.float64)
    for rel in TOL.values():
        with pytest.raises(AssertionError):
            assert_close_rel(want * (1 + 2 * rel), want, rel)


def _fwd_bwd(fn, x, w, a, b, dy, mask):
    xi, ai, bi = (t.clone().requires_grad_() for t in (x, a, b))
    y = fn(xi, w, ai, bi, SCALE, 0.25, dropout_mask=mask)
    y.backward(dy)
    return y, xi.grad, ai.grad, bi.grad


@needs_kernels
@pytest.mark.parametrize("i", range(len(tuning.GEMM_16BIT)))
def test_every_tuned_tile_config(monkeypatch, i):
    # The tuner may pick any candidate on the GPU: each one must give the reference's result,
    # at a shape that leaves partial tiles in M, N and K.
    monkeypatch.setattr(tuning, "FORCE", tuning.GEMM_16BIT[i])
    dev, dt = DEVICES[0], torch.float16
    g = torch.Generator().manual_seed(i)
    x, w = torch.randn(130, 72, generator=g), torch.randn(200, 72, generator=g) * 0.2
    a, b = torch.randn(8, 72, generator=g) * 0.2, torch.randn(200, 8, generator=g) * 0.2
    dy = torch.randn(130, 200, generator=g)
    mask = torch.rand(130, 72, generator=g) > 0.25
    x, w, a, b, dy, mask = (t.to(dev) for t in (x, w, a, b, dy, mask))
    x, w, a, b, dy = (t.to(dt) for t in (x, w, a, b, dy))
    got = _fwd_bwd(lora_linear, x, w, a, b, dy, mask)
    want = _fwd_bwd(lora_linear_reference, *(t.double() for t in (x, w, a, b, dy)), mask)
    for gt, wt in zip(got, want, strict=True):
        assert_close_rel(gt, wt, TOL[dt])


@needs_kernels
def test_autotune_times_candidates_and_caches(monkeypatch):
    # With two interpreter candidates the tuner times both, caches the winner per kernel and
    # shape, and the result is still the reference's.
    monkeypatch.setenv("TALLREC_TUNE_INTERPRETER", "1")
    monkeypatch.setenv("TALLREC_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "_CACHE", {})
    if not INTERPRET:
        monkeypatch.setattr(tuning, "GEMM_16BIT", tuning.GEMM_16BIT[:2])
    dev = DEVICES[0]
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(70, 40, generator=g), torch.randn(90, 40, generator=g) * 0.2
    a, b = torch.randn(4, 40, generator=g) * 0.2, torch.randn(90, 4, generator=g) * 0.2
    dy = torch.randn(70, 90, generator=g)
    mask = torch.rand(70, 40, generator=g) > 0.25
    x, w, a, b, dy, mask = (t.to(dev) for t in (x, w, a, b, dy, mask))
    dt = torch.float32 if INTERPRET else torch.float16
    x, w, a, b, dy = (t.to(dt) for t in (x, w, a, b, dy))
    got = _fwd_bwd(lora_linear, x, w, a, b, dy, mask)
    names = sorted(key[0] for key in tuning._CACHE)
    assert names == ["_lora_bwd_dx_kernel", "_lora_fwd_kernel"], tuning._CACHE
    want = _fwd_bwd(lora_linear_reference, *(t.double() for t in (x, w, a, b, dy)), mask)
    for gt, wt in zip(got, want, strict=True):
        assert_close_rel(gt, wt, TOL[dt])


# Compiles the kernels for an H100/H200 (sm_90) with the ptxas bundled in the Triton wheel, no
# GPU needed: the interpreter accepts code that the GPU compiler rejects (it caught an fp64 MMA
# assertion). Ints are specialised as the JIT would for contiguous inputs (unit inner strides,
# the rest divisible by 16), so the pipelined wgmma path is the one compiled.
AOT_SCRIPT = r"""
import sys
import torch
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(77)
from kernels import lora as L

KERNELS = {  # kernel: (pointer dtypes by role, unit-stride args)
    L._lora_down_kernel: (dict(x_ptr="x", a_ptr="ad", mask_ptr="*u8", out_ptr="acc"),
                          ("stride_xk", "stride_ak", "stride_mk", "stride_or")),
    L._lora_fwd_kernel: (dict(x_ptr="x", w_ptr="x", xa_ptr="acc", b_ptr="ad", y_ptr="x"),
                         ("stride_xk", "stride_wk", "stride_xar", "stride_br", "stride_yn")),
    L._lora_bwd_dx_kernel: (dict(dy_ptr="x", w_ptr="x", g_ptr="acc", a_ptr="ad", mask_ptr="*u8",
                                 dx_ptr="x"),
                            ("stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_mk",
                             "stride_dxk")),
}
NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
for dtype, name in NAMES.items():
    gemm, down = L._launch_config(dtype, 4096, 4096, 4096)
    for kernel, (ptrs, ones) in KERNELS.items():
        cfg = dict(down if kernel is L._lora_down_kernel else gemm)
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = dict(cfg, BLOCK_R=32, **L._flags(dtype), **dict.fromkeys(ones, 1))
        if kernel is not L._lora_fwd_kernel:
            consts["HAS_MASK"] = True
        if kernel is not L._lora_down_kernel:
            consts["GROUP_M"] = 8
        types = dict(x=name, ad="fp32" if name == "bf16" else name,
                     acc="fp64" if name == "fp64" else "fp32")
        sig, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in consts:
                sig[arg] = "constexpr"
            elif arg in ptrs:
                sig[arg] = ptrs[arg] if ptrs[arg].startswith("*") else "*" + types[ptrs[arg]]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in ("scale", "keep_scale"):
                sig[arg] = "fp32"
            else:
                sig[arg] = "i32"
                attrs[(i,)] = [["tt.divisibility", 16]]
        triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda tests compile them for real")
def test_kernels_compile_for_hopper(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode == 77:
        pytest.skip("this Triton has no ahead-of-time compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
