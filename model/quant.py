"""A quantized frozen base: the decoder's Linear weights stored as int8, NF4 or GGUF blocks.

    load_base(spec, quant="int8" | "nf4" | "nf4-dq" | "gguf" | "none")

TALLRec trains LoRA on LLaMA-7B loaded in 8 bits (bitsandbytes' `load_in_8bit`); QLoRA on NF4.
Ours is written out (formats and maths in kernels/quant_reference.py):
- `int8`: weight-only, one absmax scale per output channel. No outlier split (bitsandbytes'
  LLM.int8() runs outlier input features in fp16; we do not), activations stay in the compute
  dtype: it is a storage format, the matmul runs in bf16/fp16/fp32.
- `nf4`: QLoRA's NF4 with 64-value absmax blocks; `nf4-dq` double-quantizes the block scales.
- `gguf`: the GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks, byte for byte as on disk.
Only the seven Linear weights of each decoder block are quantized (q k v o gate up down). The
embeddings, norms and LM head stay in the model dtype, as bitsandbytes leaves lm_head, and LoRA
factors stay fp32: an adapter trained here is the same PEFT file as on a dense base.

The matmul never forms the dense W for longer than one layer's call: on CPU it is dequantized in
torch per call, forward and backward (`QuantLinearTorch`); on CUDA the Triton kernel
(kernels/quant_matmul.py) dequantizes tiles inside the GEMM's main loop, so no dense copy exists.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from kernels.quant_reference import (
    QWeight,
    check_shape,
    dequantize,
    quant_linear_reference,
    quantize_int8,
    quantize_nf4,
    storage_bytes,
)

QUANT_MODES = ("none", "int8", "nf4", "nf4-dq", "gguf")
KERNEL_MODES = ("auto", "force", "off")
_QUANTIZABLE = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]|mlp\.(gate|up|down))_proj\.weight")


# What the memory planner may be asked for: the load modes, with GGUF named by its block format.
PLAN_FORMATS = {"none": None, "int8": ("int8", False), "nf4": ("nf4", False),
                "nf4-dq": ("nf4", True), "q8_0": ("q8_0", False), "q4_0": ("q4_0", False),
                "q4_1": ("q4_1", False)}


class QuantError(ValueError):
    pass


def check_mode(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise QuantError(f"--quant must be one of {', '.join(QUANT_MODES)}, got {mode!r}")
    return mode


def is_quantizable(name: str) -> bool:
    """Whether a parameter is a decoder Linear weight (`layers.3.mlp.up_proj.weight`)."""
    return _QUANTIZABLE.fullmatch(name) is not None


def quantize_weight(w: torch.Tensor, mode: str, name: str = "weight") -> QWeight:
    """A dense (out, in) weight -> its int8 / nf4 / nf4-dq storage."""
    if mode == "int8":
        return quantize_int8(w)
    if mode in ("nf4", "nf4-dq"):
        try:
            check_shape("nf4", *w.shape, what=name)
        except ValueError as e:
            raise QuantError(str(e)) from None
        return quantize_nf4(w, double_quant=mode == "nf4-dq")
    raise QuantError(f"cannot quantize {name} to {mode!r} on load: --quant gguf keeps a GGUF "
                     f"file's own blocks; int8, nf4 and nf4-dq quantize any checkpoint")


class QuantizedWeight(nn.Module):
    """The storage of one frozen (out, in) weight as buffers (they move with .to() and appear in
    state_dict as `<module>.weight.qdata`, `.qscales`, `.qscales2`); `linear(x)` = x Wᵀ."""

    def __init__(self, qw: QWeight, kernel: str = "auto"):
        super().__init__()
        self.fmt, self.out_features, self.in_features, self.offset = qw.fmt, qw.n, qw.k, qw.offset
        self.kernel = kernel
        self.register_buffer("qdata", qw.data)
        self.register_buffer("qscales", qw.scales)
        self.register_buffer("qscales2", qw.scales2)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.qdata.device

    @property
    def nbytes(self) -> int:
        return self.qweight().nbytes

    def qweight(self) -> QWeight:
        return QWeight(self.fmt, self.out_features, self.in_features, self.qdata, self.qscales,
                       self.qscales2, self.offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight(), dtype)

    def use_kernel(self, x: torch.Tensor) -> bool:
        """auto: the Triton kernel on CUDA, torch elsewhere; force: always the kernel (on CPU
        only under TRITON_INTERPRET=1: tests); off: always torch."""
        return self.kernel == "force" or (self.kernel == "auto" and x.is_cuda)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ in the compute dtype: autocast's dtype when autocast is on (as F.linear would
        cast), else x's. The result never requires grad through W (frozen)."""
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            x = x.to(torch.get_autocast_dtype(dev))
            with torch.autocast(dev, enabled=False):
                return self._linear(x)
        return self._linear(x)

    def _linear(self, x):
        if not self.use_kernel(x):
            return quant_linear_reference(x, self.qweight())
        try:
            from kernels.quant_matmul import quant_matmul
        except ImportError as e:  # Triton missing or too old for this device
            raise QuantError(f"the quantized matmul kernel cannot be imported on {x.device} "
                             f"({e}); install triton, or train with --no-use-kernels to "
                             f"dequantize in torch") from e
        return quant_matmul(x, self.qweight())

    def extra_repr(self):
        return (f"{self.fmt}, out={self.out_features}, in={self.in_features}, "
                f"{self.nbytes / 1024:.1f} KiB, kernel={self.kernel}")


class QuantLinear(nn.Module):
    """A frozen bias-free Linear over a quantized weight (the non-LoRA projections)."""

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.weight = weight

    def forward(self, x):
        return self.weight.linear(x)


def install(model: nn.Module, name: str, qw: QWeight, kernel: str = "auto"):
    """Put a quantized weight in place of the dense parameter `name`: inside a LoRALinear as its
    `weight`; a plain Linear is replaced by a QuantLinear."""
    from model.lora import LoRALinear

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    qweight = QuantizedWeight(qw, kernel)
    if isinstance(module, LoRALinear):
        del module.weight  # the meta/dense Parameter; a submodule takes its name
        module.weight = qweight
    else:
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QuantLinear(qweight))


def quantized_modules(model: nn.Module) -> dict[str, QuantizedWeight]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeight)}


def set_quant_kernel(model: nn.Module, mode: str):
    if mode not in KERNEL_MODES:
        raise QuantError(f"quant kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
    for m in quantized_modules(model).values():
        m.kernel = mode


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the base by kind: quantized Linear storage, dense parameters, other buffers."""
    q = sum(m.nbytes for m in quantized_modules(model).values())
    dense = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if not n.endswith(("lora_a", "lora_b")))
    return {"quantized": q, "dense": dense}


# -- memory planning ------------------------------------------------------------------------

def linear_shapes(cfg) -> list[tuple[int, int]]:
    """(out, in) of one decoder block's seven Linear weights (a model.config.LlamaConfig)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return [(q, cfg.dim), (kv, cfg.dim), (kv, cfg.dim), (cfg.dim, q),
            (cfg.hidden_dim, cfg.dim), (cfg.hidden_dim, cfg.dim), (cfg.dim, cfg.hidden_dim)]


def _plan_format(quant: str):
    if quant == "gguf":
        raise QuantError("to plan --quant gguf, name the file's block format: q8_0, q4_0 or "
                         "q4_1")
    if quant not in PLAN_FORMATS:
        raise QuantError(f"unknown quantization {quant!r} for the planner; choose among "
                         f"{', '.join(PLAN_FORMATS)}")
    return PLAN_FORMATS[quant]


def base_weight_bytes(cfg, quant: str, dense_bytes: int) -> tuple[int, int]:
    """(bytes of the quantized decoder Linear weights, bytes of everything else at
    `dense_bytes` per element): the frozen base's storage under `quant`."""
    fmt = _plan_format(quant)
    shapes = linear_shapes(cfg)
    n_linear = cfg.n_layers * sum(n * k for n, k in shapes)
    if fmt is None:
        return 0, cfg.n_params * dense_bytes
    for n, k in shapes:
        check_shape(fmt[0], n, k, what=f"a {n}x{k} Linear weight")
    q = cfg.n_layers * sum(storage_bytes(fmt[0], n, k, fmt[1]) for n, k in shapes)
    return q, (cfg.n_params - n_linear) * dense_bytes


def dequant_workspace(cfg, quant: str, impl: str, compute_bytes: int) -> int:
    """Transient bytes of one quantized matmul beyond its inputs and output. The Triton kernel
    dequantizes tiles in registers: 0. The torch path forms the largest layer's W in fp32 and
    rounds it to the compute dtype (an estimate; nf4 also holds its int64 code indices)."""
    fmt = _plan_format(quant)
    if fmt is None or impl == "triton":
        return 0
    nk = max(n * k for n, k in linear_shapes(cfg))
    extra = 8 if fmt[0] == "nf4" else 0
    return nk * (4 + (compute_bytes if compute_bytes < 4 else 0) + extra)
