"""Precision policies: how the frozen base, the adapter, the compute and the loss are typed.

    base weights   stored once in `weight_dtype` (bf16/fp16; fp32 only in the fp32 policy).
                   They are frozen, so they need no fp32 master copy, no grad, no optimizer state.
    LoRA params    fp32 (their grads and AdamW states too); autocast rounds them to the compute
                   dtype as operands, so the update itself never loses bits.
    compute        under torch.autocast(compute_dtype); RMSNorm statistics (model/llama.py),
                   softmax statistics inside SDPA and the loss (engine/loss.py) stay fp32.
    fp16           has 5 exponent bits: gradients underflow without loss scaling, so its policy
                   carries a dynamic GradScaler (skip the step on inf/NaN, halve the scale).

Usage in a training step:

    policy = default_precision(device)            # bf16 where the hardware has it
    model = load_base(spec, dtype=policy.weight_dtype, ...)
    scaler = policy.make_scaler(device)           # disabled (a no-op) unless fp16
    with policy.autocast(device):
        loss, n = causal_lm_loss(model, ids, mask, labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)                        # skipped when a grad is inf/NaN
    scaler.update()
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kernels.cpu_bf16 import cpu_bf16_support


@dataclass(frozen=True)
class Precision:
    name: str
    weight_dtype: torch.dtype  # frozen base weights (and the residual stream)
    compute_dtype: torch.dtype | None  # autocast dtype; None = no autocast (plain fp32)
    loss_scaling: bool  # dynamic loss scaling (fp16 only)

    @property
    def weight_bytes(self) -> int:
        return torch.finfo(self.weight_dtype).bits // 8

    @property
    def compute_bytes(self) -> int:
        return torch.finfo(self.compute_dtype or self.weight_dtype).bits // 8

    def autocast(self, device: str | torch.device):
        device_type = torch.device(device).type
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute_dtype)

    def make_scaler(self, device: str | torch.device, init_scale: float = 2.0**16):
        """A GradScaler that is a no-op unless this policy needs loss scaling."""
        return torch.amp.GradScaler(torch.device(device).type, init_scale=init_scale,
                                    enabled=self.loss_scaling)


PRECISIONS = {
    "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16, loss_scaling=False),
    "fp16": Precision("fp16", torch.float16, torch.float16, loss_scaling=True),
    "fp32": Precision("fp32", torch.float32, None, loss_scaling=False),
}


def get_precision(name: str | Precision) -> Precision:
    if isinstance(name, Precision):
        return name
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose among {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def default_precision(device: str | torch.device = "cpu",
                      cpu_bf16: bool | None = None) -> Precision:
    """bf16 where the GPU has it (Ampere and later), else fp16 with loss scaling; on CPU bf16
    where the CPU computes it natively (about 1.6x faster than fp32 here), else fp32.
    cpu_bf16 forces the CPU choice (None = detect)."""
    return _default(torch.device(device), cpu_bf16)[0]


def _default(device: torch.device, cpu_bf16: bool | None) -> tuple[Precision, str]:
    if device.type == "cuda":
        # Native bf16 tensor cores from Ampere (sm_80) on; older cards would only emulate it.
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return PRECISIONS["bf16"], f"the GPU (sm_{major}{minor}) has bf16"
        return PRECISIONS["fp16"], f"the GPU (sm_{major}{minor}) has no bf16"
    if cpu_bf16 is None:
        native, why = cpu_bf16_support()
    else:
        native, why = cpu_bf16, "asked for by the caller"
    return PRECISIONS["bf16" if native else "fp32"], why


def resolve_precision(device: str = "auto", precision: str = "auto",
                      cpu_bf16: bool | None = None) -> tuple[torch.device, Precision]:
    """The CLIs' --device/--precision: 'auto' takes CUDA when present and its best policy."""
    dev, policy, _ = explain_precision(device, precision, cpu_bf16)
    return dev, policy


def emulated_bf16_warning(device: str | torch.device, policy: str | Precision,
                          cpu_bf16: bool | None = None) -> str | None:
    """Why bf16 asked for on a CPU without native bf16 is slower than it need be, or None.
    There torch emulates bf16 GEMMs in software (a cpu-preset run trained at 6 tokens/s on an
    AVX2-only EPYC), so kernels/cpu_bf16.py runs them as fp32 GEMMs of the bf16 operands:
    156 tokens/s there, 0.93x fp32 in the same run (bench/bench_cpu_bf16.py)."""
    if (policy.name if isinstance(policy, Precision) else policy) != "bf16":
        return None  # auto never picks emulated bf16
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type != "cpu":
        return None
    if cpu_bf16 is None:
        cpu_bf16 = cpu_bf16_support()[0]
    if cpu_bf16:
        return None
    return ("this CPU has neither AVX512-BF16 nor AMX-BF16, so bf16 GEMMs run as fp32 GEMMs "
            "of bf16 operands (kernels/cpu_bf16.py): bf16's numbers, but slower than fp32 "
            "(about 0.9x) and 2-4x slower than a CPU with native bf16; --precision fp32 (or "
            "auto, which picks fp32 on this CPU) is faster here")


def explain_precision(device: str = "auto", precision: str = "auto",
                      cpu_bf16: bool | None = None) -> tuple[torch.device, Precision, str]:
    """resolve_precision plus the one-line reason the run header prints."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    dev = torch.device(device)
    if precision != "auto":
        policy = get_precision(precision)
        why = f"{policy.name} on {dev.type} (--precision {precision})"
        warning = emulated_bf16_warning(dev, policy, cpu_bf16)
        return dev, policy, why + (f"; WARNING: {warning}" if warning else "")
    policy, why = _default(dev, cpu_bf16)
    return dev, policy, f"{policy.name} on {dev.type} (auto: {why}; --precision overrides)"
