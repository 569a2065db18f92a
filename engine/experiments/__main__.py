"""`python -m engine.experiments`: run TALLRec's grid for a base model and write its tables
and plots. Every run is cached under --out; running the same command again resumes."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from engine.config import DEVICE_AUTO_HELP, DEVICES, PRECISION_AUTO_HELP, PRECISIONS, TrainConfig
from engine.experiments.grid import EVAL_DOMAINS, PRESETS, RETRIEVAL_TAGS, TRAIN_DOMAINS, VARIANTS
from paths import DATA_ROOT_HELP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.experiments", description=__doc__,
        epilog="examples: --preset cpu --plan | --preset paper --base /models/llama-7b "
               "| --preset tiny --out /tmp/tiny | --preset cpu --summary-only")
    p.add_argument("--preset", default="cpu-small", choices=list(PRESETS),
                   help="cpu: SmolLM2-135M, K in 64/256/16 (that order), zero-shot/IT/RT/IT+RT "
                        "rec-tuned on movie and on book, full movie and book test sets, 3 seeds, "
                        "rt-cpu/it-cpu schedules, semantic-history variants on movie: many "
                        "hours (--plan prints the ETA); cpu-small: SmolLM2-135M, K in 16/64/256, "
                        "RT and IT+RT on movie, tested on movie and book, 1 seed, ~40 min on 2 "
                        "CPU cores, too few steps to learn; paper: LLaMA-7B (give "
                        "--base), K 1..256, train on movie/book/both, 5 seeds, a GPU; tiny: a "
                        "random 2-layer model on the synthetic toy domain (tests)")
    p.add_argument("--base", help="base model (any train.py --base: preset, HF/Meta folder, "
                                  ".gguf, random:<preset>)")
    p.add_argument("--tokenizer", help="tokenizer overriding the one found with the base")
    p.add_argument("--variants", nargs="+", choices=VARIANTS,
                   help="zero-shot: base as is; it: Alpaca adapter only; rt: rec-tuning from "
                        "the base; it+rt: rec-tuning from the it adapter (TALLRec)")
    p.add_argument("--shots", nargs="+", type=int, help="K values (training samples)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds; tables give mean ± std")
    p.add_argument("--train-domains", nargs="+", choices=TRAIN_DOMAINS,
                   help="rec-tuning domains (both = K shots from each of movie and book)")
    p.add_argument("--eval-domains", nargs="+", choices=EVAL_DOMAINS,
                   help="test splits every adapter is scored on (in- and cross-domain)")
    p.add_argument("--semantic-variants", nargs="*", choices=VARIANTS,
                   help="variants also run on movie with retrieved (ReLLa) histories; "
                        "none: no such runs")
    p.add_argument("--retrieval", choices=list(RETRIEVAL_TAGS),
                   help="how those runs retrieve history items: semantic (title embeddings of "
                        "the base, runs tagged -sem; the default) or collaborative (rating "
                        "vectors of the training users, item-based CF, runs tagged -cf)")
    p.add_argument("--out", help="results folder: runs/ cache, summary.md, figures")
    p.add_argument("--eval-limit", type=int,
                   help="test rows per domain, a fixed seed-0 sample (-1 = all)")
    p.add_argument("--sample-budget", type=int,
                   help="rec-tuning epochs = ceil(budget / K), capped by the rt epochs (0 = off)")
    p.add_argument("--it", nargs="+", default=[], metavar="KEY=VALUE",
                   help="stage-1 settings over the `it` training preset, e.g. max_steps=100")
    p.add_argument("--rt", nargs="+", default=[], metavar="KEY=VALUE",
                   help="rec-tuning settings over the `rt` training preset, e.g. lr=1e-4 "
                        "epochs=200 patience=10")
    p.add_argument("--device", choices=DEVICES,
                   help=f"every run's device (default: the preset's; {DEVICE_AUTO_HELP})")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="every run's precision (default: the preset's); " + PRECISION_AUTO_HELP)
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.add_argument("--train-tokens-per-s", type=float,
                   help="training throughput for the ETA until finished runs measure one")
    p.add_argument("--eval-tokens-per-s", type=float,
                   help="scoring throughput for the ETA until finished runs measure one")
    p.add_argument("--plan", action="store_true", help="print the run list and ETA, run nothing")
    p.add_argument("--summary-only", action="store_true",
                   help="rewrite summary.md and the figures from the cache, run nothing")
    p.add_argument("--baseline-results", nargs="+", default=[], metavar="FILE",
                   help="baseline result files to add to Table 2, as `python -m baselines "
                        "--out FILE` writes them (files in <out>/baselines/ are read anyway)")
    p.add_argument("--no-progress", action="store_true", help="hide per-step progress bars")
    p.add_argument("--workers", type=int, default=1,
                   help="runs in parallel: worker processes sharing the --out cache, one GPU "
                        "each (round robin), or on CPU a share of the cores each; workers on "
                        "other machines may share the same --out (see the README)")
    p.add_argument("--threads", type=int,
                   help="CPU threads per worker (default: cores / workers)")
    return p


def parse_settings(items: list[str]) -> dict:
    """KEY=VALUE strings -> TrainConfig field values of the field's type."""
    types = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in types:
            raise ValueError(f"bad setting {item!r}: expected KEY=VALUE with KEY a TrainConfig "
                             f"field (train.py --help lists them)")
        default = types[key]
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(default, list):
            out[key] = value.split(",")
        elif isinstance(default, int | float):
            out[key] = type(default)(value)
        else:
            out[key] = None if value.lower() == "none" else value
    return out


def main(argv: list[str] | None = None) -> int:
    from engine.experiments.grid import GridConfig, grid_from_preset, plan_runs
    from engine.experiments.runner import run_grid
    from engine.experiments.summary import write_summary

    args = build_parser().parse_args(argv)
    # A grid runs for hours with its output sent to a log file: each line reaches the log as
    # it is printed, not a buffer's worth later.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    try:
        # every flag named after a GridConfig field overrides the preset's value; the
        # --baseline-results files are added to the preset's, not put in their place
        given = vars(args)
        over = {f.name: given[f.name] for f in fields(GridConfig)
                if f.name in given and f.name != "baseline_results"}
        over["it"], over["rt"] = parse_settings(args.it), parse_settings(args.rt)
        grid = grid_from_preset(args.preset, **over)
        planned = plan_runs(grid)
        baseline_files = [*grid.baseline_results, *args.baseline_results]
        for f in [f for f in baseline_files if not Path(f).is_file()]:
            print(f"note: baseline results {f} not found (run from the repo root, or make it "
                  f"with `python -m baselines`); Table 2 goes without them")
            baseline_files.remove(f)

        # settings given over the presets are part of what the tables show
        given_over = [f"{stage} {' '.join(getattr(args, stage))}" for stage in ("it", "rt")
                      if getattr(args, stage)]
        title = f"{args.preset} ({grid.base})" + "".join(f"; {g}" for g in given_over)

        def summarize():
            return write_summary(grid.out, planned, title=title, baseline_files=baseline_files)

        if not args.summary_only:
            if args.workers < 1 or (args.threads is not None and args.threads < 1):
                raise ValueError("--workers and --threads must be >= 1")
            run_grid(grid, progress=not args.no_progress and args.workers == 1,
                     plan_only=args.plan, on_result=summarize, workers=args.workers,
                     threads=args.threads)
            if args.plan:
                return 0
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # SIGINT/SIGTERM: a training run saved its step (Stopped)
        print(f"grid stopped: {e or 'interrupted'}; finished runs are cached and the same "
              f"command resumes", file=sys.stderr)
        if not args.summary_only:
            print(f"summary: {summarize()}")
        return getattr(e, "exit_code", 130)
    print(f"summary: {summarize()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
