"""python -m baselines --model gru4rec caser sasrec --domain movie --shots 16 64 256 --seeds 5

Runs TALLRec's baseline protocol for every (model, shots), prints a table of test AUC
(mean +- std over seeds at the weight decay chosen on validation AUC) and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import subprocess
import sys
import time
from pathlib import Path

from baselines.models import MODELS
from baselines.train import WEIGHT_DECAYS, BaselineConfig, run_baseline_grid
from fileio import atomic_write_json, make_dir
from paths import DATA_ROOT_HELP, PROJECT_ROOT


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m baselines", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", nargs="+", default=["gru4rec"], choices=MODELS)
    p.add_argument("--domain", default="movie", choices=("movie", "book", "toy"))
    p.add_argument("--shots", nargs="+", type=int, default=[16, 64, 256])
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1")
    p.add_argument("--weight-decays", nargs="+", type=float, default=list(WEIGHT_DECAYS))
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--out", default=None, help="JSON file (default results/baselines_<domain>"
                                               ".json)")
    p.add_argument("--quiet", action="store_true", help="no per-run lines on stderr")
    # One flag per BaselineConfig field.
    for f in dataclasses.fields(BaselineConfig):
        kind = type(f.default) if f.default is not None else str
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    return p.parse_args(argv)


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT,
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = BaselineConfig(**{f.name: getattr(args, f.name)
                            for f in dataclasses.fields(BaselineConfig)})
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    results = []
    t0 = time.time()
    for model in args.model:
        for shots in args.shots:
            results.append(run_baseline_grid(model, args.domain, shots, args.seeds,
                                             tuple(args.weight_decays), cfg, args.data_root,
                                             log=log))
    report = {
        "what": "TALLRec baselines: test AUC, mean +- std over seeds at the weight decay with "
                "the best mean validation AUC",
        "domain": args.domain, "synthetic": args.domain == "toy", "commit": _commit(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_s": round(time.time() - t0, 1), "argv": sys.argv[1:] if argv is None else argv,
        "results": results,
    }
    out = Path(args.out or PROJECT_ROOT / "results" / f"baselines_{args.domain}.json")
    make_dir(out.parent)
    atomic_write_json(out, report, indent=1, newline=True)

    print(f"{'model':<10}" + "".join(f"{f'K={k}':>18}" for k in args.shots))
    for model in args.model:
        row = {r["shots"]: r for r in results if r["model"] == model}
        cells = [f"{row[k]['test_auc_mean']:.4f} ± {row[k]['test_auc_std']:.4f}"
                 for k in args.shots]
        print(f"{model:<10}" + "".join(f"{c:>18}" for c in cells))
    print("weight decay chosen: " + ", ".join(
        f"{r['model']}/K={r['shots']}: {r['weight_decay']:g}" for r in results))
    if args.domain == "toy":
        print("[SYNTHETIC toy data, not a real benchmark]")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
