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

Launches (the kernels are in kernels/lora_kernels.py). Forward: `_lora_down_kernel` computes
xa (fp32) reading x and the mask once; `_lora_fwd_kernel` is a tiled GEMM x Wᵀ whose epilogue
adds s · xa Bᵀ, so y is written once and no (M, N) LoRA intermediate exists. Backward:
`_lora_down_kernel` on dy and Bᵀ gives g; `_lora_bwd_dx_kernel` is the GEMM dy W whose epilogue
adds (g A) ∘ m / (1 - p); ∂L/∂A and ∂L/∂B are torch matmuls on the saved (M, r) tensors.

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

This split is the design LoRAFusion (Zhu et al. 2025) argues for: dropout and the
down-projection fused into one memory-bound pass, the up-projection fused into the base GEMM's
epilogue. What it cannot win back is a base GEMM slower than cuBLAS: one fixed tile config is
commonly quoted at 75–85% of cuBLAS at 4096-sized shapes (not measured here), more than the
fusion saves (one (M, N) write and re-read). So the GEMM tiles are autotuned over a small set
(kernels/tuning.py: four Hopper configs, timed once per shape and cached, warmed before any
timed region); the down pass, memory-bound, keeps one config. Whether that reaches the 1.2×
goal over cuBLAS + addmm_ is for the GPU run to say; until it does, `kernels.dispatch` routes
"auto" to the addmm_ path (kernels/reference.py).

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

import torch
import triton

from kernels.dispatch import fused_is_faster, use_triton
from kernels.lora_kernels import _lora_bwd_dx_kernel, _lora_down_kernel, _lora_fwd_kernel
from kernels.reference import check_inputs, lora_linear_reference, make_dropout_mask
from kernels.tuning import _launch_config, down_config, gemm_candidates, tuned_gemm
from kernels.tuning import flags as _flags

__all__ = ["LoRAFunction", "fused_is_faster", "lora_backward", "lora_forward", "lora_linear",
           "lora_linear_reference", "make_dropout_mask", "use_triton", "_launch_config", "_flags",
           "_lora_bwd_dx_kernel", "_lora_down_kernel", "_lora_fwd_kernel"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _down(x2, a_ptr, r, a_strides, mask2, scale):
    """(M, r) = scale · (x2 ∘ mask2) aᵀ, a the (r, K) matrix read from a_ptr through strides."""
    m, k = x2.shape
    out = torch.empty((m, r), dtype=_acc_dtype(x2.dtype), device=x2.device)
    cfg = down_config(x2.dtype, m, k)
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


def _gemm(kernel, m, n, k, dtype, has_mask, block_r, *args):
    """Launch a rank-r-epilogue GEMM kernel over an (m, n) output reducing over k, with the
    tile config the tuner picked for this shape."""
    def launch(cfg):
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        extra = {} if kernel is _lora_fwd_kernel else dict(HAS_MASK=has_mask)
        kernel[grid](*args, BLOCK_R=block_r, GROUP_M=8, **extra, **_flags(dtype), **cfg)

    key = (kernel.fn.__name__, str(dtype), triton.next_power_of_2(m), n, k, has_mask, block_r)
    launch(tuned_gemm(key, gemm_candidates(dtype, m, n, k), launch))


def lora_forward(x, weight, lora_a, lora_b, scale, dropout_p=0.0, dropout_mask=None):
    """y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ. Returns (y, x2, mask2, xa): y with x's leading shape and
    dtype, and what the backward needs (x and the mask flattened to 2-D, xa in fp32)."""
    check_inputs(x, weight, lora_a, lora_b, dropout_p, dropout_mask)
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
    _gemm(_lora_fwd_kernel, m, n, k, x.dtype, False, max(16, triton.next_power_of_2(r)),
          x2, weight, xa, lora_b, y,
          m, n, k, r, scale,
          *x2.stride(), *weight.stride(), *xa.stride(), *lora_b.stride(), *y.stride())
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
        mask_arg = mask2.view(torch.uint8) if mask2 is not None else dy2  # dy2: never read
        _gemm(_lora_bwd_dx_kernel, m, k, n, x2.dtype, mask2 is not None,
              max(16, triton.next_power_of_2(r)),
              dy2, weight, g, lora_a, mask_arg, dx,
              m, n, k, r, keep_scale,
              *dy2.stride(), *weight.stride(), *g.stride(), *lora_a.stride(),
              *(mask2.stride() if mask2 is not None else (0, 0)), *dx.stride())
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
    check_inputs(x, weight, lora_a, lora_b, p, dropout_mask)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora_linear: weight requires grad, but the base weight is frozen and "
                         "no gradient is computed for it; call weight.requires_grad_(False)")
    if p > 0.0 and dropout_mask is None:
        dropout_mask = make_dropout_mask(x, p)
    return LoRAFunction.apply(x, weight, lora_a, lora_b, float(scale), p, dropout_mask)
