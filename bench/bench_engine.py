"""Our engine vs transformers + peft on the same model, data, LoRA settings and seed.

    python -m bench.bench_engine [--domain movie|toy] [--shots 64] [--steps 4] [--eval-rows 128]
                                 [--precision fp32|bf16] [--out DIR]

Both sides train the same LoRA (r=8, alpha=16, q/v; our initial A copied into peft so both
start from the same adapter) on the same tokenized K-shot batches with AdamW, then score the
same test prompts: ours with one forward pass and logits for the answer position only; the
reference with its full-logits forward (`model(...).logits[:, -1]`, what TALLRec's first
generation step computes). Reported: training tokens/s, evaluation tokens/s, their ratios,
and both AUCs. Test-only references (transformers, peft) are imported here, never in the
product.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.collate import TokenizeConfig, collate_eval, collate_train, encode_all, pad_value
from data.fewshot import k_shot, load_domain
from engine.loss import causal_lm_loss
from engine.scoring import metrics
from fileio import atomic_write_json, make_dir
from model import load_base
from model.checkpoint import smollm2_path
from model.lora import LoRAConfig, lora_modules


def reference_model(ours, lora: LoRAConfig, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    path = smollm2_path()
    hf = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    peft_cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=[f"{t}_proj" for t in lora.targets],
                          task_type="CAUSAL_LM")
    ref = get_peft_model(hf, peft_cfg)
    with torch.no_grad():  # the same starting adapter on both sides
        named = dict(ref.named_modules())
        for name, m in lora_modules(ours).items():
            target = named[f"base_model.model.model.{name}"]
            target.lora_A["default"].weight.copy_(m.lora_a)
            target.lora_B["default"].weight.copy_(m.lora_b)
    return ref


def ref_loss(model, ids, mask, labels):
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           labels[:, 1:].reshape(-1), ignore_index=-100)


def train_tokens_per_s(model, batches, loss_fn, amp, lr=1e-4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    tokens, t0 = 0, None
    for i, b in enumerate(batches):
        if i == 1:  # the first step warms allocators and caches
            t0, tokens = time.perf_counter(), 0
        with amp():
            loss = loss_fn(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


@torch.no_grad()
def eval_tokens_per_s(model, batches, yes_no, last_only: bool, amp):
    model.eval()
    probs, tokens = [], 0
    t0 = time.perf_counter()
    for b in batches:
        ids, mask = b["input_ids"], b["attention_mask"]
        with amp():
            if last_only:
                at = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
                logits = model(ids, attention_mask=mask, logits_at=at)[:, 0]
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        probs.append(torch.softmax(logits[:, list(yes_no)].float(), -1)[:, 0])
        tokens += int(mask.sum())
    return tokens / (time.perf_counter() - t0), torch.cat(probs).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domain", default="movie", choices=["movie", "book", "toy"])
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="training steps (first is warm-up)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)

    dtype = torch.float32
    amp = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16"
           else (lambda: torch.autocast("cpu", enabled=False)))
    lora = LoRAConfig(r=8, alpha=16, dropout=0.05, targets=["q", "v"], kernel="off")
    torch.manual_seed(args.seed)
    ours, tok = load_base("smollm2-135m", dtype=dtype, lora=lora, seed=args.seed)
    for n, p in ours.named_parameters():
        p.requires_grad_(n.endswith(("lora_a", "lora_b")))
    ref = reference_model(ours, lora, dtype)

    train_rows = k_shot(load_domain(args.domain, "train").records, args.shots, args.seed)
    examples, _ = encode_all(train_rows, tok, TokenizeConfig(cutoff_len=512))
    need = args.steps * args.micro_batch
    examples = (examples * (need // len(examples) + 1))[:need]
    batches = [collate_train(examples[i:i + args.micro_batch], pad_value(tok))
               for i in range(0, need, args.micro_batch)]
    test_rows = load_domain(args.domain, "test").records[:args.eval_rows]
    ev, _ = encode_all(test_rows, tok, TokenizeConfig(cutoff_len=512), eval=True)
    order = sorted(range(len(ev)), key=lambda i: len(ev[i].input_ids))
    ev_batches = [collate_eval([ev[i] for i in order[s:s + args.eval_batch]], pad_value(tok))
                  for s in range(0, len(order), args.eval_batch)]
    labels = np.array([ev[i].label for i in order])
    yes_no = tok.answer_token_ids()

    results = {}
    for name, model, loss_fn, last_only in (
            ("ours", ours, lambda m, i, a, y: causal_lm_loss(m, i, a, y)[0], True),
            ("transformers+peft", ref, ref_loss, False)):
        torch.manual_seed(args.seed)
        train_tps = train_tokens_per_s(model, batches, loss_fn, amp)
        eval_tps, probs = eval_tokens_per_s(model, ev_batches, yes_no, last_only, amp)
        m = metrics(probs, labels)
        results[name] = {"train_tokens_per_s": round(train_tps, 1),
                         "eval_tokens_per_s": round(eval_tps, 1), "auc": m["auc"]}
        print(f"{name:>18}: train {train_tps:8.1f} tok/s  eval {eval_tps:8.1f} tok/s  "
              f"AUC {m['auc']}")
    o, r = results["ours"], results["transformers+peft"]
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "device": "cpu", "threads": torch.get_num_threads(), "args": vars(args),
        "results": results,
        "train_speedup": round(o["train_tokens_per_s"] / r["train_tokens_per_s"], 3),
        "eval_speedup": round(o["eval_tokens_per_s"] / r["eval_tokens_per_s"], 3),
        "auc_difference": (None if o["auc"] is None or r["auc"] is None
                           else round(abs(o["auc"] - r["auc"]), 4)),
    }
    print(f"train speed-up {summary['train_speedup']}x, eval speed-up "
          f"{summary['eval_speedup']}x, |AUC difference| {summary['auc_difference']}")
    out = Path(args.out)
    make_dir(out)
    atomic_write_json(out / f"bench_engine_{args.domain}_{args.precision}.json", summary)


if __name__ == "__main__":
    main()
