"""Which LoRA path runs: the fused Triton kernel or torch (cuBLAS + addmm_). One function,
`lora_path`, decides; the layer (model/lora.py) asks it per call and the memory planner
(engine/train.py → engine/memory.plan's lora_impl) asks it for the planned micro-batch, so the
plan describes the path that will run. Imports torch only: deciding needs no Triton.
"""

from __future__ import annotations

import os

import torch

# Triton decides at decoration time whether @triton.jit builds an interpreted function, from
# this variable; read it the same way, once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
KERNEL_MODES = ("auto", "force", "off")
LORA_IMPLS = ("torch", "triton")

# Where the fused kernel beat the cuBLAS + addmm_ path on forward + backward (bench_lora.py,
# dropout 0.05 and off): dtype -> (fewest tokens M, largest rank r). PROVISIONAL: empty until a
# GPU run measures it, so "auto" takes the addmm_ path everywhere. Fill it from the `full` rows
# of bench/RESULTS.md, and only for 16-bit dtypes: fp32 runs IEEE on CUDA cores, unmeasured.
MEASURED_FASTER: dict[torch.dtype, tuple[int, int]] = {}


def use_triton(x: torch.Tensor, *, allow_interpreter: bool = False) -> bool:
    """Whether the fused kernels can run on x: CUDA tensors, or CPU tensors when the caller
    asks for it and TRITON_INTERPRET=1 was set before the kernels were imported."""
    return x.is_cuda or (allow_interpreter and INTERPRET and x.device.type == "cpu")


def fused_is_faster(num_tokens: int, rank: int, dtype: torch.dtype) -> bool:
    """True only where bench_lora.py measured the fused kernel faster than cuBLAS + addmm_
    (`MEASURED_FASTER`); unmeasured dtypes and shapes take the torch path."""
    if dtype not in (torch.float16, torch.bfloat16):  # fp32/fp64: correctness paths only
        return False
    rule = MEASURED_FASTER.get(dtype)
    return rule is not None and num_tokens >= rule[0] and rank <= rule[1]


def lora_path(mode: str, device_type: str, dtype: torch.dtype, num_tokens: int,
              rank: int) -> str:
    """'triton' or 'torch' for a LoRA layer of rank `rank` over `num_tokens` rows in `dtype`.

    mode "off": torch. "force": triton on every call (on CPU through TRITON_INTERPRET=1; the
    kernel says why when it cannot run). "auto": triton on CUDA where `fused_is_faster`."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"LoRA kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    if mode == "force":
        return "triton"
    if mode == "auto" and device_type == "cuda" and fused_is_faster(num_tokens, rank, dtype):
        return "triton"
    return "torch"
