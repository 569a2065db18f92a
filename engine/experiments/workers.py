"""The grid over several workers: `python -m engine.experiments ... --workers N`.

Runs are independent processes' work, so the grid needs no distributed training: N worker
processes (one per GPU, or a share of the CPU threads each) take runs from the same cache
folder. A run is taken under an exclusive lock on `<run folder>/.lock` (fcntl.flock, which
the kernel releases when its owner dies, even by SIGKILL): no two workers on one run, and a
crashed worker's run is free again at once; the next worker finds its checkpoint and resumes
it. SIGINT or SIGTERM to the grid's process stops its training run after the step in flight,
with a checkpoint, and it passes SIGTERM on to the spawned workers, which do the same (they
ignore SIGINT, so that Ctrl-C, which reaches the whole process group, is one signal to them).
The lock file names its owner (pid, host) for people; the lock itself is the flock.
Workers on several machines can share one cache over a file system with working flock
(local disks, NFS v4 with lockd); see the README.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path

POLL_S = 0.5  # a worker waiting for a run another worker holds (or needs) looks this often


class RunLock:
    """Held from try_lock() until release() (or the end of the process)."""

    def __init__(self, file):
        self.file = file

    def release(self):
        # The file stays: unlinking a flock'ed file lets a second worker lock a new inode
        # while a third still holds the old one.
        self.file.seek(0)
        self.file.truncate()
        self.file.close()  # closing drops the flock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def try_lock(folder: Path) -> RunLock | None:
    """The run's lock, or None when another process (live) holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                        "since": time.time()}) + "\n")
    f.flush()
    return RunLock(f)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's CPU threads set to n (None: as they are) for the block, then put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def device_plan(grid, n: int, threads: int | None) -> list[dict]:
    """Per worker: the GPU it sees (CUDA_VISIBLE_DEVICES) or its share of the CPU threads."""
    import torch

    gpus = torch.cuda.device_count() if grid.device != "cpu" else 0
    # ids as CUDA_VISIBLE_DEVICES names them, so that a restricted parent stays restricted
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:gpus] if visible else [str(k) for k in range(gpus)]
    share = threads or max(1, (os.cpu_count() or 1) // n)
    return [{"gpu": ids[i % gpus] if gpus else None, "threads": share} for i in range(n)]


def _worker(grid, index: int, where: dict, seconds: dict, since: float):
    """A spawned worker w1, w2, ...; w0 runs in the grid's own process."""
    if where["gpu"] is not None:  # before any CUDA call in this (spawned) process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(where["gpu"])
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent passes stops on as SIGTERM
    torch.set_num_threads(where["threads"])
    from engine.experiments.grid import plan_runs
    from engine.experiments.runner import work

    try:
        work(grid, plan_runs(grid), seconds, progress=False, since=since, tag=f"w{index} ")
    except KeyboardInterrupt as e:  # its run saved its step (engine.train.Stopped)
        print(f"w{index} {e or 'interrupted'}", flush=True)
        raise SystemExit(getattr(e, "exit_code", 130)) from None


def run_workers(grid, n: int, seconds: dict, since: float, threads: int | None = None,
                on_result=None):
    """Run the grid in n workers (this process and n - 1 spawned ones) and wait for them all;
    on_result (the CLI's summary) is called after each run of this process's worker."""
    plan = device_plan(grid, n, threads)
    print(f"{n} workers: " + ", ".join(
        f"w{i} on " + (f"GPU {w['gpu']}" if w["gpu"] is not None else f"{w['threads']} CPU "
                                                                       f"thread(s)")
        for i, w in enumerate(plan)), flush=True)
    ctx = mp.get_context("spawn")  # a fresh interpreter: no inherited CUDA or thread state
    procs = [ctx.Process(target=_worker, args=(grid, i, w, seconds, since),
                         name=f"grid-worker-{i}") for i, w in enumerate(plan) if i > 0]
    for p in procs:
        p.start()
    # w0 is this process, already started up (imports, data): on small runs a process's
    # start-up is a large part of the work. Its device is the default one (GPU 0).
    try:
        from engine.experiments.grid import plan_runs
        from engine.experiments.runner import work

        with torch_threads(plan[0]["threads"]):
            work(grid, plan_runs(grid), seconds, progress=False, since=since, tag="w0 ",
                 on_result=on_result)
    except KeyboardInterrupt:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker's run saves its step and it exits
        raise
    finally:
        for p in procs:
            p.join()
    for i, p in enumerate(procs, 1):
        if p.exitcode != 0:
            print(f"worker w{i} exited with code {p.exitcode}; a run it held was taken up by "
                  f"another worker, or resumes on the next invocation", flush=True)
