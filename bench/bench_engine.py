"""Our engine vs transformers + peft on the CPU: same model, data, LoRA, seed, steps.

    python -m bench.bench_engine [--precision bf16|fp32] [--steps 5] [--micro-batch 16]
                                 [--eval-rows 128] [--no-rss] [--out DIR]

Speed: both sides are built in one process and run alternately, one training step of ours,
one of theirs, and so on (then scoring batches likewise), so load from other jobs on the
machine hits both alike; the first step of each side is a warm-up and is not timed. Memory:
each side runs the same steps again alone in its own subprocess, which reports its peak RSS
(VmHWM) after loading the model and over training + scoring (the peak is reset after load).

Ours: `engine.train.train_step` (bf16 frozen weights under the bf16 policy, chunked loss on the
labelled rows only) and `engine.scoring.score` (right-padded batches, hidden state at each
row's last token, the Yes/No rows of the LM head only). Theirs: `LlamaForCausalLM` + peft in
fp32 weights under bf16 autocast (how it runs on a CPU with bf16; `--precision fp32` turns
autocast off on both sides), the HF loss on full logits, and scoring with one full-logits
forward on left-padded prompts (`logits[:, -1]`, TALLRec's first generation step). Both start
from the same adapter (our A copied into peft) and see the same batches; dropout masks differ
(each side's own RNG use), so AUCs after training agree closely, not exactly.
Test-only references (transformers, peft) are imported here, never in the product.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.collate import TokenizeConfig, collate_eval, collate_train, encode_all, pad_value
from data.fewshot import k_shot, load_domain
from engine.config import TrainConfig
from engine.precision import get_precision
from engine.scoring import metrics, score
from engine.train import train_step
from fileio import atomic_write_json, make_dir
from model import load_base
from model.checkpoint import smollm2_path
from model.lora import lora_modules, mark_only_lora_trainable


def reference_model(init_a: dict, lora, dtype):
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
        for name, a in init_a.items():
            target = named[f"base_model.model.model.{name}"]
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.zero_()
    return ref


class Side:
    """One side's training step and scoring batch, each returning the tokens it processed."""

    def __init__(self, name, args, init_a=None):
        self.name, self.args = name, args
        self.policy = get_precision(args.precision)
        self.cfg = TrainConfig(stage="rt", lr=args.lr, batch_size=args.micro_batch,
                               micro_batch_size=args.micro_batch, device="cpu",
                               precision=args.precision, grad_clip=1.0)
        if name == "ours":
            self.model, self.tok = load_base("smollm2-135m", dtype=self.policy.weight_dtype,
                                             lora=self.cfg.lora(), seed=args.seed)
            mark_only_lora_trainable(self.model)
        else:
            self.model = reference_model(init_a, self.cfg.lora(), torch.float32)
            self.tok = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
        self.scaler = self.policy.make_scaler("cpu")
        self.probs: list[np.ndarray] = []

    def amp(self):
        dtype = self.policy.compute_dtype
        return torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu",
                                                                              enabled=False)

    def train(self, examples, pad, step) -> int:
        if self.name == "ours":
            self.model.train()
            return train_step(self.model, self.opt, self.scaler, examples, self.tok, self.cfg,
                              torch.device("cpu"), self.policy, step)[1]
        self.model.train()
        b = collate_train(examples, pad)
        with self.amp():
            logits = self.model(input_ids=b["input_ids"],
                                attention_mask=b["attention_mask"]).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                       1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return int(b["attention_mask"].sum())

    @torch.no_grad()
    def score(self, records, examples, pad, yes_no) -> int:
        if self.name == "ours":
            probs, _, _, n = score(self.model, self.tok, records, len(records),
                                   precision=self.policy, progress=False)
            self.probs.append(probs)
            return n
        self.model.eval()
        b = collate_eval(examples, pad)
        with self.amp():
            logits = self.model(input_ids=b["input_ids"],
                                attention_mask=b["attention_mask"]).logits[:, -1]
        self.probs.append(torch.softmax(logits[:, list(yes_no)].float(), -1)[:, 0].numpy())
        return int(b["attention_mask"].sum())


def workload(args, tok):
    rows = k_shot(load_domain(args.domain, "train").records, args.shots, args.seed)
    examples, _ = encode_all(rows, tok, TokenizeConfig(cutoff_len=512))
    need = args.steps * args.micro_batch
    examples = (examples * (need // len(examples) + 1))[:need]
    steps = [examples[i:i + args.micro_batch] for i in range(0, need, args.micro_batch)]
    test = load_domain(args.domain, "test").records[:args.eval_rows]
    ev, _ = encode_all(test, tok, TokenizeConfig(cutoff_len=512), eval=True)
    order = sorted(range(len(ev)), key=lambda i: len(ev[i].input_ids))
    batches = [order[s:s + args.eval_batch] for s in range(0, len(order), args.eval_batch)]
    return steps, [([test[i] for i in b], [ev[i] for i in b]) for b in batches], \
        np.array([ev[i].label for i in order])


def vm_hwm() -> float:
    """Peak resident set size of this process so far, GiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_hwm():
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS counter


def rss_alone(side_name: str, args) -> dict:
    """Run in a subprocess: load one side, train args.steps steps, score, report peak RSS.
    The workload and the initial adapter come tokenized from the parent (args.work), so the
    reference process never holds our model or tokenizer."""
    work = torch.load(args.work, weights_only=False)
    torch.manual_seed(args.seed)
    side = Side(side_name, args, init_a=work["init_a"])
    load_peak = vm_hwm()
    reset_hwm()
    for i, ex in enumerate(work["steps"]):
        side.train(ex, work["pad"], i)
    for records, ex in work["eval_batches"]:
        side.score(records, ex, work["pad"], work["yes_no"])
    return {"side": side_name, "peak_rss_load_gib": round(load_peak, 3),
            "peak_rss_run_gib": round(vm_hwm(), 3)}


def measure_rss(args, work_file: Path) -> dict:
    out = {}
    for name in ("ours", "transformers+peft"):
        cmd = [sys.executable, "-m", "bench.bench_engine", "--rss-side", name,
               "--work", str(work_file), *(argv_of(args))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"RSS run of {name} failed:\n{proc.stderr[-2000:]}")
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def argv_of(args) -> list[str]:
    """The settings both subprocesses need, as flags."""
    return ["--precision", args.precision, "--micro-batch", str(args.micro_batch),
            "--lr", str(args.lr), "--seed", str(args.seed)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domain", default="movie", choices=["movie", "book", "toy"])
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="training steps (the first is a "
                                                         "warm-up, not timed)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--eval-batch", type=int, default=16)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--rss-side", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    if args.rss_side:
        print(json.dumps(rss_alone(args.rss_side, args)))
        return

    torch.manual_seed(args.seed)
    ours = Side("ours", args)
    init_a = {n: m.lora_a.detach().clone() for n, m in lora_modules(ours.model).items()}
    ref = Side("transformers+peft", args, init_a=init_a)
    sides = (ours, ref)
    tok, pad = ours.tok, pad_value(ours.tok)
    steps, eval_batches, labels = workload(args, tok)
    yes_no = tok.answer_token_ids()
    out = Path(args.out)
    make_dir(out)
    work_file = out / "bench_engine_work.pt"
    torch.save({"init_a": init_a, "steps": steps, "eval_batches": eval_batches, "pad": pad,
                "yes_no": yes_no}, work_file)
    timing = {s.name: {"train_s": 0.0, "train_tok": 0, "eval_s": 0.0, "eval_tok": 0}
              for s in sides}
    for i, ex in enumerate(steps):  # A/B/A/B: the same machine load for both
        for s in sides:
            t0 = time.perf_counter()
            n = s.train(ex, pad, i)
            if i > 0:
                timing[s.name]["train_s"] += time.perf_counter() - t0
                timing[s.name]["train_tok"] += n
    for records, ex in eval_batches:
        for s in sides:
            t0 = time.perf_counter()
            n = s.score(records, ex, pad, yes_no)
            timing[s.name]["eval_s"] += time.perf_counter() - t0
            timing[s.name]["eval_tok"] += n
    results = {}
    for s in sides:
        t = timing[s.name]
        auc = metrics(np.concatenate(s.probs), labels)["auc"]
        results[s.name] = {"train_tokens_per_s": round(t["train_tok"] / t["train_s"], 1),
                           "eval_tokens_per_s": round(t["eval_tok"] / t["eval_s"], 1),
                           "auc": auc}
        print(f"{s.name:>18}: train {results[s.name]['train_tokens_per_s']:8.1f} tok/s  "
              f"score {results[s.name]['eval_tokens_per_s']:8.1f} tok/s  AUC {auc:.4f}")
    o, r = results["ours"], results["transformers+peft"]
    summary = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
        "results": results,
        "train_ratio": round(o["train_tokens_per_s"] / r["train_tokens_per_s"], 3),
        "eval_ratio": round(o["eval_tokens_per_s"] / r["eval_tokens_per_s"], 3),
        "auc_difference": round(abs(o["auc"] - r["auc"]), 4),
    }
    print(f"ratios (ours / transformers+peft): training {summary['train_ratio']}x (target >= 2), "
          f"scoring {summary['eval_ratio']}x (target >= 3); |AUC difference| "
          f"{summary['auc_difference']} (target <= 0.005)")
    if not args.no_rss:
        del ours, ref, sides  # free this process's memory before the subprocesses run
        rss = measure_rss(args, work_file)
        summary["rss"] = rss
        ratio = rss["ours"]["peak_rss_run_gib"] / rss["transformers+peft"]["peak_rss_run_gib"]
        summary["rss_ratio"] = round(ratio, 3)
        for name, m in rss.items():
            print(f"{name:>18}: peak RSS {m['peak_rss_run_gib']:.2f} GiB training + scoring "
                  f"({m['peak_rss_load_gib']:.2f} GiB loading)")
        print(f"peak RSS ratio {summary['rss_ratio']}x (target <= 0.4)")
    work_file.unlink()
    atomic_write_json(out / f"bench_engine_{args.domain}_{args.precision}.json", summary)


if __name__ == "__main__":
    main()
