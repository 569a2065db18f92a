"""Running the grid: a cache keyed by each run's config hash, resumable, failures recorded.

Layout of <out>/runs/<name>/:
  spec.json    name, hash, the full config (spec) and its grouping keys (meta)
  train/       train.py's run folder (train runs)
  log.txt      everything the run printed, and the traceback if it failed
  result.json  written last: status ok|failed, the hash, metrics (eval) or train's result

A run whose result.json says ok with the requested hash is never repeated. A train run with
a checkpoint but no result resumes from it (train's `resume`). A folder whose spec.json holds
another hash is an error: one out folder holds one grid, and mixing results of different
settings in one table is how wrong papers are written. Failed runs are retried on the next
invocation (the failure may have been a killed machine); runs needing a failed run fail too.
Adapters are not part of the committed cache (results/.gitignore): a finished training run
whose adapter is gone is trained again when a run still to do starts from it (stage 1 for
stage 2, an adapter for its test); its result is rewritten, its log appended to.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from engine.experiments.eta import Estimator, fmt_s
from engine.experiments.grid import GridConfig, Run, plan_runs
from engine.precision import emulated_bf16_warning
from engine.train import train
from fileio import atomic_write_json, find_dir
from paths import data_root as resolve_data_root


class CacheConflict(ValueError):
    pass


def run_dir(grid: GridConfig, run: Run) -> Path:
    return Path(grid.out) / "runs" / run.name


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def check_cache(grid: GridConfig, runs: list[Run]) -> dict[str, str]:
    """-> {run name: done | failed | resume | todo}; raises CacheConflict before any work."""
    status, conflicts = {}, []
    for run in runs:
        folder = run_dir(grid, run)
        stored = read_json(folder / "spec.json")
        if stored is not None and stored["hash"] != run.hash:
            conflicts.append(f"{folder}: " + "; ".join(_diff(stored["spec"], run.spec)[:4]))
            continue
        result = read_json(folder / "result.json")
        if result is not None and result["hash"] == run.hash:
            status[run.name] = "done" if result["status"] == "ok" else "failed"
        elif run.kind == "train" and find_dir(folder / "train" / "last") is not None:
            status[run.name] = "resume"
        else:
            status[run.name] = "todo"
    for name in stale_adapters(grid, runs):
        status[name] = "retrain"
    if conflicts:
        raise CacheConflict(
            f"{len(conflicts)} cached run(s) in {grid.out} were made with other settings "
            f"(stored -> requested):\n  " + "\n  ".join(conflicts[:5])
            + "\nuse another --out for the new settings (or delete those run folders)")
    return status


class _Tee:
    """Writes to the console and to the run's log; tqdm's carriage-return redraws stay off
    the log."""

    def __init__(self, console, log, show: bool):
        self.console, self.log, self.show = console, log, show

    def write(self, s):
        if self.show:
            self.console.write(s)
        if "\r" not in s:
            self.log.write(s)
        return len(s)

    def flush(self):
        self.console.flush()
        self.log.flush()


@contextlib.contextmanager
def tee_to(path: Path, show: bool):
    with open(path, "a") as log, \
            contextlib.redirect_stdout(_Tee(sys.stdout, log, show)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, log, show)):
        yield log


def ensure_semantic_data(grid: GridConfig) -> Path:
    """The movie splits with retrieved histories (grid.retrieval), built once into
    grid.semantic_dir() (all three files appear together: built in a side folder, then
    renamed; the build is deterministic, so when two processes race, either copy is the
    same)."""
    folder = grid.semantic_dir()
    if all((folder / f"{s}.json").is_file() for s in ("train", "valid", "test")):
        return folder
    from data.movielens import MovieLensConfig, build_movielens, collaborative_selector_factory
    from data.records import write_records
    from engine.embed import semantic_selector_factory

    root = resolve_data_root(grid.data_root)
    spec = grid.semantic_spec()
    cfg = MovieLensConfig(history_len=spec["history_len"], history_pool=spec["pool"])
    print(f"building movie splits with {grid.retrieval} histories into {folder} (once)",
          flush=True)
    make_select = semantic_selector_factory(cfg.history_len, grid.base, grid.tokenizer) \
        if grid.retrieval == "semantic" else collaborative_selector_factory(cfg)
    splits = build_movielens(root / "raw" / "ml-100k", cfg, make_select)
    part = folder.with_name(f"{folder.name}.part-{os.getpid()}")  # one per process
    for name, samples in splits.items():
        write_records(part / f"{name}.json", [s.to_record() for s in samples])
    try:
        part.rename(folder)
    except OSError:  # another process finished the same build first: keep its copy
        shutil.rmtree(part)
    return folder


def run_grid(grid: GridConfig, progress: bool = True, plan_only: bool = False,
             on_result: Callable[[], None] | None = None, workers: int = 1,
             threads: int | None = None) -> dict:
    """Plan, print the plan with an ETA, run what is not cached (in this process, or in
    `workers` worker processes: workers.py); -> counts and statuses. `on_result` is called
    after every run this process finishes (the CLI rewrites the summary there)."""
    runs = plan_runs(grid)
    est = Estimator(grid)
    est.check_pools()  # shots larger than a training pool: an error before any work
    status = check_cache(grid, runs)
    # rates from every finished run of this out folder, not only the planned ones: a subset
    # (--shots 16) is timed by the runs the full grid finished before it
    est.measure_from_cache(sorted((Path(grid.out) / "runs").glob("*/")))
    seconds = {r.name: est.seconds(r) for r in runs}
    todo = [r for r in runs if status[r.name] != "done"]
    print(est.plan_table(runs, status, seconds))
    if warning := emulated_bf16_warning(grid.device, grid.precision):
        print(f"WARNING: every run here is {grid.precision}: {warning} (fp32 runs are a new "
              f"set in the cache, apart from these); the ETA above is too short if the runs it "
              f"was timed on had native bf16", flush=True)
    if plan_only:
        return {"planned": len(runs), "todo": len(todo), "eta_s": sum(seconds[r.name]
                                                                     for r in todo)}
    t_start = time.time()
    if workers > 1:
        from engine.experiments.workers import run_workers

        run_workers(grid, workers, seconds, t_start, threads, on_result)
    else:
        from engine.experiments.workers import torch_threads

        with torch_threads(threads):
            work(grid, runs, seconds, progress, t_start, on_result=on_result)
    counts = {"ran": 0, "failed": 0, "cached": len(runs) - len(todo)}
    for r in todo:  # what this invocation's workers finished
        result = read_json(run_dir(grid, r) / "result.json") or {}
        if result.get("hash") == r.hash and result.get("finished", 0) >= t_start:
            counts["ran" if result["status"] == "ok" else "failed"] += 1
    counts["seconds"] = round(time.time() - t_start, 1)
    print(f"grid: {counts['ran']} ran, {counts['cached']} cached, {counts['failed']} failed "
          f"in {fmt_s(counts['seconds'])}")
    return counts


def finished(grid: GridConfig, run: Run, since: float) -> str | None:
    """ok (ever, with this hash), failed (in this invocation), else None: still to run."""
    result = read_json(run_dir(grid, run) / "result.json")
    if result is None or result.get("hash") != run.hash:
        return None
    if result["status"] == "ok":
        return "ok"
    return "failed" if result.get("finished", 0) >= since else None  # older: retried


def adapter_missing(grid: GridConfig, run: Run) -> bool:
    """A finished training run whose adapter (the path its result names) is not on disk."""
    result = read_json(run_dir(grid, run) / "result.json") or {}
    adapter = result.get("adapter")
    return (run.kind == "train" and result.get("hash") == run.hash
            and result.get("status") == "ok" and not (adapter and Path(adapter).is_dir()))


def stale_adapters(grid: GridConfig, runs: list[Run]) -> set[str]:
    """Finished training runs to train again: a run still to do needs their missing adapter."""
    by_name = {r.name: r for r in runs}
    return {r.needs for r in runs
            if r.needs in by_name and finished(grid, r, 0.0) != "ok"
            and adapter_missing(grid, by_name[r.needs])}


def work(grid: GridConfig, runs: list[Run], seconds: dict, progress: bool, since: float,
         tag: str = "", on_result: Callable[[], None] | None = None):
    """Take and run, in plan order, every run whose dependency is finished, until none is
    left. A run is taken under its lock (workers.try_lock): other workers skip it; a run
    held or needed elsewhere is waited for. One worker runs the plan order exactly."""
    from engine.experiments.workers import POLL_S, try_lock

    final: dict[str, str] = {}
    n_done = 0
    redo = stale_adapters(grid, runs)
    for name in sorted(redo):
        print(f"{name}: finished, but its adapter is gone (adapters stay local); trained "
              f"again for the runs that start from it", flush=True)
    while True:
        for r in runs:
            if (r.name not in final and r.name not in redo
                    and (f := finished(grid, r, since)) is not None):
                final[r.name] = f
        left = [r for r in runs if r.name not in final]
        if not left:
            return
        for run in left:
            if run.needs is not None and run.needs not in final:
                continue
            lock = try_lock(run_dir(grid, run))
            if lock is None:
                continue
            with lock:
                # to redo unless another worker trained it again meanwhile
                stale = run.name in redo and adapter_missing(grid, run)
                redo.discard(run.name)
                if stale or finished(grid, run, since) is None:  # not finished while we looked
                    n_done += 1
                    eta = sum(seconds[r.name] for r in left)
                    final[run.name] = run_one(grid, run, final.get(run.needs), progress,
                                              f"{tag}[{n_done}/{len(left) + n_done - 1}]", eta,
                                              seconds[run.name])
                    if on_result is not None:
                        on_result()
            break
        else:
            time.sleep(POLL_S)


def run_one(grid: GridConfig, run: Run, needed: str | None, progress: bool, label: str,
            eta: float, est: float) -> str:
    """Run one (locked) run and write its result.json: -> ok | failed."""
    folder = run_dir(grid, run)
    state = "resume" if run.kind == "train" and find_dir(folder / "train" / "last") else "todo"
    atomic_write_json(folder / "spec.json", {"name": run.name, "hash": run.hash,
                                             "spec": run.spec, "meta": run.meta})
    print(f"{label} {run.name} ({state}, est. {fmt_s(est)}; grid ETA {fmt_s(eta)})", flush=True)
    t0 = time.time()
    try:
        if run.needs is not None and needed != "ok":
            raise RuntimeError(f"needs {run.needs}, which did not finish (see its log)")
        if "history" in run.spec:
            ensure_semantic_data(grid)
        adapters = {}
        if run.needs is not None:
            adapters[run.needs] = read_json(Path(grid.out) / "runs" / run.needs
                                           / "result.json")["adapter"]
        with tee_to(folder / "log.txt", progress):
            payload = execute(grid, run, adapters, state, progress)
        result = {"status": "ok", **payload}
    except Exception as e:  # recorded with its traceback; the grid goes on
        with open(folder / "log.txt", "a") as log:
            log.write(traceback.format_exc())
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                  "log": str(folder / "log.txt")}
        print(f"  FAILED: {result['error']} (log: {folder / 'log.txt'})", flush=True)
    took = time.time() - t0
    atomic_write_json(folder / "result.json", {**result, "name": run.name, "hash": run.hash,
                                               "kind": run.kind, "meta": run.meta,
                                               "seconds": round(took, 2),
                                               "finished": time.time(), "pid": os.getpid()})
    if result["status"] == "ok":
        print(f"  {run.name} done in " + fmt_s(took)
              + (f": AUC {result['auc']:.4f}" if result.get("auc") is not None else ""),
              flush=True)
    return result["status"]


def execute(grid, run: Run, adapters, state: str, progress: bool) -> dict:
    if run.kind == "train":
        return execute_train(grid, run, adapters, state, progress)
    return execute_eval(grid, run, adapters.get(run.needs) if run.needs else None)


def execute_train(grid, run: Run, adapters, state: str, progress: bool) -> dict:
    out = run_dir(grid, run) / "train"
    fresh = state != "resume"
    cfg = replace(run.cfg, out=str(out), resume=not fresh,
                  overwrite=fresh and out.exists(),  # a start that never reached a checkpoint
                  init_adapter=adapters[run.needs] if run.needs else None)
    res = train(cfg, progress=progress)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    rates = [x["tokens_per_s"] for x in lines if "tokens_per_s" in x]
    return {**res, "train_tokens_per_s": rates[-1] if rates else None}


def execute_eval(grid: GridConfig, run: Run, adapter: str | None) -> dict:
    """Score the test split with the base (zero-shot) or an adapter: evaluate.py's path and
    result format (auc, n, positives, accuracy, log_loss, probs, labels)."""
    from engine.evaluation import EvalConfig, evaluate
    from engine.scoring import summary_line

    spec = run.spec
    # the same rows with retrieved histories, when the run asks for them
    data = (str(Path(spec["history"]["folder"]) / f"{spec['split']}.json")
            if "history" in spec else None)
    result = evaluate(EvalConfig(
        ckpt=adapter or "none", base=grid.base, tokenizer=grid.tokenizer, domain=spec["domain"],
        split=spec["split"], data=data, data_root=grid.data_root, limit=spec["limit"],
        # a fixed sample (not the first rows: files list users in order), same for every run
        limit_seed=spec["limit_seed"], batch_size=spec["batch_size"],
        cutoff_len=spec["cutoff_len"], device=grid.device, precision=grid.precision,
        progress=False))
    print(summary_line(f"{spec['domain']} test", result)
          + (" [SYNTHETIC toy data]" if result["synthetic_data"] else ""))
    return result
