"""1 vs 2 processes on the CPU: training tokens/s under torchrun at the same global batch,
and the experiment grid's wall time with 1 vs 2 workers.

    python -m bench.bench_parallel [--rounds 2] [--out bench/parallel.csv]

The two sides alternate (1, 2, 1, 2, ...) so that load from other jobs falls on both; each
figure is a median over rounds. Every process gets 1 thread (OMP_NUM_THREADS=1).
Training: train.py on a random tiny LLaMA (vocab 32k) and the synthetic toy domain, no
validation inside the timed steps; tokens/s is train.py's own figure at the last step.
Grid: `python -m engine.experiments --preset tiny --seeds 0` (11 runs) into a fresh folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data.paths import default_data_root

ROOT = Path(__file__).resolve().parent.parent


def train_args(out: Path, base: str, steps: int) -> list[str]:
    tok = default_data_root() / "tokenizer" / "llama" / "tokenizer.model"
    return ["--stage", "rt", "--base", base, "--tokenizer", str(tok), "--domain", "toy",
            "--shots", str(16 * steps), "--batch-size", "16", "--micro-batch-size", "4",
            "--epochs", "1", "--warmup-steps", "1", "--lr", "3e-3", "--val-size", "16",
            "--eval-every", "100000", "--patience", "0", "--no-train-on-inputs",
            "--device", "cpu", "--precision", "fp32", "--out", str(out), "--overwrite"]


def train_tokens_per_s(world: int, out: Path, base: str, steps: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(world)]
    proc = subprocess.run([*launch, str(ROOT / "train.py"), *train_args(out, base, steps)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "tokens_per_s" in x][-1]["tokens_per_s"]


def grid_seconds(workers: int, out: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "engine.experiments", "--preset", "tiny",
                           "--seeds", "0", "--out", str(out), "--no-progress", "--workers",
                           str(workers), "--threads", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per training run")
    p.add_argument("--base", default="random:tiny-32k")
    p.add_argument("--skip-grid", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--out", default="bench/parallel.csv")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for r in range(args.rounds):
            for world in () if args.skip_train else (1, 2):
                tps = train_tokens_per_s(world, tmp / f"train{world}", args.base, args.steps)
                rows.append(("train_tokens_per_s", world, r, tps))
                print(f"round {r}: train, {world} process(es): {tps:,.0f} tokens/s", flush=True)
            if args.skip_grid:
                continue
            for workers in (1, 2):
                s = grid_seconds(workers, tmp / f"grid{workers}-{r}")
                rows.append(("grid_seconds", workers, r, s))
                print(f"round {r}: tiny grid (11 runs), {workers} worker(s): {s:.1f} s",
                      flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "processes", "round", "value", "cpu", "commit", "date"])
        for m, n, r, v in rows:
            w.writerow([m, n, r, round(v, 2), f"{os.cpu_count()} cores", commit, date])
    for metric in ("train_tokens_per_s", "grid_seconds"):
        med = {n: statistics.median(v for m, k, _, v in rows if m == metric and k == n)
               for n in (1, 2) if any(m == metric and k == n for m, k, _, _ in rows)}
        if len(med) == 2:
            print(f"{metric}: 1 -> {med[1]:,.1f}, 2 -> {med[2]:,.1f} "
                  f"(ratio 2/1 = {med[2] / med[1]:.2f})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
