"""`plan`: the memory of one training step (a `Plan`, printable as a table); `choose`: the
micro-batch and checkpointing policy the training loop should run under a budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.memory.bytemodel import (
    BACKENDS,
    GiB,
    PlanError,
    backward_temporaries,
    block_saved,
    checkpoint_name,
    fmt_bytes,
    lora_param_count,
    loss_workspace,
    parse_bytes,
    parse_checkpoint,
    resolve_config,
)
from engine.precision import Precision, get_precision
from kernels.dispatch import LORA_IMPLS
from model.config import LlamaConfig
from model.lora import LoRAConfig
from model.quant import QuantError, base_weight_bytes, dequant_workspace


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
    quant: str = "none"
    quant_weights: int = 0  # of `weights`, the quantized decoder Linear weights
    dequant_temp: int = 0  # transient dense W of the torch dequantize path
    offload: bool = False  # checkpointed block inputs kept in host memory (model/llama.py)
    host_offload: int = 0  # their pinned host bytes: not device memory, not in the peak
    weights: int = 0
    lora_params: int = 0
    lora_grads: int = 0
    optimizer: int = 0
    ddp_world: int = 1  # ranks under torchrun; this is one rank's plan
    ddp_buckets: int = 0  # DDP's flat all-reduce buckets: a copy of every trainable grad
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
        return self.weights + self.lora_params + self.lora_grads + self.optimizer + \
            self.ddp_buckets

    @property
    def peak(self) -> int:
        transient = max(self.recompute + self.backward_temp + self.dequant_temp, self.loss_temp)
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
                f"checkpoint {self.checkpoint}{' offloaded' if self.offload else ''}, "
                f"{self.precision}: peak {fmt_bytes(self.peak)}")

    def table(self) -> str:
        tokens = self.micro_batch * self.seq_len
        lora = self.lora
        offloaded = ", inputs offloaded to host" if self.offload else ""
        rows = [
            ("model", f"{self.model} ({self.cfg.n_params / 1e9:.2f}B params, "
                      f"{self.cfg.n_layers} layers)"),
            ("LoRA", f"r={lora.r} on {','.join(lora.targets)}, dropout {lora.dropout:g}, "
                     f"{self.lora_impl} path" if lora else "none"),
            ("shape", f"micro-batch {self.micro_batch} x seq {self.seq_len} = {tokens} tokens, "
                      f"{'padded' if self.padded else 'unpadded'}, attention {self.backend}"),
            ("precision / checkpoint", f"{self.precision} / {self.checkpoint} "
                                       f"({self.n_checkpointed} of {self.cfg.n_layers} blocks "
                                       f"recomputed{offloaded})"),
            ("", ""),
            ("frozen base weights", fmt_bytes(self.weights) + (
                f" ({self.quant} decoder linears {fmt_bytes(self.quant_weights)}, the rest "
                f"{self.precision})" if self.quant != "none" else "")),
            ("LoRA params (fp32)", fmt_bytes(self.lora_params)),
            ("LoRA grads (fp32)", fmt_bytes(self.lora_grads)),
            ("AdamW states (fp32)", fmt_bytes(self.optimizer)),
        ]
        if self.ddp_world > 1:
            rows.insert(0, ("per rank", f"one of {self.ddp_world} DDP ranks"))
            rows.append(("DDP gradient buckets (fp32)", fmt_bytes(self.ddp_buckets)))
        rows += [(f"activations: {k}", fmt_bytes(v)) for k, v in self.activations.items()]
        rows += [
            ("recompute of one block", fmt_bytes(self.recompute)),
            ("backward temporaries", fmt_bytes(self.backward_temp)),
            ("dequantization workspace", fmt_bytes(self.dequant_temp)),
            (f"loss workspace (chunk {self.loss_chunk})", fmt_bytes(self.loss_temp)),
            ("runtime reserve", fmt_bytes(self.reserve)),
            ("predicted peak", fmt_bytes(self.peak)
             + (f" of {fmt_bytes(self.budget)} budget: "
                f"{'fits' if self.fits else 'DOES NOT FIT'}" if self.budget else "")),
        ]
        if self.offload:
            rows.append(("host RAM (pinned), not in the peak",
                         f"{fmt_bytes(self.host_offload)} of offloaded block inputs, each "
                         f"crossing PCIe twice per micro-batch"))
        rows += [
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
         reserve: str | int = GiB, ddp_world: int = 1, quant: str = "none",
         quant_impl: str = "triton", offload: bool = False) -> Plan:
    """The memory of one training step. backend: SDPA kernel ('flash'/'efficient' on CUDA,
    'cpu-flash' on CPU, 'cpu-flash-fp32' for bf16 on a CPU without bf16 instructions
    (kernels/cpu_bf16.py), 'math' anywhere; CUDA flash takes no mask, so padded -> efficient).
    lora_impl: 'triton' (the fused kernel) or 'torch' (cuBLAS + addmm_): what
    kernels.dispatch.lora_path returns for the model's kernel mode, device and micro-batch.
    quant: the base's decoder Linear weights as int8, nf4, nf4-dq, q8_0, q4_0 or q4_1
    (model/quant.py); their LoRA layers then run the torch adapter path. quant_impl: the base
    matmul's path, 'triton' (the kernel: CUDA) or 'torch' (dequantize per call: CPU).
    offload: the checkpointed blocks' inputs wait in host memory (no effect without
    checkpointing)."""
    name, cfg = resolve_config(base)
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
    try:
        quant_bytes, dense_bytes = base_weight_bytes(cfg, quant, prec.weight_bytes)
        dequant = dequant_workspace(cfg, quant, quant_impl, prec.compute_bytes)
    except QuantError as e:
        raise PlanError(str(e)) from None
    except ValueError as e:  # a shape the block format cannot take
        raise PlanError(f"{name}: {e}") from None
    if quant_impl not in LORA_IMPLS:
        raise PlanError(f"unknown quantized matmul path {quant_impl!r}; choose among {LORA_IMPLS}")
    if quant != "none":
        lora_impl = "torch"  # a quantized W: LoRALinear takes lora_addmm, never the fused kernel
    p = Plan(name, cfg, lora, T, B, prec.name, k, backend, lora_impl, padded, loss_chunk, budget,
             parse_bytes(reserve) if reserve else 0, quant, quant_bytes, dequant,
             offload=bool(offload and k))
    if quant != "none":
        p.why = f"quantized matmul: {'Triton kernel' if quant_impl == 'triton' else 'torch'}"

    n_lora, n_lora_tensors = lora_param_count(cfg, lora)
    p.weights = quant_bytes + dense_bytes
    p.lora_params = p.lora_grads = n_lora * 4
    p.optimizer = n_lora * 8 + n_lora_tensors * 4  # exp_avg, exp_avg_sq, and a 0-dim fp32 step
    if ddp_world > 1:
        # DDP (gradient_as_bucket_view off) copies grads into flat fp32 buckets of the
        # trainable parameters; every bucket is allocated for the whole run.
        p.ddp_world, p.ddp_buckets = ddp_world, n_lora * 4

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
    if p.offload:
        # Every input goes to host memory in forward; backward brings one back at a time, just
        # before its block is recomputed, and drops it with that block's activations.
        p.host_offload, ckpt_inputs = ckpt_inputs, N * cfg.dim * prec.weight_bytes
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
    p.loss_temp = loss_workspace(cfg, n_rows, B, T, prec, loss_chunk,
                                 fp32_gemm=backend == "cpu-flash-fp32")
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
    _, cfg = resolve_config(base)
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
