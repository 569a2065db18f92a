"""The byte model of one LoRA training step on our LLaMA: what each tensor costs.

Counts of the frozen weights, the adapter and its optimizer, the activations one block
keeps for backward (by tensor), the backward temporaries and the loss workspace; the
derivation of each term is in `engine/memory/__init__.py`. `plan.py` adds them up."""

from __future__ import annotations

import math
import re

from engine.precision import Precision
from model.config import ConfigError, LlamaConfig
from model.lora import LoRAConfig

# cpu-flash-fp32: a bf16 run on a CPU without bf16 instructions (kernels/cpu_bf16.py), whose
# attention and LoRA addmm_ keep fp32 copies of what they save
BACKENDS = ("cpu-flash", "cpu-flash-fp32", "flash", "efficient", "math")
GiB = 1 << 30


class PlanError(ValueError):
    pass


def parse_bytes(text: str | int) -> int:
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(-?[0-9.]+)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise PlanError(f"cannot read a size from {text!r} (e.g. 24GiB, 512MiB, 1e9)")
        unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
        size = int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GiB,
                                        "T": 1 << 40}[unit])
    if size <= 0:
        raise PlanError(f"a memory size must be positive, got {text!r}")
    return size


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def parse_checkpoint(policy: str | int, n_layers: int) -> int:
    """'none' -> 0, 'full' -> 1, 'every-k' -> k: the model's `checkpoint_every`."""
    if isinstance(policy, int):
        k = policy
    elif policy == "none":
        k = 0
    elif policy == "full":
        k = 1
    elif m := re.fullmatch(r"every-(\d+)", str(policy)):
        k = int(m.group(1))
    else:
        raise PlanError(f"unknown checkpointing policy {policy!r}: none, full or every-k")
    if k < 0:
        raise PlanError(f"checkpoint_every must be >= 0, got {k}")
    return k


def checkpoint_name(k: int) -> str:
    return {0: "none", 1: "full"}.get(k, f"every-{k}")


def resolve_config(base: str | LlamaConfig) -> tuple[str, LlamaConfig]:
    if isinstance(base, LlamaConfig):
        return "custom", base
    name = base.split(":", 1)[1] if base.startswith("random:") else base
    try:
        return name, LlamaConfig.from_preset(name)
    except ConfigError as e:
        raise PlanError(str(e)) from None


def _in_out(cfg: LlamaConfig, name: str) -> tuple[int, int]:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": (cfg.dim, q), "k": (cfg.dim, kv), "v": (cfg.dim, kv), "o": (q, cfg.dim),
            "gate": (cfg.dim, cfg.hidden_dim), "up": (cfg.dim, cfg.hidden_dim),
            "down": (cfg.hidden_dim, cfg.dim)}[name]


def lora_param_count(cfg: LlamaConfig, lora: LoRAConfig | None) -> tuple[int, int]:
    """(LoRA parameter count, number of LoRA tensors)."""
    if lora is None:
        return 0, 0
    per_layer = sum(lora.r * sum(_in_out(cfg, t)) for t in lora.targets)
    return cfg.n_layers * per_layer, cfg.n_layers * 2 * len(lora.targets)


def saved_elem_bytes(backend: str, e: int) -> int:
    """Bytes per element of what attention and the LoRA addmm_ keep for backward: fp32 on
    cpu-flash-fp32 (kernels/cpu_bf16.py computes them in fp32), else the compute dtype's e."""
    return 4 if backend == "cpu-flash-fp32" else e


def block_saved(cfg: LlamaConfig, lora: LoRAConfig | None, batch: int, seq: int,
                prec: Precision, backend: str, lora_impl: str, padded: bool,
                input_requires_grad: bool = True) -> tuple[dict[str, int], bool]:
    """Bytes one non-checkpointed block keeps for backward, by tensor, for batch × seq tokens;
    and whether its output requires grad."""
    N, e, D, F = batch * seq, prec.compute_bytes, cfg.dim, cfg.hidden_dim
    HD, H = cfg.n_heads * cfg.head_dim, cfg.n_heads
    targets = set(lora.targets) if lora else set()
    ea = saved_elem_bytes(backend, e)  # attention's inputs, output, mask; addmm_'s xa and B
    drop = bool(lora and lora.dropout > 0)
    autocast = prec.compute_dtype is not None
    out: dict[str, int] = {}

    def add(name, nbytes):
        if nbytes:
            out[name] = out.get(name, 0) + nbytes

    def norm(prefix, rg):
        if rg:  # model/ops.py's rms_norm: its input (the residual stream, in the weights'
            # dtype) and 1/rms, (N, 1) fp32
            add(f"{prefix}.x", N * D * prec.weight_bytes)
            add(f"{prefix}.rstd", N * 4)

    def lora_in(prefix, names, in_dim, x_rg):
        mods = [n for n in names if n in targets]
        if not mods:
            return
        m, r = len(mods), lora.r
        if lora_impl == "triton":  # LoRAFunction saves x (one storage for all), mask, xa fp32
            add(f"{prefix}.lora_x", N * in_dim * e)
            add(f"{prefix}.lora_mask", m * N * in_dim if drop else 0)
            add(f"{prefix}.lora_xa", m * N * r * 4)
            return
        if drop:  # x * mask * 1/(1-p) keeps the bool mask and the scalar when x needs grad;
            # mm keeps drop(x) for dA
            add(f"{prefix}.lora_xdrop", m * N * in_dim * e)
            add(f"{prefix}.lora_mask", m * N * in_dim if x_rg else 0)
            add("lora.scale_scalars", m * 8 if x_rg else 0)
        else:
            add(f"{prefix}.lora_x", N * in_dim * e)
        add(f"{prefix}.lora_xa", m * N * r * ea)
        add("lora.scale_scalars", m * 8)  # `scale * t` keeps the scale as a 0-dim fp64 tensor
        if autocast:  # compute-dtype copies of B (addmm_'s) and of A (autocast's; needs x grad)
            add("lora.autocast_weights", sum(r * (_in_out(cfg, n)[1] * ea + (
                _in_out(cfg, n)[0] * e if x_rg else 0)) for n in mods))

    rg = input_requires_grad
    norm("attn_norm", rg)
    lora_in("attn", ("q", "k", "v"), D, rg)
    q_rg, k_rg, v_rg = (rg or t in targets for t in ("q", "k", "v"))
    qkv_rg = q_rg or k_rg or v_rg
    if backend == "math":
        # Composite ops, in fp32 even under autocast (the math path upcasts bf16/fp16):
        # s = (q·√c)(k·√c)ᵀ keeps each factor for the other's grad, softmax its result,
        # probs @ v keeps v for d(probs) and probs for dv.
        add("sdpa.q", N * HD * 4 if k_rg else 0)
        add("sdpa.k", N * HD * 4 if q_rg else 0)
        add("sdpa.v", N * HD * 4 if q_rg or k_rg else 0)
        add("sdpa.probs", batch * H * seq * seq * 4 if qkv_rg else 0)
    elif qkv_rg:  # one fused op: everything is kept as soon as any input needs grad
        # CPU flash reads grouped K/V (enable_gqa, model/llama.py): K and V stay n_kv wide.
        cpu = backend.startswith("cpu-flash")
        KVD = cfg.n_kv_heads * cfg.head_dim if cpu else HD
        add("sdpa.qkv", N * (HD + 2 * KVD) * ea)
        add("sdpa.out", N * HD * ea)
        lse_len = math.ceil(seq / 32) * 32 if backend == "efficient" else seq
        add("sdpa.lse", batch * H * lse_len * 4)
        if padded and cpu:
            add("sdpa.mask", batch * seq * seq * ea)
        elif padded and backend == "efficient":
            add("sdpa.mask", batch * seq * math.ceil(seq / 16) * 16 * e)
    lora_in("attn_out", ("o",), HD, qkv_rg)
    h_rg = rg or qkv_rg or "o" in targets
    norm("mlp_norm", h_rg)
    lora_in("mlp", ("gate", "up"), D, h_rg)
    g_rg, u_rg = h_rg or "gate" in targets, h_rg or "up" in targets
    # model/ops.py's swiglu keeps gate and up (silu(gate) is recomputed in backward)
    add("mlp.gate_up", 2 * N * F * e if g_rg or u_rg else 0)
    lora_in("mlp_down", ("down",), F, g_rg or u_rg)
    return out, h_rg or g_rg or u_rg or "down" in targets


def backward_temporaries(cfg: LlamaConfig, batch: int, seq: int, prec: Precision,
                         backend: str) -> int:
    """Rough working set of one block's backward: residual grads, fp32 norm temporaries, and the
    larger of the MLP grads (dp, dg, du, silu') and the attention grads (dq, dk, dv, dy, an fp32
    dq accumulator; the math path's two T × T grads). An estimate: only a GPU can measure it."""
    N, e, w = batch * seq, prec.compute_bytes, prec.weight_bytes
    HD = cfg.n_heads * cfg.head_dim
    attn = N * HD * (4 * saved_elem_bytes(backend, e) + 4)
    if backend == "math":
        attn += 2 * batch * cfg.n_heads * seq * seq * e
    return N * (2 * cfg.dim * w + 2 * cfg.dim * 4) + max(4 * N * cfg.hidden_dim * e, attn)


def loss_workspace(cfg: LlamaConfig, n_rows: int, batch: int, seq: int, prec: Precision,
                   chunk: int, fp32_gemm: bool = False) -> int:
    """engine/loss.py's forward: hidden states h and the selected rows, plus one chunk's logits
    (compute dtype), its fp32 copy (reused in place for the softmax grad), the grad cast back to
    the compute dtype, and the chunk's ∂L/∂h. fp32_gemm (kernels/cpu_bf16.py): each product
    also makes an fp32 copy of the head's weight and an fp32 (chunk, V) result."""
    e, w, V = prec.compute_bytes, prec.weight_bytes, cfg.vocab_size
    c = min(chunk, n_rows)
    per_row = V * (e + 4 + e) if e < 4 else V * 4
    extra = V * cfg.dim * 4 + c * V * 4 if fp32_gemm else 0
    return (batch * seq + n_rows) * cfg.dim * w + c * (per_row + cfg.dim * e) + extra
