"""Rec-tuning on a quantized frozen base vs the dense base, on CPU with SmolLM2-135M: test AUC
and peak RSS of each run (`/usr/bin/time -v`, one process per run).

For each --quant mode: train.py on K movie shots, then evaluate.py on the first --test-limit
rows of the movie test split, on the same quantized base. The adapter trained on the quantized
base is also scored on the dense base (portability). Writes OUT/quant_quality.json and prints
a table. A small measurement: one seed, a few epochs; read it as such.

    python -m bench.quant_quality --out runs/quant_quality [--modes none int8 gguf]
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run cmd under /usr/bin/time -v -> (exit code, seconds, peak RSS bytes)."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT).returncode
    text = log.read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return rc, time.time() - t0, int(m.group(1)) * 1024 if m else -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quant_quality")
    ap.add_argument("--modes", nargs="+", default=["none", "int8", "gguf"])
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--test-limit", type=int, default=200)
    ap.add_argument("--cutoff-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--val-size", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--cross-eval", nargs="*", default=["int8", "gguf"],
                    help="modes whose adapter is also scored on the dense base")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = []
    for mode in args.modes:
        run = out / f"rt-{mode}"
        train = [py, "train.py", "--stage", "rt", "--domain", "movie", "--shots", str(args.shots),
                 "--batch-size", str(args.batch_size), "--micro-batch-size", "8",
                 "--epochs", str(args.epochs), "--lr", str(args.lr), "--warmup-steps", "1",
                 "--val-size", str(args.val_size), "--eval-every", str(args.eval_every),
                 "--cutoff-len", str(args.cutoff_len), "--patience", "0", "--seed", str(args.seed),
                 "--precision", args.precision, "--quant", mode, "--out", str(run),
                 "--overwrite"]
        rc, secs, rss = timed(train, out / f"train-{mode}.log")
        row = {"quant": mode, "train_exit": rc, "train_seconds": round(secs, 1),
               "train_peak_rss": rss}
        if rc == 0:
            result = json.loads((run / "result.json").read_text())
            log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
            row.update(steps=result["steps"], best_step=result["best_step"],
                       best_val_auc=result["best_val_metric"],
                       train_tokens_per_s=rates[-1] if rates else None)
            for eval_quant in dict.fromkeys([mode] + (["none"] if mode in args.cross_eval
                                                      else [])):
                res = out / f"eval-{mode}-on-{eval_quant}.json"
                ev = [py, "evaluate.py", "--ckpt", str(run), "--domain", "movie", "--limit",
                      str(args.test_limit), "--precision", args.precision, "--quant", eval_quant,
                      "--cutoff-len", str(args.cutoff_len),
                      "--no-progress", "--out", str(res)]
                rc, secs, rss = timed(ev, out / f"eval-{mode}-on-{eval_quant}.log")
                key = "test" if eval_quant == mode else "test_on_dense_base"
                row[f"{key}_exit"], row[f"{key}_peak_rss"] = rc, rss
                if rc == 0:
                    r = json.loads(res.read_text())
                    row[f"{key}_auc"], row[f"{key}_seconds"] = r["auc"], r["seconds"]
        rows.append(row)
        (out / "quant_quality.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                           indent=1))
        print(json.dumps(row), flush=True)
    print(f"\n{'quant':<6} {'test AUC':>9} {'on dense':>9} {'val AUC':>8} "
          f"{'train RSS':>10} {'eval RSS':>9} {'train tok/s':>11}")
    for r in rows:
        mib = lambda b: f"{b / 2**20:.0f} MiB" if b and b > 0 else "-"
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
        print(f"{r['quant']:<6} {fmt(r.get('test_auc')):>9} "
              f"{fmt(r.get('test_on_dense_base_auc', r.get('test_auc'))):>9} "
              f"{fmt(r.get('best_val_auc')):>8} {mib(r['train_peak_rss']):>10} "
              f"{mib(r.get('test_peak_rss')):>9} {r.get('train_tokens_per_s') or '-':>11}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
