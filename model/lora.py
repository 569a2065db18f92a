"""LoRA written out: y = x Wᵀ + s·(drop(x) Aᵀ) Bᵀ with W frozen, s = alpha / r.

Hu et al. 2021. `LoRALinear` keeps `nn.Linear`'s `weight` key, so a base checkpoint loads into
a LoRA model unchanged; the adapter is only `lora_a` (r × in) and `lora_b` (out × r).
Two paths, one contract (`kernels/lora.py`'s): the fused Triton kernel and torch (cuBLAS
x Wᵀ plus an in-place addmm_ of the low-rank term, `kernels.reference.lora_addmm`). Both draw the
dropout mask the same way (a torch bool mask of x's shape, `make_dropout_mask`), so from the
same RNG state they drop the same elements and "kernels on vs off" can be compared with dropout
on. `LoRAConfig.kernel` is the mode `kernels.dispatch.lora_path` decides the path from: "auto"
runs the kernel on CUDA where it was measured faster, "force" on every call (on CPU through
TRITON_INTERPRET=1: tests), "off" never.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from kernels.cpu_bf16 import linear
from kernels.dispatch import KERNEL_MODES, lora_path
from kernels.reference import lora_addmm, lora_reference, make_dropout_mask

__all__ = ["KERNEL_MODES", "TARGETS", "LoRAConfig", "LoRAError", "LoRALinear", "lora_modules",
           "lora_reference", "lora_state_dict", "make_dropout_mask", "make_linear", "merge_lora",
           "mark_only_lora_trainable", "set_kernel", "trainable_summary", "unmerge_lora"]

# Our short target names -> the module names HF/PEFT use.
TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
           "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class LoRAError(ValueError):
    pass


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    kernel: str = "auto"  # fused Triton path: "auto" (CUDA), "force" (always), "off" (never)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise LoRAError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.kernel not in KERNEL_MODES:
            raise LoRAError(f"LoRA kernel mode must be one of {KERNEL_MODES}, got {self.kernel!r}")
        # Accept PEFT's names too ("q_proj") and normalise to ours.
        to_short = {v: k for k, v in TARGETS.items()}
        targets = [to_short.get(t, t) for t in self.targets]
        unknown = [t for t in targets if t not in TARGETS]
        if unknown or not targets:
            raise LoRAError(f"unknown LoRA target modules {unknown or targets}; "
                            f"choose among {', '.join(TARGETS)}")
        self.targets = sorted(set(targets), key=list(TARGETS).index)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.r, self.scale, self.dropout, self.kernel = r, alpha / r, dropout, kernel
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        # nn.Linear's init: checkpoints overwrite it, but `random:<preset>` bases keep it.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.lora_a = nn.Parameter(torch.empty(r, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, r))
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self, device=None):
        """Kaiming-uniform(√5) A and zero B, as PEFT: the adapter starts as the identity."""
        if device is not None or self.lora_a.is_meta:
            device = device or torch.device("cpu")
            self.lora_a = nn.Parameter(torch.empty(self.r, self.in_features, device=device))
            self.lora_b = nn.Parameter(torch.empty(self.out_features, self.r, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    def forward(self, x):
        if self.merged:
            if self.training and self.lora_a.requires_grad and torch.is_grad_enabled():
                # The merged weight is frozen: the adapter would silently get no gradient.
                raise LoRAError("training through a merged LoRA layer; call unmerge_lora first")
            return linear(x, self.weight)
        p = self.dropout if self.training else 0.0
        # A quantized W (model/quant.py) skips the fused kernel, which takes a dense W, and
        # gives lora_addmm its own base product (dequantizing W itself).
        if not self.quantized and self.use_fused(x):
            # Imported here: Triton is only needed where the kernel runs.
            from kernels.lora import lora_linear

            return lora_linear(x, self.weight, self.lora_a, self.lora_b, self.scale, p)
        return lora_addmm(x, self.weight, self.lora_a, self.lora_b, self.scale, p)

    def use_fused(self, x: torch.Tensor) -> bool:
        # The compute dtype: autocast's where it is on (the kernel then gets that dtype's x).
        dtype = (torch.get_autocast_dtype(x.device.type)
                 if torch.is_autocast_enabled(x.device.type) else x.dtype)
        tokens = x.numel() // self.in_features
        return lora_path(self.kernel, x.device.type, dtype, tokens, self.r) == "triton"

    @property
    def quantized(self) -> bool:
        """Whether the frozen weight is a model.quant.QuantizedWeight, not a dense tensor."""
        return not isinstance(self.weight, torch.Tensor)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_b.float() @ self.lora_a.float())  # (out, in), fp32

    @torch.no_grad()
    def merge(self):
        if self.quantized:
            raise LoRAError("cannot merge LoRA into a quantized base weight (rounding would "
                            "change the adapter); load the base with --quant none to merge")
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def extra_repr(self):
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, dropout={self.dropout:g}, kernel={self.kernel}")


class Linear(nn.Linear):
    """A bias-free nn.Linear (LLaMA's; same parameter and key) whose product is
    kernels.cpu_bf16.linear: fp32 GEMMs where bf16 would be emulated in software, F.linear
    everywhere else."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return linear(x, self.weight)


def make_linear(in_features: int, out_features: int, name: str, lora: LoRAConfig | None):
    if lora is not None and name in lora.targets:
        return LoRALinear(in_features, out_features, lora.r, lora.alpha, lora.dropout,
                          lora.kernel)
    return Linear(in_features, out_features)


def set_kernel(model: nn.Module, mode: str):
    """Switch every LoRA layer of a built model to kernel mode "auto", "force" or "off"."""
    if mode not in KERNEL_MODES:
        raise LoRAError(f"LoRA kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    for m in lora_modules(model).values():
        m.kernel = mode
    if getattr(model, "lora_cfg", None) is not None:
        model.lora_cfg.kernel = mode


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze everything but the adapters; returns the trainable parameter count."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_a", "lora_b")))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_summary(model: nn.Module) -> str:
    """PEFT's `print_trainable_parameters` line (tied embeddings counted once)."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return (f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone, in our key names (`layers.0.self_attn.q_proj.lora_a`)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_a", "lora_b"))}


def merge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_modules(model).values():
        m.unmerge()
