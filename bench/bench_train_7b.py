"""GPU check: LoRA training of LLaMA-7B (random bf16 weights, no download) at seq 512 under the
memory plan for a 24 GiB card, in three phases: ours with the fused kernel forced, ours on the
torch (cuBLAS + addmm_) path, and transformers + peft on the same configuration.

    python bench/bench_train_7b.py OUT_DIR [--budget 24GiB] [--seq 512] [--cpu-dry-run]
                                           [--checkpoint full] [--checkpoint-offload]

Writes OUT_DIR/bench_train_7b.json, rewritten after every phase; each phase runs under its own
exception handler that records the traceback, and a failed phase never stops the next.

Budget: on CUDA the caching allocator is capped with torch.cuda.set_per_process_memory_fraction
at budget − the plan's reserve (what it sets aside for the CUDA context and allocator slack), so
on a 141 GB card "fits in 24 GiB" is what the run proves: a phase that needs more fails with
out-of-memory, recorded as such. Each phase reports max allocated and reserved bytes against
the plan.

FLOPs per token: LoRA on a frozen base costs 2N forward + 2N backward (no dW), plus 2N for each
recomputed block's forward; N = base matmul parameters (the embedding lookup is not a matmul).
mfu counts 4N (useful work), hfu the recomputation too. Both against the datasheet bf16 peak of
the detected GPU (bench/common.py) and, as *_vs_cublas, against a measured 8192³ bf16 matmul.

--cpu-dry-run runs every phase on the CPU with a tiny model (the kernel through the Triton
interpreter: TRITON_INTERPRET=1 must be set), so a crash cannot first show up on the device.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    datasheet_peak_tflops,
    error_record,
    matmul_tflops,
    run_info,
    write_json,
)
from engine.loss import causal_lm_loss  # noqa: E402
from engine.memory import choose, fmt_bytes, parse_bytes, plan  # noqa: E402
from engine.precision import get_precision  # noqa: E402
from model.config import LlamaConfig  # noqa: E402
from model.formats.hf import config_to_hf  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.lora import LoRAConfig, lora_modules  # noqa: E402

PHASES = ("ours_kernel", "ours_torch", "hf_peft")


def build_ours(cfg: LlamaConfig, lora: LoRAConfig, device: str) -> Llama:
    """Meta-device build, then random bf16 weights written straight into device memory."""
    with torch.device("meta"):
        model = Llama(cfg, lora)
    model = model.to(torch.bfloat16).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm weight
                p.fill_(1.0)
            elif not name.endswith(("lora_a", "lora_b")):
                p.normal_(0.0, 0.02, generator=g)
    for m in lora_modules(model).values():
        m.reset_lora_parameters(torch.device(device))  # fp32 A (Kaiming), B = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_a", "lora_b")))
    return model


def build_hf(cfg: LlamaConfig, lora: LoRAConfig, checkpointing: bool, device: str):
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.use_cache = False
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    if checkpointing:  # transformers checkpoints every layer or none
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=[f"{t}_proj" for t in lora.targets],
                              task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    for p in model.parameters():  # adapters in fp32, as ours (peft's default autocast_adapter)
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    return model


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def run(step, params, steps: int, warmup: int, tokens: int, device: str) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-4)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    out = {"step_s_median": median, "step_s_all": times, "tokens_per_s": tokens / median}
    if device == "cuda":
        out["max_memory_allocated"] = torch.cuda.max_memory_allocated()
        out["max_memory_reserved"] = torch.cuda.max_memory_reserved()
    return out


def free(device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def cap_memory(budget: int, reserve: int, device: str) -> dict:
    """Cap the caching allocator at budget − reserve; returns what was set, for the JSON."""
    if device != "cuda":
        return {"enforced": False, "why": "no CUDA allocator (CPU dry run)"}
    total = torch.cuda.get_device_properties(0).total_memory
    cap = budget - reserve
    fraction = min(1.0, cap / total)
    torch.cuda.set_per_process_memory_fraction(fraction)
    return {"enforced": fraction < 1.0, "allocator_cap": cap, "fraction": fraction,
            "device_total": total}


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for bench_train_7b.json")
    ap.add_argument("--base", default=None, help="model preset (random weights); "
                    "default llama-7b, or tiny with --cpu-dry-run")
    ap.add_argument("--seq", type=int, default=None, help="default 512 (16 with --cpu-dry-run)")
    ap.add_argument("--budget", default="24GiB", help="memory budget the plan is made for")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the planned one")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds; phases not started by then are recorded as skipped")
    ap.add_argument("--checkpoint", default=None,
                    help="none, full or every-k; default: the planned one")
    ap.add_argument("--checkpoint-offload", action="store_true",
                    help="our phases keep checkpointed block inputs in host memory (planned "
                         "so); transformers + peft checkpoints as before")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny shapes on the CPU, the kernel through the Triton interpreter")
    args = ap.parse_args(argv)
    if args.cpu_dry_run:
        args.base, args.seq = args.base or "tiny", args.seq or 16
        args.micro_batch = args.micro_batch or 2
        args.steps, args.warmup = 1, 1
    args.base, args.seq = args.base or "llama-7b", args.seq or 512
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; choose among {PHASES}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "bench_train_7b.json"
    device = "cpu" if args.cpu_dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_train_7b: no CUDA device here; nothing measured (run it on a GPU, or "
              "--cpu-dry-run)")
        write_json(out_file, {"skipped": "no CUDA device", "dry_run": False})
        return 0
    if args.cpu_dry_run:
        from kernels.dispatch import INTERPRET

        if not INTERPRET:
            print("bench_train_7b: --cpu-dry-run needs TRITON_INTERPRET=1 in the environment",
                  file=sys.stderr)
            return 2

    cfg = LlamaConfig.from_preset(args.base)
    lora = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=["q", "v"], kernel="force")
    prec = get_precision("bf16")
    kw = dict(backend="flash", padded=False, offload=args.checkpoint_offload)
    p = choose(args.base, args.seq, args.budget, lora, prec, micro_batch=args.micro_batch,
               checkpoint=args.checkpoint, lora_impl="triton", **kw)
    # The torch path at the same micro-batch and checkpointing, for its own prediction.
    p_torch = plan(args.base, args.seq, p.micro_batch, lora, prec, p.checkpoint, budget=args.budget,
                   lora_impl="torch", **kw)
    print(p.table(), flush=True)
    B, T = p.micro_batch, args.seq
    n_matmul = cfg.n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=g)
    info = run_info(device, args.cpu_dry_run)
    peak = datasheet_peak_tflops(info["device"]) if device == "cuda" else None
    cublas = matmul_tflops(device, n=8192 if device == "cuda" else 256)
    result = dict(info, config={
        "base": args.base, "seq": T, "micro_batch": B, "lora_r": lora.r, "targets": lora.targets,
        "dropout": lora.dropout, "precision": "bf16", "checkpoint": p.checkpoint,
        "checkpoint_offload": p.offload,
        "budget": args.budget}, datasheet_peak_tflops=peak, measured_cublas_tflops=cublas,
        memory_cap=cap_memory(parse_bytes(args.budget), p.reserve, device), phases={})
    plans = {"ours_kernel": p, "ours_torch": p_torch}
    for name, q in plans.items():
        result["phases"][name] = {"plan": {
            "lora_impl": q.lora_impl, "peak": q.peak, "peak_allocated": q.peak_allocated,
            "reserve": q.reserve, "weights": q.weights, "activations": q.activation_bytes,
            "fits": q.fits, "table": q.table()}}
    result["phases"]["hf_peft"] = {"checkpoint": "full" if p.checkpoint_every else "none"}
    write_json(out_file, result)

    cap = parse_bytes(args.budget) - p.reserve

    def score(phase: dict, flops_tok: float, plan_=None):
        for key, rate in (("", peak), ("_vs_cublas", cublas)):
            tflops = rate * 1e12 if rate else None
            phase["mfu" + key] = phase["tokens_per_s"] * 4 * n_matmul / tflops if rate else None
            phase["hfu" + key] = phase["tokens_per_s"] * flops_tok / tflops if rate else None
        if "max_memory_allocated" in phase:
            if plan_ is not None:  # the planner's own figure: allocated bytes at the peak
                phase["allocated_vs_plan"] = phase["max_memory_allocated"] / plan_.peak_allocated
            # The allocator's reservation against its cap: room left for fragmentation.
            phase["reserved_vs_cap"] = phase["max_memory_reserved"] / cap

    def phase_ours(kernel: str, plan_):
        model = build_ours(cfg, LoRAConfig(**{**lora.to_dict(), "kernel": kernel}), device)
        model.checkpoint_every, model.checkpoint_offload = plan_.checkpoint_every, plan_.offload

        def step():
            with prec.autocast(device):
                loss, _ = causal_lm_loss(model, ids, None, chunk_size=plan_.loss_chunk)
            loss.backward()

        params = [q for q in model.parameters() if q.requires_grad]
        r = run(step, params, args.steps, args.warmup, B * T, device)
        score(r, (4 + 2 * plan_.recompute_fraction) * n_matmul, plan_)
        return r

    def phase_hf():
        hf = build_hf(cfg, lora, p.checkpoint_every > 0, device)

        def step():
            with prec.autocast(device):
                loss = hf(input_ids=ids, labels=ids).loss
            loss.backward()

        r = run(step, [q for q in hf.parameters() if q.requires_grad], args.steps, args.warmup,
                B * T, device)
        score(r, (6 if p.checkpoint_every else 4) * n_matmul)
        return r

    def phase_hf_uncapped():
        # Only after hf_peft ran out of the 24 GiB cap: its speed without the cap, so the
        # comparison still has a number (the JSON says it did not fit).
        torch.cuda.set_per_process_memory_fraction(1.0)
        r = phase_hf()
        r["note"] = "transformers + peft did not fit the cap; measured without it"
        return r

    runners = {"ours_kernel": lambda: phase_ours("force", p),
               "ours_torch": lambda: phase_ours("off", p_torch), "hf_peft": phase_hf,
               "hf_peft_uncapped": phase_hf_uncapped}
    failed = False
    todo = args.phases.split(",")
    for name in todo:
        phase = result["phases"].setdefault(name, {})
        free(device)  # the previous phase's (or the matmul probe's) cached blocks
        if args.time_limit is not None and time.monotonic() - t_start > args.time_limit:
            phase["skipped"] = f"time limit {args.time_limit:.0f} s reached"
        else:
            t0 = time.monotonic()
            try:  # any failure (a Triton compile error on a new toolchain, OOM) is recorded
                phase.update(runners[name]())
                mem = (f", max allocated {fmt_bytes(phase['max_memory_allocated'])}"
                       if "max_memory_allocated" in phase else "")
                mfu = f", mfu {phase['mfu']:.1%}" if phase["mfu"] is not None else ""
                print(f"{name}: {phase['tokens_per_s']:,.0f} tokens/s, step "
                      f"{phase['step_s_median']:.3f} s{mem}{mfu}", flush=True)
            except Exception as e:  # noqa: BLE001 -- recorded with its traceback, then go on
                phase.update(error_record(e))
                if name == "hf_peft" and phase["out_of_memory"]:  # a finding, not a failure
                    todo.append("hf_peft_uncapped")
                else:
                    failed = True
                print(f"{name}: FAILED {phase['error']}\n{phase['traceback']}", flush=True)
            phase["seconds"] = round(time.monotonic() - t0, 1)
        free(device)
        write_json(out_file, result)
    print(f"wrote {out_file}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
