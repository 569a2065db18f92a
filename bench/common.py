"""What the GPU benchmarks share: the datasheet peak of the detected GPU, a measured matmul
rate, run metadata, an atomic JSON writer, and one error record per failed phase.

MFU is quoted against the datasheet's dense bf16 tensor-core peak (the convention of PaLM's
MFU and of most LoRA/LLM training reports), with the measured cuBLAS rate as a second column:
the datasheet figure says how much of the chip the step uses, the measured one how far it is
from what a plain large GEMM reaches on this card today.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time
import traceback
from pathlib import Path

import torch

from fileio import atomic_write

# Dense (no 2:4 sparsity) bf16 tensor-core peak, TFLOP/s, by a substring of
# torch.cuda.get_device_name(); first match wins, so the specific names come first. Checked
# (2026-11-29) against copies of the vendors' datasheets, not the PDFs themselves:
#   H100 SXM / H200 SXM 989.4: H100 and H200 datasheets list 1,979 with sparsity; 989.43 dense
#     on TechPowerUp's H100 SXM5 entry (mirrored at hmc-tech.com); itkb.uw.cz's H200 table: ~989.
#   A100 (SXM and PCIe) 312: A100 datasheet, 312 dense / 624 sparse (as quoted by
#     glennklockwood.com/garden/processors/A100 and TechPowerUp's GA100 article).
#   RTX 3090 71: GA102 whitepaper, Appendix A, "Peak BF16 Tensor TFLOPS with FP32 Accumulate"
#     71 / 142 sparse (GeForce runs FP32-accumulate at half the FP16-accumulate 142).
# The H200 NVL, H100 NVL and H100 PCIe run at lower clocks and power: not in the table, so
# they get no datasheet MFU rather than a wrong one.
PEAK_BF16_TFLOPS = (
    ("H200 NVL", None),
    ("H100 NVL", None),
    ("H100 PCIe", None),
    ("H200", 989.4),
    ("H100", 989.4),
    ("A100", 312.0),
    ("RTX 3090", 71.0),
)


def datasheet_peak_tflops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float:
    """Measured bf16 n×n×n matmul rate on random data (zeros run faster on Hopper)."""
    a = torch.randn(n, n, device=device).to(torch.bfloat16)
    b = torch.randn(n, n, device=device).to(torch.bfloat16)
    for _ in range(3):
        a @ b
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / reps
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = (time.perf_counter() - t0) / reps
    return 2 * n**3 / seconds / 1e12


def versions() -> dict:
    import triton

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def run_info(device: str, dry_run: bool) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return dict(device=name, dry_run=dry_run, **versions(),
                commit=git("rev-parse", "HEAD") or "unknown",
                dirty=bool(git("status", "--porcelain")),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def write_json(path: Path, obj) -> None:
    """Atomic (fileio): a run killed mid-write leaves the previous complete file."""
    atomic_write(path, json.dumps(obj, indent=1, default=str))


def error_record(e: BaseException) -> dict:
    oom = isinstance(e, torch.cuda.OutOfMemoryError)
    return {"error": f"{type(e).__name__}: {e}"[:2000], "out_of_memory": oom,
            "traceback": traceback.format_exc()[-8000:]}
