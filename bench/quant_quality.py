"""Rec-tuning on a quantized frozen base vs the dense base, on CPU with SmolLM2-135M: the
64-shot CPU protocol's test AUC per seed, and peak RSS (issue 17, item 4).

For each --quant mode and seed: `train.py --stage rt --preset cpu --domain movie --shots K
--seed S --precision bf16 --quant Q`, then `evaluate.py` on the whole movie test split on the
same quantized base. These are the settings of the `cpu` grid's RT runs (its rt-cpu preset,
bf16, the full test set), so the dense reference is the grid's own rt-movie-k<K>-s<S> runs,
read from --dense-results; their configs are checked to equal ours but for --quant.

Peak RSS is `/usr/bin/time -v`'s maximum resident set size of one process. The long runs'
RSS is recorded, but for the comparison every mode (none included) also runs the same short
probe alone: 2 training steps then one validation of 32 rows, `--max-steps 2`, under
`bench.heap`, which splits the RSS at its peak into live heap bytes, free space inside glibc's
heap (fragmentation) and mmapped chunks.

Resumable: a finished run or test is never repeated, a stopped run continues with --resume.

    python -m bench.quant_quality --out runs/quant_quality [--modes int8 gguf] [--seeds 0 1 2]
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.experiments.grid import NOT_HASHED  # noqa: E402
from engine.experiments.runner import read_json as read  # noqa: E402
from fileio import atomic_write_json  # noqa: E402

# config.json keys allowed to differ from the dense grid run's: what the grid does not hash
# (where a run lives, how it logs) and the point of the comparison
FREE_KEYS = {"quant", *NOT_HASHED}


def timed(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """Run cmd under /usr/bin/time -v -> (exit code, seconds, peak RSS bytes)."""
    t0 = time.time()
    with open(log, "a") as f:
        rc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT,
                            cwd=ROOT).returncode
    m = re.findall(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    return rc, time.time() - t0, int(m[-1]) * 1024 if m else -1


def protocol(args, mode: str) -> list[str]:
    """train.py with the cpu grid's RT settings on a `mode` base."""
    return [sys.executable, "train.py", "--stage", "rt", "--preset", "cpu", "--domain", "movie",
            "--shots", str(args.shots), "--device", "cpu", "--precision", "bf16", "--quant", mode]


def train_cmd(args, mode: str, seed: int, out: Path) -> list[str]:
    cmd = protocol(args, mode) + ["--seed", str(seed), "--out", str(out)]
    if (out / "last").is_dir():
        cmd.append("--resume")
    elif out.exists():
        cmd.append("--overwrite")  # a start that never reached a checkpoint
    return cmd


def check_same_protocol(ours: Path, dense: Path) -> list[str]:
    a, b = read(ours / "config.json"), read(dense / "config.json")
    if a is None or b is None:
        return [f"no config.json in {ours if a is None else dense}"]
    return [f"{k}: {b.get(k)!r} (dense) vs {a.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in FREE_KEYS and a.get(k) != b.get(k)]


def run_seed(args, out: Path, mode: str, seed: int) -> dict:
    name = f"rt-{mode}-s{seed}"
    row_path = out / f"{name}.json"
    row = read(row_path) or {"quant": mode, "seed": seed}
    run = out / name
    if "train_exit" not in row or row["train_exit"] != 0:
        print(f"{name}: training", flush=True)
        rc, secs, rss = timed(train_cmd(args, mode, seed, run), out / f"{name}.train.log")
        row.update(train_exit=rc, train_seconds=round(secs, 1), train_peak_rss=rss)
        if rc != 0:
            atomic_write_json(row_path, row)
            raise SystemExit(f"{name}: train.py exited {rc}; see {out / f'{name}.train.log'}")
        result = read(run / "result.json")
        log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r]
        row.update(steps=result["steps"], best_step=result["best_step"],
                   best_val_auc=result["best_val_metric"],
                   train_tokens_per_s=rates[-1] if rates else None)
        atomic_write_json(row_path, row)
    if "test_auc" not in row:
        print(f"{name}: testing", flush=True)
        res = out / f"{name}.test.json"
        cmd = [sys.executable, "evaluate.py", "--ckpt", str(run), "--domain", "movie",
               "--device", "cpu", "--precision", "bf16", "--quant", mode, "--no-progress",
               "--out", str(res)]
        rc, secs, rss = timed(cmd, out / f"{name}.test.log")
        if rc != 0:
            raise SystemExit(f"{name}: evaluate.py exited {rc}; see {out / f'{name}.test.log'}")
        r = read(res)
        row.update(test_auc=r["auc"], test_n=r["n"], test_seconds=round(secs, 1),
                   test_peak_rss=rss)
        atomic_write_json(row_path, row)
    dense = Path(args.dense_results) / "runs" / f"rt-movie-k{args.shots}-s{seed}"
    test = read(Path(args.dense_results) / "runs" / f"eval-rt-movie-k{args.shots}-s{seed}-on-movie"
                / "result.json")
    diff = check_same_protocol(run, dense / "train")
    row["dense_test_auc"] = test["auc"] if test and test.get("status") == "ok" and not diff \
        else None
    row["dense_protocol_differs"] = diff
    return row


def probe(args, out: Path, mode: str) -> dict:
    """2 training steps + one 32-row validation, alone: the peak RSS every mode is compared by."""
    path = out / f"probe-{mode}.json"
    if (row := read(path)) is not None:
        return row
    run = out / f"probe-{mode}"
    cmd = protocol(args, mode) + ["--max-steps", "2", "--eval-every", "2", "--eval-every-epochs",
                                  "0", "--val-size", "32", "--out", str(run)] \
        + (["--overwrite"] if run.exists() else [])
    heap = out / f"probe-{mode}.heap.json"
    cmd = [cmd[0], "-m", "bench.heap", "--json", str(heap), *cmd[1:]]
    print(f"probe-{mode}: 2 steps + 1 validation", flush=True)
    rc, secs, rss = timed(cmd, out / f"probe-{mode}.log")
    if rc != 0:
        raise SystemExit(f"probe-{mode}: train.py exited {rc}; see {out / f'probe-{mode}.log'}")
    row = {"quant": mode, "peak_rss": rss, "seconds": round(secs, 1), "heap": read(heap)}
    atomic_write_json(path, row)
    return row


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1
                                           else "") + f" (n={len(xs)})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quant_quality", help="run folders and JSON rows")
    ap.add_argument("--modes", nargs="+", default=["int8", "gguf"],
                    choices=["int8", "nf4", "nf4-dq", "gguf"], help="quantized bases to train on")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--shots", type=int, default=64)
    ap.add_argument("--dense-results", default=str(ROOT / "results" / "cpu"),
                    help="the cpu grid's results folder: the dense base's runs of the same "
                         "protocol and seeds")
    ap.add_argument("--no-probe", action="store_true", help="skip the peak-RSS probes")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    probes = [] if args.no_probe else [probe(args, out, m) for m in ["none", *args.modes]]
    rows = [run_seed(args, out, mode, seed) for seed in args.seeds for mode in args.modes]
    atomic_write_json(out / "quant_quality.json", {"args": vars(args), "probes": probes,
                                                   "rows": rows})
    mib = lambda b: f"{b / 2**20:,.0f} MiB" if b and b > 0 else "-"
    print("\npeak RSS, 2 steps + one 32-row validation, one process alone:")
    for p in probes:
        heap = p.get("heap") or {}
        split = ", ".join(f"{k} {heap[k]:,.0f} MiB" for k in ("heap_live", "heap_free", "mmapped")
                          if k in heap)
        print(f"  {p['quant']:<7} {mib(p['peak_rss'])}"
              + (f" (at the sampled peak, {heap['rss']:,.0f} MiB: {split})" if split else ""))
    print(f"\n{'quant':<7} {'seed':>4} {'test AUC':>9} {'dense':>8} {'diff':>8} {'best step':>9} "
          f"{'train RSS':>10} {'test RSS':>10} {'train tok/s':>11}")
    for r in rows:
        d = r["dense_test_auc"]
        dense_s, diff_s = ("-", "-") if d is None else (f"{d:.4f}", f"{r['test_auc'] - d:+.4f}")
        print(f"{r['quant']:<7} {r['seed']:>4} {r['test_auc']:>9.4f} {dense_s:>8} {diff_s:>8} "
              f"{r['best_step']:>9} "
              f"{mib(r['train_peak_rss']):>10} {mib(r['test_peak_rss']):>10} "
              f"{r['train_tokens_per_s'] or 0:>11.1f}")
        for line in r["dense_protocol_differs"]:
            print(f"    not comparable with the dense run: {line}")
    dense = {r["seed"]: r["dense_test_auc"] for r in rows if r["dense_test_auc"] is not None}
    print(f"\ndense (bf16) base: {mean_std(list(dense.values()))}")
    for mode in args.modes:
        mine = [r for r in rows if r["quant"] == mode]
        diffs = [r["test_auc"] - dense[r["seed"]] for r in mine if r["seed"] in dense]
        print(f"{mode}: {mean_std([r['test_auc'] for r in mine])}; paired diff to dense "
              f"{mean_std(diffs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
