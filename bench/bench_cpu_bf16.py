"""bf16 on a CPU without bf16 instructions: fp32 GEMMs (kernels/cpu_bf16.py) vs torch's own.

    python -m bench.bench_cpu_bf16 [--steps 2] [--micro-batch 4] [--eval-rows 8] [--out DIR]

Three sides on SmolLM2-135M with LoRA r=8 on q/v (dropout 0, so every side computes the same
function), the same movie prompts:
  fp32         fp32 weights, no autocast (what `--precision auto` picks on such a CPU)
  bf16-fp32mm  bf16 weights under bf16 autocast, GEMMs and attention through kernels.cpu_bf16
               (what `--precision bf16` and the cpu preset run on such a CPU)
  bf16-torch   the same model with kernels.cpu_bf16 told the CPU has bf16, so every product
               is torch's own bf16 kernel: emulated in software on such a CPU, native elsewhere
Speed: one training step (forward + backward + AdamW) per side in turn, then one scoring batch
per side in turn, `--steps` times after one untimed warm-up of each; tokens/s per side and
each side's ratio to fp32 measured in the same rounds. Numerics: before any update, the loss
and the LoRA gradients of one micro-batch on each side, against bf16-torch (the bf16
semantics the fallback stands in for): |Δ loss| and ‖Δ grad‖ / ‖grad‖, with fp32 against
bf16-torch beside it for scale. On a CPU with bf16 the bf16-fp32mm side still runs the
fallback (forced), so the numbers there say what it would cost where it is never used.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import kernels.cpu_bf16 as cpu_bf16
from data.collate import TokenizeConfig, collate_train, encode_all, pad_value
from data.fewshot import k_shot, load_domain
from engine.config import TrainConfig
from engine.loss import causal_lm_loss
from engine.precision import get_precision
from engine.scoring import score
from engine.train import train_step
from model import load_base
from model.lora import mark_only_lora_trainable

SIDES = ("fp32", "bf16-fp32mm", "bf16-torch")


class Side:
    def __init__(self, name: str, model, tok, args):
        self.name, self.model, self.tok = name, model, tok
        self.policy = get_precision("fp32" if name == "fp32" else "bf16")
        self.cfg = TrainConfig(stage="rt", batch_size=args.micro_batch,
                               micro_batch_size=args.micro_batch, device="cpu",
                               precision=self.policy.name, lora_dropout=0.0)
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
        self.scaler = self.policy.make_scaler("cpu")
        self.force = {"fp32": None, "bf16-fp32mm": False, "bf16-torch": True}[name]

    def run(self, fn):
        saved, cpu_bf16.FORCE_NATIVE = cpu_bf16.FORCE_NATIVE, self.force
        try:
            t0 = time.perf_counter()
            n = fn()
            return n, time.perf_counter() - t0
        finally:
            cpu_bf16.FORCE_NATIVE = saved

    def train(self, examples, step):
        self.model.train()
        return self.run(lambda: train_step(self.model, self.opt, self.scaler, examples,
                                           self.tok, self.cfg, torch.device("cpu"),
                                           self.policy, step)[1])

    def score(self, records):
        self.model.eval()
        return self.run(lambda: score(self.model, self.tok, records, len(records),
                                      precision=self.policy, progress=False)[3])

    def loss_and_grads(self, examples):
        """Loss and the LoRA gradients of one micro-batch; no update, grads cleared after."""
        self.model.train()
        b = collate_train(examples, pad_value(self.tok))

        def fn():
            with self.policy.autocast("cpu"):
                loss, _ = causal_lm_loss(self.model, b["input_ids"], b["attention_mask"],
                                         b["labels"])
            loss.backward()
            return float(loss.detach())

        loss, _ = self.run(fn)
        grads = torch.cat([p.grad.float().flatten() for p in self.model.parameters()
                           if p.requires_grad])
        self.model.zero_grad(set_to_none=True)
        return loss, grads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="timed rounds (after one warm-up)")
    ap.add_argument("--micro-batch", type=int, default=4,
                    help="training prompts per step (bf16-torch trains at ~6 tokens/s on an "
                         "AVX2-only CPU: keep it small)")
    ap.add_argument("--eval-rows", type=int, default=8, help="test prompts per scoring batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results", help="folder for bench_cpu_bf16.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # fail now, not after the run
    native, why = cpu_bf16.cpu_bf16_support()
    lora = TrainConfig(stage="rt", lora_dropout=0.0).lora()
    bf16_model, tok = load_base("smollm2-135m", dtype=torch.bfloat16, lora=lora, seed=args.seed)
    fp32_model, _ = load_base("smollm2-135m", dtype=torch.float32, lora=lora, seed=args.seed)
    for m in (bf16_model, fp32_model):
        mark_only_lora_trainable(m)
    # B = 0 at init makes ∂L/∂A zero: give B the same small values on both models.
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for (name, p), (_, q) in zip(bf16_model.named_parameters(),
                                     fp32_model.named_parameters(), strict=True):
            if name.endswith("lora_b"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
                q.copy_(p)
    # bf16-fp32mm and bf16-torch share the bf16 model: their steps update the same adapter.
    sides = {"fp32": Side("fp32", fp32_model, tok, args),
             "bf16-fp32mm": Side("bf16-fp32mm", bf16_model, tok, args),
             "bf16-torch": Side("bf16-torch", bf16_model, tok, args)}
    rows = k_shot(load_domain("movie", "train").records, args.micro_batch * (args.steps + 1),
                  args.seed)
    examples, _ = encode_all(rows, tok, TokenizeConfig(cutoff_len=512))
    steps = [examples[i:i + args.micro_batch] for i in range(0, len(examples), args.micro_batch)]
    test = load_domain("movie", "test").records[:args.eval_rows]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {why}; "
          f"{args.micro_batch} prompts a step, {args.eval_rows} a scoring batch", flush=True)

    numerics = {name: side.loss_and_grads(steps[0]) for name, side in sides.items()}
    ref_loss, ref_grad = numerics["bf16-torch"]
    agree = {name: {"loss": loss, "abs_loss_diff_vs_bf16_torch": abs(loss - ref_loss),
                    "rel_grad_diff_vs_bf16_torch":
                        float((grad - ref_grad).norm() / ref_grad.norm())}
             for name, (loss, grad) in numerics.items()}
    for name, a in agree.items():
        print(f"{name:12s} loss {a['loss']:.6f}  |Δ loss| {a['abs_loss_diff_vs_bf16_torch']:.2e}"
              f"  ‖Δ grad‖/‖grad‖ {a['rel_grad_diff_vs_bf16_torch']:.2e}", flush=True)

    timing = {name: {"train_s": [], "train_tokens": [], "score_s": [], "score_tokens": []}
              for name in SIDES}
    for rnd in range(args.steps + 1):  # round 0: warm-up, not recorded
        for kind in ("train", "score"):
            for name, side in sides.items():
                n, s = side.train(steps[rnd], rnd) if kind == "train" else side.score(test)
                print(f"round {rnd} {kind:5s} {name:12s} {s:8.1f} s  {n / s:7.1f} tokens/s",
                      flush=True)
                if rnd:
                    timing[name][f"{kind}_s"].append(s)
                    timing[name][f"{kind}_tokens"].append(n)
    summary = {}
    for name, t in timing.items():
        summary[name] = {f"{k}_tokens_per_s": sum(t[f"{k}_tokens"]) / sum(t[f"{k}_s"])
                         for k in ("train", "score")}
    for name, s in summary.items():
        for k in ("train", "score"):
            s[f"{k}_vs_fp32"] = s[f"{k}_tokens_per_s"] / summary["fp32"][f"{k}_tokens_per_s"]
        print(f"{name:12s} train {s['train_tokens_per_s']:7.1f} tokens/s "
              f"({s['train_vs_fp32']:.2f}x fp32), score {s['score_tokens_per_s']:7.1f} "
              f"tokens/s ({s['score_vs_fp32']:.2f}x fp32)")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "native_bf16": native,
              "why": why, "args": vars(args), "numerics": agree, "timing": timing,
              "summary": summary}
    path = out / "bench_cpu_bf16.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
