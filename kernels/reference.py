"""The torch side of the LoRA contract: input checks, the dropout mask, and two torch paths.

    y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ,        drop(x) = x ∘ m / (1 - p)

Imports torch only, so the model's CPU path needs no Triton, and `kernels/` imports nothing from
the rest of the project (model/lora.py imports this module, never the other way round).

- `lora_reference`: the maths written as separate ops (base GEMM, down, up, scale, add). The
  truth the fused kernel is tested against; its rounding order is the contract's.
- `lora_addmm`: the strongest unfused path, the one the model takes wherever the fused kernel is
  not measured faster: cuBLAS x Wᵀ, then the low-rank term added in place into that output by
  one `addmm_` (β = 1, α = s), so no (M, N) LoRA intermediate is written and re-read. This is
  unsloth's `matmul_lora` (kernels/utils.py: `out.addmm_(XA, B, alpha=s)`), kept under autograd.
  It rounds once where the reference rounds three times (xa Bᵀ, s·, +), so the two agree to the
  compute dtype's rounding, not bit for bit.

Dropout contract: the mask is a bool tensor of x's shape drawn by torch (`make_dropout_mask`) and
handed to whichever path runs, so from one RNG state every path drops the same elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu_bf16 import addmm_, linear

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


KEEP_BITS = 15  # dropout draws a uniform 15-bit integer per element


def keep_threshold(p: float) -> int:
    """An element is kept when its 15-bit draw is below this: probability (1 - p) rounded to a
    multiple of 2^-15 (within 1.6e-5 of 1 - p)."""
    return round((1.0 - p) * (1 << KEEP_BITS))


def make_dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep-mask of x's shape, each element kept with probability 1 - p (torch RNG).

    One mask for every path (the Triton kernel takes it as input), not F.dropout, whose RNG
    use differs: from the same seed the kernel and the torch paths drop the same elements.
    The bits come from int64 `random_()` (63 uniform bits a word, viewed as four 16-bit draws
    masked to 15 bits): 4x faster on a CPU than `bernoulli_`, which took 7% of a SmolLM2
    training step."""
    keep = keep_threshold(p)
    if keep >= 1 << KEEP_BITS:  # p below 2^-16 keeps everything (and 2^15 is not an int16)
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    draws = words.view(torch.int16)[:n] & ((1 << KEEP_BITS) - 1)
    return (draws < keep).view(x.shape)


def check_inputs(x, weight, lora_a, lora_b, dropout_p, dropout_mask):
    """Shared by the fused path and the references, so all reject the same inputs."""
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
    if x.dtype not in COMPUTE_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"lora_linear: x and weight must share one of {COMPUTE_DTYPES}, got "
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


def _dropped(x, dropout_p, dropout_mask):
    if dropout_p > 0 and dropout_mask is None:
        dropout_mask = make_dropout_mask(x, dropout_p)
    return x if dropout_mask is None else x * dropout_mask * (1.0 / (1.0 - dropout_p))


def lora_reference(x, weight, lora_a, lora_b, scale: float, dropout_p: float = 0.0,
                   dropout_mask: torch.Tensor | None = None):
    """Plain-torch LoRA linear as separate ops, unchecked (callers check). The adapters run in
    the compute dtype, as autocast would (fp32 adapters on a bf16 model)."""
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    xd = _dropped(x, dropout_p, dropout_mask)
    return F.linear(x, weight) + scale * F.linear(F.linear(xd, a), b)


def lora_addmm(x, weight, lora_a, lora_b, scale: float, dropout_p: float = 0.0,
               dropout_mask: torch.Tensor | None = None):
    """x Wᵀ by cuBLAS, then `addmm_` of s · xa Bᵀ into it in place; unchecked, autograd backward.

    Works under autocast: the two F.linear calls autocast, and the in-place addmm_ (which
    autocast does not touch) gets xa and B in the dtype y came out in. `weight` may also be a
    frozen weight object with its own `linear(x)` and `shape` (model/quant.py's quantized
    weight): the base product is then its, and everything else is this same path."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if dropout_p > 0 and dropout_mask is None:
        dropout_mask = make_dropout_mask(x, dropout_p)  # the one mask every path draws
    xd = x2
    if dropout_mask is not None:
        # The 1/(1-p) rescale rides on addmm_'s alpha: one (M, K) multiply instead of two.
        xd, scale = (x * dropout_mask).reshape(-1, k), scale / (1.0 - dropout_p)
    # (M, N); the backward needs W, not y, so y may be written
    y = weight.linear(x2) if hasattr(weight, "linear") else linear(x2, weight)
    xa = linear(xd, lora_a.to(x.dtype))  # (M, r)
    addmm_(y, xa.to(y.dtype), lora_b.to(y.dtype).t(), scale)
    return y.reshape(*x.shape[:-1], n)


def lora_linear_reference(x, weight, lora_a, lora_b, scale, dropout_p=0.0, training=True,
                          dropout_mask=None):
    """`lora_linear`'s signature, maths and checks in plain torch (separate ops); autograd does
    the backward. The truth the kernel tests and benchmarks compare against."""
    p = float(dropout_p) if training else 0.0
    check_inputs(x, weight, lora_a, lora_b, p, dropout_mask)
    return lora_reference(x, weight, lora_a, lora_b, scale, p, dropout_mask)


def lora_linear_addmm(x, weight, lora_a, lora_b, scale, dropout_p=0.0, training=True,
                      dropout_mask=None):
    """`lora_linear`'s signature and checks on the cuBLAS + addmm_ path."""
    p = float(dropout_p) if training else 0.0
    check_inputs(x, weight, lora_a, lora_b, p, dropout_mask)
    return lora_addmm(x, weight, lora_a, lora_b, scale, p, dropout_mask)
