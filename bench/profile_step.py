"""Where one training step and one scoring batch spend their time (torch.profiler).

    python -m bench.profile_step [--precision bf16|fp32] [--batch 16] [--top 15]

SmolLM2-135M with LoRA r=8 on q/v (dropout 0.05), 16 movie training prompts (~230 tokens) as
one micro-batch through `engine.train.train_step`, and 16 movie test prompts through
`engine.scoring.score`. One warm-up of each, then one profiled run; prints the top ops by
self CPU time as Markdown tables (what bench/RESULTS.md records before and after a change),
then the floor: the share of the time in GEMMs and attention (work any implementation of the
same maths must do), the GEMMs' achieved GFLOP/s against a large bf16/fp32 GEMM on the same
threads, and how much faster the step could get if everything else took no time.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from data.collate import TokenizeConfig, encode_all
from data.fewshot import k_shot, load_domain
from engine.config import TrainConfig
from engine.precision import get_precision
from engine.scoring import score
from engine.train import train_step
from model import load_base
from model.lora import mark_only_lora_trainable


def table(prof, top: int) -> str:
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    lines = [f"total self CPU time {total / 1e3:.0f} ms", "",
             "| op | calls | self CPU ms | share |", "|---|---|---|---|"]
    for e in rows[:top]:
        lines.append(f"| `{e.key}` | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    return "\n".join(lines)


GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::addmm_", "aten::baddbmm"}


def is_attention(key: str) -> bool:
    return "scaled_dot_product" in key


def gemm_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an (n, n) @ (n, n) matmul on this process's threads: the roof for the mms."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def floor(prof, peak: float) -> str:
    """GEMM and attention shares of the self time, the GEMMs' GFLOP/s, and the speed-up bound."""
    rows = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in rows)
    gemm = [e for e in rows if e.key in GEMMS]
    gemm_us = sum(e.self_cpu_time_total for e in gemm)
    gemm_flops = sum(e.flops for e in gemm)
    attn_us = sum(e.self_cpu_time_total for e in rows if is_attention(e.key))
    rate = gemm_flops / gemm_us / 1e3 if gemm_us else float("nan")
    bound = total / (gemm_us + attn_us)
    rest = 100 * (total - gemm_us - attn_us) / total
    return (f"GEMMs {100 * gemm_us / total:.1f}% of the self time at {rate:.0f} GFLOP/s "
            f"({gemm_flops / 1e9:.0f} GFLOP; a {peak:.0f} GFLOP/s roof), attention "
            f"{100 * attn_us / total:.1f}%, the rest {rest:.1f}%:"
            f" with the rest free this would run at most {bound:.2f}x faster "
            f"({total / (gemm_us * rate / peak + attn_us):.2f}x with the GEMMs at the roof too)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    policy = get_precision(args.precision)
    cfg = TrainConfig(stage="rt", batch_size=args.batch, micro_batch_size=args.batch,
                      device="cpu", precision=args.precision)
    model, tok = load_base("smollm2-135m", dtype=policy.weight_dtype, lora=cfg.lora(), seed=0)
    mark_only_lora_trainable(model)
    rows = k_shot(load_domain("movie", "train").records, args.batch, 0)
    examples, _ = encode_all(rows, tok, TokenizeConfig(cutoff_len=512))
    test = load_domain("movie", "test").records[:args.batch]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = policy.make_scaler("cpu")
    dev = torch.device("cpu")

    def step():
        model.train()
        train_step(model, opt, scaler, examples, tok, cfg, dev, policy, 0)

    def scoring():
        score(model, tok, test, args.batch, 512, policy, progress=False)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, "
          f"{sum(len(e.input_ids) for e in examples)} training tokens")
    peak = gemm_peak(policy.weight_dtype)
    for name, fn in (("training step", step), ("scoring batch", scoring)):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            fn()
        print(f"\n### {name}\n\n{table(prof, args.top)}\n\n{floor(prof, peak)}")


if __name__ == "__main__":
    main()
