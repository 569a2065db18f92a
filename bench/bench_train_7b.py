"""GPU check: LoRA training of LLaMA-7B (random bf16 weights, no download) at seq 512 under the
memory plan for a 24 GiB card; measured peak vs plan, tokens/s and MFU; the same configuration
with transformers + peft side by side.

    python bench/bench_train_7b.py OUT_DIR [--budget 24GiB] [--seq 512] [--peak-tflops 790]

Writes OUT_DIR/bench_train_7b.json. Without CUDA it says so and exits 0. The budget is a 3090's
24 GiB; an H200 has room for both runs, so "fits" is checked against the plan, not the card.
FLOPs per token: LoRA on a frozen base costs 2N forward + 2N backward (no dW), plus 2N for each
recomputed block's forward (6N with full checkpointing); N = base matmul parameters (the
embedding lookup is not a matmul). mfu counts 4N (useful work), hfu counts the recomputation too.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.loss import causal_lm_loss  # noqa: E402
from engine.memory import choose, fmt_bytes  # noqa: E402
from engine.precision import get_precision  # noqa: E402
from model.config import LlamaConfig  # noqa: E402
from model.formats.hf import config_to_hf  # noqa: E402
from model.llama import Llama  # noqa: E402
from model.lora import LoRAConfig, lora_modules  # noqa: E402


def build_ours(cfg: LlamaConfig, lora: LoRAConfig) -> Llama:
    """Meta-device build, then random bf16 weights written straight into GPU memory."""
    with torch.device("meta"):
        model = Llama(cfg, lora)
    model = model.to(torch.bfloat16).to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm weight
                p.fill_(1.0)
            elif not name.endswith(("lora_a", "lora_b")):
                p.normal_(0.0, 0.02, generator=g)
    for m in lora_modules(model).values():
        m.reset_lora_parameters(torch.device("cuda"))  # fp32 A (Kaiming), B = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_a", "lora_b")))
    return model


def build_hf(cfg: LlamaConfig, lora: LoRAConfig, checkpointing: bool):
    import transformers
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    hf_cfg = transformers.LlamaConfig(**config_to_hf(cfg))
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg.use_cache = False
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
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
    return model


def run(step, params, steps: int, warmup: int, tokens: int) -> dict:
    opt = torch.optim.AdamW(params, lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"step_s_median": median, "step_s_all": times, "tokens_per_s": tokens / median,
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved()}


def train_ours(cfg, lora, p, ids, steps, warmup) -> dict:
    model = build_ours(cfg, lora)
    model.checkpoint_every = p.checkpoint_every
    prec = get_precision(p.precision)

    def step():
        with prec.autocast("cuda"):
            loss, _ = causal_lm_loss(model, ids, None, chunk_size=p.loss_chunk)
        loss.backward()

    return run(step, [q for q in model.parameters() if q.requires_grad], steps, warmup,
               ids.numel())


def free():
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for bench_train_7b.json")
    ap.add_argument("--base", default="llama-7b", help="model preset (random weights)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--budget", default="24GiB", help="memory budget the plan is made for")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: the planned one")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="bf16 dense peak of the GPU (H200: ~790 measured)")
    ap.add_argument("--no-kernel", action="store_true", help="torch LoRA path, not Triton")
    ap.add_argument("--skip-hf", action="store_true", help="skip transformers + peft")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "bench_train_7b.json"
    if not torch.cuda.is_available():
        print("bench_train_7b: no CUDA device here; nothing measured (run it on a GPU)")
        out_file.write_text(json.dumps({"skipped": "no CUDA device"}, indent=2))
        return 0

    cfg = LlamaConfig.from_preset(args.base)
    lora = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=["q", "v"],
                      use_kernel=not args.no_kernel)
    prec = get_precision("bf16")
    kw = dict(backend="flash", lora_impl="torch" if args.no_kernel else "triton", padded=False)
    p = choose(args.base, args.seq, args.budget, lora, prec, micro_batch=args.micro_batch, **kw)
    print(p.table(), flush=True)
    B, T = p.micro_batch, args.seq
    tokens = B * T
    n_matmul = cfg.n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    flops_tok = (4 + 2 * p.recompute_fraction) * n_matmul
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda", generator=g)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "config": {"base": args.base, "seq": T, "micro_batch": B, "lora_r": lora.r,
                   "targets": lora.targets, "dropout": lora.dropout, "precision": "bf16",
                   "checkpoint": p.checkpoint, "budget": args.budget, "lora_impl": kw["lora_impl"]},
        "plan": {"peak": p.peak, "peak_allocated": p.peak_allocated, "reserve": p.reserve,
                 "weights": p.weights, "activations": p.activation_bytes,
                 "recompute": p.recompute, "backward_temp": p.backward_temp,
                 "loss_temp": p.loss_temp, "why": p.why, "table": p.table()},
        "flops_per_token": flops_tok, "peak_tflops": args.peak_tflops,
    }

    def finish(name, r, fpt):
        r["mfu"] = r["tokens_per_s"] * 4 * n_matmul / (args.peak_tflops * 1e12)
        r["hfu"] = r["tokens_per_s"] * fpt / (args.peak_tflops * 1e12)
        result[name] = r
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, step {r['step_s_median']:.3f} s, "
              f"max allocated {fmt_bytes(r['max_memory_allocated'])}, mfu {r['mfu']:.1%}, "
              f"hfu {r['hfu']:.1%}", flush=True)

    try:
        finish("ours", train_ours(cfg, lora, p, ids, args.steps, args.warmup), flops_tok)
        r = result["ours"]
        r["plan_error"] = (p.peak_allocated - r["max_memory_allocated"]) / r["max_memory_allocated"]
        print(f"plan predicted {fmt_bytes(p.peak_allocated)} allocated "
              f"({r['plan_error']:+.1%} vs measured)", flush=True)
    except torch.cuda.OutOfMemoryError as e:
        result["ours"] = {"error": f"OOM: {e}"}
    free()

    if not args.skip_hf:
        try:
            hf = build_hf(cfg, lora, checkpointing=p.checkpoint_every > 0)
            hf_params = [q for q in hf.parameters() if q.requires_grad]
            hf.train()

            def step_hf():
                with prec.autocast("cuda"):
                    loss = hf(input_ids=ids, labels=ids).loss
                loss.backward()

            fpt_hf = (6 if p.checkpoint_every else 4) * n_matmul
            finish("hf_peft", run(step_hf, hf_params, args.steps, args.warmup, tokens), fpt_hf)
            result["hf_peft"]["checkpoint"] = "full" if p.checkpoint_every else "none"
            del hf, hf_params
        except torch.cuda.OutOfMemoryError as e:
            result["hf_peft"] = {"error": f"OOM: {e}"}
        except ImportError as e:
            result["hf_peft"] = {"error": f"transformers/peft not importable: {e}"}
        free()
    out_file.write_text(json.dumps(result, indent=2))
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
