"""Where one training step and one scoring batch spend their time (torch.profiler).

    python -m bench.profile_step [--precision bf16|fp32] [--batch 16] [--top 15]

SmolLM2-135M with LoRA r=8 on q/v (dropout 0.05), 16 movie training prompts (~230 tokens) as
one micro-batch through `engine.train.train_step`, and 16 movie test prompts through
`engine.scoring.score`. One warm-up of each, then one profiled run; prints the top ops by
self CPU time as Markdown tables (what bench/RESULTS.md records before and after a change).
"""

from __future__ import annotations

import argparse

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
    for name, fn in (("training step", step), ("scoring batch", scoring)):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n### {name}\n\n{table(prof, args.top)}")


if __name__ == "__main__":
    main()
