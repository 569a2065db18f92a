"""bench.heap: the RSS peak of a script run in-process, split by glibc's heap counters."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

from bench.heap import _mallinfo2  # noqa: E402

SCRIPT = """
import sys, time
blocks = [bytearray(4 << 20) for _ in range(40)]   # 160 MiB live, touched
for b in blocks:
    b[::4096] = b"\\x01" * len(b[::4096])
time.sleep(0.5)
del blocks
sys.exit(3)
"""


def test_peak_holds_the_live_blocks_and_keeps_the_exit_code(tmp_path):
    script, out = tmp_path / "alloc.py", tmp_path / "heap.json"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "bench.heap", "--json", str(out), str(script)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr  # the script's own exit code
    peak = json.loads(out.read_text())
    assert peak["rss"] >= 160, peak  # the sample at the peak saw the 160 MiB resident
    if _mallinfo2() is None:
        pytest.skip("no mallinfo2 (needs glibc >= 2.33): only rss is written")
    # 4 MiB blocks: mmapped while glibc's threshold is low, from the heap once it rose; either
    # way malloc counts them as handed out (live heap or mmapped), not as free space
    assert peak["heap_live"] + peak["mmapped"] >= 160, peak
    assert peak["heap_free"] < 64, peak


def test_missing_script_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.heap", "--json", str(tmp_path / "h.json"),
                           str(tmp_path / "nope.py")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "no script" in proc.stderr
    assert not (tmp_path / "h.json").exists()
