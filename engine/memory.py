"""Analytical memory planner for LoRA training of our LLaMA (model/llama.py).

    plan(base, seq_len, micro_batch, lora=None, precision="bf16", checkpoint="none", ...) -> Plan
    choose(base, seq_len, budget, lora=None, precision="bf16", micro_batch=None, ...) -> Plan
    python -m engine.memory --base llama-7b --seq 512 --budget 24GiB

Peak = frozen base weights + LoRA params, grads, AdamW states (fp32)
     + activations saved for backward
     + max(recompute of one checkpointed block + backward temporaries, loss workspace)
     + runtime reserve (CUDA context, allocator slack: not in max_memory_allocated).

The activation terms are the tensors autograd actually keeps for OUR model, read off its code
and checked against `saved_tensors_hooks` on CPU (tests/test_memory.py):
- RMSNorm computes in fp32: pow and mul keep the fp32 input (a copy when the residual is
  bf16) and 1/rms; `weight * x` keeps nothing because the weight is frozen.
- A frozen linear keeps no input (no dW). A LoRA linear keeps its input for dA (torch path:
  drop(x), plus the dropout noise in the compute dtype; Triton path: x and a bool mask), and
  xa = drop(x) Aᵀ (r wide; fp32 in the Triton kernel).
- rope keeps cos/sin (shared by all layers). SDPA keeps q, k, v (after repeat_kv: n_heads
  wide), out and the fp32 logsumexp (flash / efficient / CPU flash); the math path keeps the
  scaled q, k, v and the (T × T) probabilities. A padding mask is kept per layer in the
  compute dtype by the CPU flash and CUDA efficient kernels.
- SwiGLU keeps gate, silu(gate) and up; down's input only when down has LoRA.
- The first block's input (frozen embeddings) needs no grad: its first RMSNorm keeps nothing.
- A checkpointed block keeps only its input; its activations come back in backward.
- The loss (engine/loss.py) keeps ∂L/∂h for the selected rows and their int64 index.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field

from engine.precision import Precision, get_precision
from kernels.dispatch import LORA_IMPLS
from model.config import ConfigError, LlamaConfig
from model.lora import TARGETS, LoRAConfig

BACKENDS = ("cpu-flash", "flash", "efficient", "math")
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


def _resolve_config(base: str | LlamaConfig) -> tuple[str, LlamaConfig]:
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


def block_saved(cfg: LlamaConfig, lora: LoRAConfig | None, batch: int, seq: int,
                prec: Precision, backend: str, lora_impl: str, padded: bool,
                input_requires_grad: bool = True) -> tuple[dict[str, int], bool]:
    """Bytes one non-checkpointed block keeps for backward, by tensor, for batch × seq tokens;
    and whether its output requires grad."""
    N, e, D, F = batch * seq, prec.compute_bytes, cfg.dim, cfg.hidden_dim
    HD, H = cfg.n_heads * cfg.head_dim, cfg.n_heads
    targets = set(lora.targets) if lora else set()
    drop = bool(lora and lora.dropout > 0)
    autocast = prec.compute_dtype is not None
    out: dict[str, int] = {}

    def add(name, nbytes):
        if nbytes:
            out[name] = out.get(name, 0) + nbytes

    def norm(prefix, rg):
        if rg:  # fp32 input (a copy unless already fp32) and 1/rms, (N, 1) fp32
            add(f"{prefix}.x_fp32", N * D * 4)
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
        add(f"{prefix}.lora_xa", m * N * r * e)
        add("lora.scale_scalars", m * 8)  # `scale * t` keeps the scale as a 0-dim fp64 tensor
        if autocast:  # autocast's cached compute-dtype copies of A (needs x grad) and B
            add("lora.autocast_weights", sum(r * (_in_out(cfg, n)[1] + (_in_out(cfg, n)[0]
                                                  if x_rg else 0)) * e for n in mods))

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
        add("sdpa.qkv", 3 * N * HD * e)
        add("sdpa.out", N * HD * e)
        lse_len = math.ceil(seq / 32) * 32 if backend == "efficient" else seq
        add("sdpa.lse", batch * H * lse_len * 4)
        if padded and backend == "cpu-flash":
            add("sdpa.mask", batch * seq * seq * e)
        elif padded and backend == "efficient":
            add("sdpa.mask", batch * seq * math.ceil(seq / 16) * 16 * e)
    lora_in("attn_out", ("o",), HD, qkv_rg)
    h_rg = rg or qkv_rg or "o" in targets
    norm("mlp_norm", h_rg)
    lora_in("mlp", ("gate", "up"), D, h_rg)
    g_rg, u_rg = h_rg or "gate" in targets, h_rg or "up" in targets
    add("mlp.gate", N * F * e if g_rg else 0)  # silu's input
    add("mlp.silu", N * F * e if u_rg else 0)  # silu(g) * u keeps each factor for the other
    add("mlp.up", N * F * e if g_rg else 0)
    lora_in("mlp_down", ("down",), F, g_rg or u_rg)
    return out, h_rg or g_rg or u_rg or "down" in targets


def backward_temporaries(cfg: LlamaConfig, batch: int, seq: int, prec: Precision,
                         backend: str) -> int:
    """Rough working set of one block's backward: residual grads, fp32 norm temporaries, and the
    larger of the MLP grads (dp, dg, du, silu') and the attention grads (dq, dk, dv, dy, an fp32
    dq accumulator; the math path's two T × T grads). An estimate: only a GPU can measure it."""
    N, e, w = batch * seq, prec.compute_bytes, prec.weight_bytes
    HD = cfg.n_heads * cfg.head_dim
    attn = N * HD * (4 * e + 4)
    if backend == "math":
        attn += 2 * batch * cfg.n_heads * seq * seq * e
    return N * (2 * cfg.dim * w + 2 * cfg.dim * 4) + max(4 * N * cfg.hidden_dim * e, attn)


def loss_workspace(cfg: LlamaConfig, n_rows: int, batch: int, seq: int, prec: Precision,
                   chunk: int) -> int:
    """engine/loss.py's forward: hidden states h and the selected rows, plus one chunk's logits
    (compute dtype), its fp32 copy (reused in place for the softmax grad), the grad cast back to
    the compute dtype, and the chunk's ∂L/∂h."""
    e, w, V = prec.compute_bytes, prec.weight_bytes, cfg.vocab_size
    c = min(chunk, n_rows)
    per_row = V * (e + 4 + e) if e < 4 else V * 4
    return (batch * seq + n_rows) * cfg.dim * w + c * (per_row + cfg.dim * e)


@dataclass
class Plan:
    model: str
    cfg: LlamaConfig
    lora: LoRAConfig | None
    seq_len: int
    micro_batch: int
    precision: str
    checkpoint_every: int
    backend: str
    lora_impl: str
    padded: bool
    loss_chunk: int
    budget: int | None
    reserve: int
    weights: int = 0
    lora_params: int = 0
    lora_grads: int = 0
    optimizer: int = 0
    activations: dict[str, int] = field(default_factory=dict)  # by part, for the micro-batch
    layer_tensors: dict[str, int] = field(default_factory=dict)  # one full block, by tensor
    recompute: int = 0
    backward_temp: int = 0
    loss_temp: int = 0
    why: str = ""

    @property
    def checkpoint(self) -> str:
        return checkpoint_name(self.checkpoint_every)

    @property
    def n_checkpointed(self) -> int:
        k = self.checkpoint_every
        return 0 if k == 0 else math.ceil(self.cfg.n_layers / k)

    @property
    def recompute_fraction(self) -> float:
        return self.n_checkpointed / self.cfg.n_layers

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())

    @property
    def persistent(self) -> int:
        return self.weights + self.lora_params + self.lora_grads + self.optimizer

    @property
    def peak(self) -> int:
        transient = max(self.recompute + self.backward_temp, self.loss_temp)
        return self.persistent + self.activation_bytes + transient + self.reserve

    @property
    def peak_allocated(self) -> int:
        """What torch.cuda.max_memory_allocated should show: the peak without the reserve."""
        return self.peak - self.reserve

    @property
    def fits(self) -> bool:
        return self.budget is None or self.peak <= self.budget

    def flops_per_token(self) -> float:
        """LoRA on a frozen base: forward 2N, backward 2N (dx only); recomputed blocks add
        their forward again (6N with full checkpointing). N = base parameters."""
        return (4 + 2 * self.recompute_fraction) * self.cfg.n_params

    def summary(self) -> str:
        return (f"{self.model}, seq {self.seq_len}, micro-batch {self.micro_batch}, "
                f"checkpoint {self.checkpoint}, {self.precision}: peak {fmt_bytes(self.peak)}")

    def table(self) -> str:
        tokens = self.micro_batch * self.seq_len
        lora = self.lora
        rows = [
            ("model", f"{self.model} ({self.cfg.n_params / 1e9:.2f}B params, "
                      f"{self.cfg.n_layers} layers)"),
            ("LoRA", f"r={lora.r} on {','.join(lora.targets)}, dropout {lora.dropout:g}, "
                     f"{self.lora_impl} path" if lora else "none"),
            ("shape", f"micro-batch {self.micro_batch} x seq {self.seq_len} = {tokens} tokens, "
                      f"{'padded' if self.padded else 'unpadded'}, attention {self.backend}"),
            ("precision / checkpoint", f"{self.precision} / {self.checkpoint} "
                                       f"({self.n_checkpointed} of {self.cfg.n_layers} blocks "
                                       f"recomputed)"),
            ("", ""),
            ("frozen base weights", fmt_bytes(self.weights)),
            ("LoRA params (fp32)", fmt_bytes(self.lora_params)),
            ("LoRA grads (fp32)", fmt_bytes(self.lora_grads)),
            ("AdamW states (fp32)", fmt_bytes(self.optimizer)),
        ]
        rows += [(f"activations: {k}", fmt_bytes(v)) for k, v in self.activations.items()]
        rows += [
            ("recompute of one block", fmt_bytes(self.recompute)),
            ("backward temporaries", fmt_bytes(self.backward_temp)),
            (f"loss workspace (chunk {self.loss_chunk})", fmt_bytes(self.loss_temp)),
            ("runtime reserve", fmt_bytes(self.reserve)),
            ("predicted peak", fmt_bytes(self.peak)
             + (f" of {fmt_bytes(self.budget)} budget: "
                f"{'fits' if self.fits else 'DOES NOT FIT'}" if self.budget else "")),
            ("", ""),
            ("one block, per token", ""),
        ]
        rows += [(f"  {k}", f"{v / tokens:,.1f} B") for k, v in self.layer_tensors.items()]
        rows.append(("  total", f"{sum(self.layer_tensors.values()) / tokens:,.1f} B"))
        width = max(len(k) for k, _ in rows)
        text = "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
        return text + (f"\n\nwhy: {self.why}" if self.why else "")


def plan(base: str | LlamaConfig, seq_len: int, micro_batch: int,
         lora: LoRAConfig | None = None, precision: str | Precision = "bf16",
         checkpoint: str | int = "none", backend: str = "flash", lora_impl: str = "triton",
         padded: bool = True, loss_chunk: int = 1024, budget: str | int | None = None,
         reserve: str | int = GiB) -> Plan:
    """The memory of one training step. backend: SDPA kernel ('flash'/'efficient' on CUDA,
    'cpu-flash' on CPU, 'math' anywhere; CUDA flash takes no mask, so padded -> efficient).
    lora_impl: 'triton' (the fused kernel) or 'torch' (cuBLAS + addmm_): what
    kernels.dispatch.lora_path returns for the model's kernel mode, device and micro-batch."""
    name, cfg = _resolve_config(base)
    prec = get_precision(precision)
    for what, v in (("seq_len", seq_len), ("micro_batch", micro_batch),
                    ("loss_chunk", loss_chunk)):
        if not isinstance(v, int) or v <= 0:
            raise PlanError(f"{what} must be a positive integer, got {v!r}")
    if seq_len > cfg.max_seq_len:
        raise PlanError(f"seq_len {seq_len} exceeds {name}'s max_seq_len {cfg.max_seq_len}")
    if backend not in BACKENDS:
        raise PlanError(f"unknown attention backend {backend!r}; choose among {BACKENDS}")
    if lora_impl not in LORA_IMPLS:
        raise PlanError(f"unknown LoRA implementation {lora_impl!r}; choose among {LORA_IMPLS}")
    if backend == "flash" and padded:
        backend = "efficient"  # what SDPA picks on CUDA when given a mask
    k = parse_checkpoint(checkpoint, cfg.n_layers)
    B, T = micro_batch, seq_len
    N = B * T
    budget = parse_bytes(budget) if budget is not None else None
    p = Plan(name, cfg, lora, T, B, prec.name, k, backend, lora_impl, padded, loss_chunk, budget,
             parse_bytes(reserve) if reserve else 0)

    n_lora, n_lora_tensors = lora_param_count(cfg, lora)
    p.weights = cfg.n_params * prec.weight_bytes
    p.lora_params = p.lora_grads = n_lora * 4
    p.optimizer = n_lora * 8 + n_lora_tensors * 4  # exp_avg, exp_avg_sq, and a 0-dim fp32 step

    # Walk the blocks as the model does: block i is checkpointed when k and i % k == 0.
    stored, ckpt_inputs, consts, rg = 0, 0, {}, False
    for i in range(cfg.n_layers):
        saved, out_rg = block_saved(cfg, lora, B, T, prec, backend, lora_impl, padded, rg)
        if k and i % k == 0:
            ckpt_inputs += N * cfg.dim * prec.weight_bytes
            p.recompute = max(p.recompute, sum(saved.values()))
        else:
            for c in ("lora.scale_scalars", "lora.autocast_weights"):
                consts[c] = consts.get(c, 0) + saved.pop(c, 0)
            stored += sum(saved.values())
        if i == 1 or cfg.n_layers == 1:
            p.layer_tensors = saved
        rg = out_rg
    n_rows = B * (T - 1)  # worst case: every position carries loss
    p.activations = {
        "blocks (stored)": stored,
        "checkpointed block inputs": ckpt_inputs,
        "rope cos/sin + mask (shared)": 2 * N * cfg.head_dim * prec.compute_bytes
        + (B * T * T if padded and k else 0),
        "final norm": N * (cfg.dim * 4 + 4) if rg else 0,
        "loss: dL/dh + row index": n_rows * (cfg.dim * prec.weight_bytes + 8),
        "LoRA scalars, autocast copies": sum(consts.values()),
    }
    p.backward_temp = backward_temporaries(cfg, B, T, prec, backend)
    p.loss_temp = loss_workspace(cfg, n_rows, B, T, prec, loss_chunk)
    return p


def _policies(n_layers: int) -> list[int]:
    """checkpoint_every values from the least recomputation to the most, one per distinct
    number of checkpointed blocks."""
    seen, out = set(), [0]
    for k in range(n_layers, 0, -1):
        n = math.ceil(n_layers / k)
        if n not in seen:
            seen.add(n)
            out.append(k)
    return out


def choose(base: str | LlamaConfig, seq_len: int, budget: str | int,
           lora: LoRAConfig | None = None, precision: str | Precision = "bf16",
           micro_batch: int | None = None, checkpoint: str | int | None = None,
           min_tokens: int = 4096, max_micro_batch: int = 32, **kw) -> Plan:
    """The plan the training loop should run under `budget`, or PlanError naming the nearest
    plan that fits.

    Rule: a micro-batch of `min_tokens` tokens (8 x 512) keeps the GEMMs near peak; past that,
    memory is better spent on less recomputation (each recomputed block costs +50% of its
    compute). So: the cheapest checkpointing policy that fits ceil(min_tokens / seq_len)
    sequences, then the largest micro-batch (<= max_micro_batch) that policy still fits.
    A fixed micro_batch and/or checkpoint is honoured; only the other one is chosen."""
    budget_b = parse_bytes(budget)
    _, cfg = _resolve_config(base)
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch <= 0):
        raise PlanError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    if max_micro_batch <= 0 or min_tokens <= 0:
        raise PlanError("max_micro_batch and min_tokens must be positive")
    policies = ([parse_checkpoint(checkpoint, cfg.n_layers)] if checkpoint is not None
                else _policies(cfg.n_layers))
    mk = lambda mb, k: plan(base, seq_len, mb, lora, precision, k, budget=budget_b, **kw)

    def largest(k, hi):  # largest micro-batch <= hi that fits with policy k (peak is monotone)
        lo, best = 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            if mk(mid, k).fits:
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
        return best

    most = policies[-1]  # the most memory-frugal policy allowed
    if not mk(1, most).fits:
        need = mk(1, most).peak
        raise PlanError(f"budget {fmt_bytes(budget_b)} is too small even for micro-batch 1 with "
                        f"checkpointing {checkpoint_name(most)} (needs {fmt_bytes(need)}, "
                        f"{need} bytes); the smallest budget that works is {fmt_bytes(need)}")
    if micro_batch is not None:
        for k in policies:
            p = mk(micro_batch, k)
            if p.fits:
                p.why = (f"micro-batch {micro_batch} was given; {p.checkpoint} is the least "
                         f"recomputation that fits it")
                if k != policies[0]:
                    p.why += (f" ({checkpoint_name(policies[0])} needs "
                              f"{fmt_bytes(mk(micro_batch, policies[0]).peak)})")
                return p
        mb = largest(most, micro_batch)
        raise PlanError(
            f"micro-batch {micro_batch} does not fit {fmt_bytes(budget_b)} even with checkpointing "
            f"{checkpoint_name(most)} (needs {fmt_bytes(mk(micro_batch, most).peak)}); nearest "
            f"plan that fits: micro-batch {mb} with checkpointing {checkpoint_name(most)} "
            f"({fmt_bytes(mk(mb, most).peak)})")
    target = min(max_micro_batch, math.ceil(min_tokens / seq_len))
    for k in policies:
        if mk(target, k).fits:
            mb = largest(k, max_micro_batch)
            p = mk(mb, k)
            cheaper = [c for c in policies if c != k and policies.index(c) < policies.index(k)]
            p.why = (f"{p.checkpoint} is the least recomputation "
                     f"({p.n_checkpointed}/{cfg.n_layers} blocks) that fits micro-batch {target} "
                     f"(= {min_tokens} tokens / seq {seq_len})")
            if cheaper:
                c = cheaper[-1]
                p.why += (f"; {checkpoint_name(c)} would need "
                          f"{fmt_bytes(mk(target, c).peak)}")
            p.why += (f"; with it, micro-batch {mb} is the largest that fits"
                      + (f" (capped at {max_micro_batch})" if mb == max_micro_batch else
                         f" ({mb + 1} needs {fmt_bytes(mk(mb + 1, k).peak)})"))
            return p
    mb = largest(most, target)
    k = next(k for k in policies if mk(mb, k).fits)
    p = mk(mb, k)
    p.why = (f"not even {target} sequences fit with checkpointing {checkpoint_name(most)} "
             f"(needs {fmt_bytes(mk(target, most).peak)}); micro-batch {mb} is the largest that "
             f"fits, and {p.checkpoint} the least recomputation that fits it")
    return p


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m engine.memory",
        description="Plan the GPU memory of LoRA training: weights, adapter and optimizer, "
                    "activations, loss, peak; pick a micro-batch and checkpointing policy.")
    ap.add_argument("--base", default="llama-7b",
                    help="model preset name (llama-7b, smollm2-135m, tiny, ...; random:<preset> "
                         "is accepted too)")
    ap.add_argument("--seq", type=int, default=512, help="sequence length in tokens")
    ap.add_argument("--budget", default="24GiB",
                    help="memory budget, e.g. 24GiB (an RTX 3090), 80GiB, 16000MiB")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank")
    ap.add_argument("--targets", default="q,v",
                    help="comma-separated LoRA targets among " + ",".join(TARGETS))
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (TALLRec: 0.05)")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="sequences per forward/backward; default: chosen for the budget")
    ap.add_argument("--checkpoint", default=None,
                    help="gradient checkpointing: none, full, or every-k (every k-th block); "
                         "default: the cheapest that fits")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"],
                    help="bf16/fp16: base weights in that dtype + autocast; fp32: no autocast")
    ap.add_argument("--loss-chunk", type=int, default=1024,
                    help="rows per LM-head chunk in the chunked cross-entropy")
    ap.add_argument("--backend", default="flash", choices=BACKENDS,
                    help="SDPA kernel: flash (CUDA; padded batches use efficient), efficient, "
                         "cpu-flash, math")
    ap.add_argument("--lora-impl", default="triton", choices=LORA_IMPLS,
                    help="LoRA layer: triton (fused kernel) or torch (cuBLAS + addmm_)")
    ap.add_argument("--unpadded", action="store_true",
                    help="batches carry no padding mask (default: padded, as collate_train)")
    ap.add_argument("--reserve", default="1GiB",
                    help="memory the CUDA context and allocator slack take outside PyTorch's "
                         "allocations")
    ap.add_argument("--max-micro-batch", type=int, default=32,
                    help="largest micro-batch to consider (TALLRec: 32)")
    ap.add_argument("--min-tokens", type=int, default=4096,
                    help="tokens per micro-batch to reach before trading memory for less "
                         "recomputation")
    args = ap.parse_args(argv)
    try:
        lora = LoRAConfig(r=args.r, dropout=args.dropout, targets=args.targets.split(","))
        kw = dict(backend=args.backend, lora_impl=args.lora_impl, padded=not args.unpadded,
                  loss_chunk=args.loss_chunk, reserve=args.reserve)
        if args.micro_batch is not None and args.checkpoint is not None:
            p = plan(args.base, args.seq, args.micro_batch, lora, args.precision,
                     args.checkpoint, budget=args.budget, **kw)
        else:
            p = choose(args.base, args.seq, args.budget, lora, args.precision,
                       micro_batch=args.micro_batch, checkpoint=args.checkpoint,
                       min_tokens=args.min_tokens, max_micro_batch=args.max_micro_batch, **kw)
    except (PlanError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(p.table())
    return 0 if p.fits else 1


if __name__ == "__main__":
    sys.exit(main())
