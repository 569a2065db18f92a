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

    policy = default_precision(device)            # or get_precision("bf16")
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


def default_precision(device: str | torch.device = "cpu", cpu_bf16: bool = False) -> Precision:
    """bf16 where the GPU has it (Ampere and later), else fp16 with loss scaling; on CPU fp32
    (exact, the test default) or, with cpu_bf16, bf16 autocast (about 1.6x faster here)."""
    device = torch.device(device)
    if device.type == "cuda":
        # Native bf16 tensor cores from Ampere (sm_80) on; older cards would only emulate it.
        major, _ = torch.cuda.get_device_capability(device)
        return PRECISIONS["bf16" if major >= 8 else "fp16"]
    return PRECISIONS["bf16" if cpu_bf16 else "fp32"]


def resolve_precision(device: str = "auto", precision: str = "auto",
                      cpu_bf16: bool = False) -> tuple[torch.device, Precision]:
    """The CLIs' --device/--precision: 'auto' takes CUDA when present and its best policy."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    dev = torch.device(device)
    policy = default_precision(dev, cpu_bf16) if precision == "auto" else get_precision(precision)
    return dev, policy
