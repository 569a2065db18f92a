"""Where a process's resident memory goes: run a Python script in this process while a thread
samples its RSS and glibc's heap every 50 ms, and write the sample taken at the highest RSS.

    python -m bench.heap --json OUT.json train.py --stage rt ...

At that sample (MiB): `rss` (/proc/self/status VmRSS), `heap_live` (bytes malloc has handed out
from its heaps, mallinfo2's uordblks), `heap_free` (free space inside those heaps, fordblks: the
pages glibc keeps resident after free, i.e. fragmentation), `mmapped` (chunks malloc mapped on
their own, hblkhd). Sampling can miss a peak shorter than the period, so `/usr/bin/time -v`
stays the measure of the peak itself; this is its split. Needs glibc >= 2.33 for mallinfo2;
elsewhere only `rss` is written.
"""

import argparse
import atexit
import ctypes
import os
import runpy
import sys
import threading

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


def _mallinfo2():
    """glibc's mallinfo2, or None where there is none (musl, macOS, glibc < 2.33)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = MallInfo2
    return fn


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class HeapSampler:
    def __init__(self, period_s: float = 0.05):
        self.period_s, self.mallinfo2, self.peak = period_s, _mallinfo2(), {"rss": 0.0}
        self._stop = threading.Event()

    def sample(self) -> dict:
        row = {"rss": rss_mib()}
        if self.mallinfo2 is not None:
            m = self.mallinfo2()
            row.update(heap_live=m.uordblks / 2**20, heap_free=m.fordblks / 2**20,
                       mmapped=m.hblkhd / 2**20)
        return row

    def _keep(self, row: dict):
        if row["rss"] > self.peak["rss"]:
            self.peak = row

    def _run(self):
        while not self._stop.is_set():
            self._keep(self.sample())
            self._stop.wait(self.period_s)

    def start(self):
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        self._keep(self.sample())  # the last moment counts too
        return {k: round(v, 1) for k, v in self.peak.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the peak sample")
    ap.add_argument("--period", type=float, default=0.05, help="seconds between samples")
    ap.add_argument("script", help="the Python script to run in this process")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.script):
        raise SystemExit(f"bench.heap: no script {args.script}")
    sampler = HeapSampler(args.period).start()

    def write():
        from fileio import atomic_write_json
        atomic_write_json(args.json, sampler.stop())

    atexit.register(write)
    sys.argv = [args.script, *args.args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    runpy.run_path(args.script, run_name="__main__")


if __name__ == "__main__":
    main()
