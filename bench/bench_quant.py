"""Benchmark of the quantized-weight matmul, mirroring tests/test_kernels_quant.py.

Providers (y = x Wᵀ, W frozen, x trains so backward computes dx = dy W):
- `kernel`  kernels/quant_matmul.py: tiles of W dequantized inside the GEMM loop (CUDA);
- `torch`   kernels/quant_reference.quant_linear_reference: W dequantized per call in torch,
            forward and backward (the CPU path; on CUDA what --no-use-kernels runs);
- `dense`   F.linear with W already dense in the compute dtype: the cost being compared with.
Modes fwd, bwd (backward of a retained graph), full. Reported: median and 20/80% quantiles, the
ratio to `dense`, peak memory above the inputs (CUDA), and the forward error against
dequantize-then-matmul in fp32. Written to OUT/bench_quant.csv (row by row) and .json with
device, versions, commit and date.

    python -m bench.bench_quant [--quick] [--out DIR]     # CUDA: LLaMA-7B shapes
    python -m bench.bench_quant --cpu [--out DIR]         # CPU: SmolLM2 shapes, bf16, torch path
    python -m bench.bench_quant --cpu-dry-run [--out DIR] # gpu_check.sh's dry run: tiny shapes,
                                                          # the kernel under TRITON_INTERPRET=1

On CPU the providers are timed interleaved, one call of each per round, so other jobs on the
machine disturb both sides alike: read the ratios, not the absolute times.
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.quant_reference import dequantize, quant_linear_reference
from tests.test_kernels_quant import make_qweight

FIELDS = ("device", "dtype", "tokens", "in_features", "out_features", "format", "provider",
          "mode", "median_ms", "p20_ms", "p80_ms", "ratio_to_dense", "peak_mem_mb",
          "fwd_rel_err")
GPU_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in K, out N), LLaMA-7B
CPU_SHAPES = ((576, 576), (576, 1536), (1536, 576))  # SmolLM2-135M
FORMATS = ("int8", "nf4", "nf4-dq", "q8_0", "q4_0", "q4_1")


def providers(x, qw, w_dense, device, kernel: bool):
    out = {"dense": lambda x_: F.linear(x_, w_dense),
           "torch": lambda x_: quant_linear_reference(x_, qw)}
    if kernel:
        from kernels.quant_matmul import quant_matmul

        out["kernel"] = lambda x_: quant_matmul(x_, qw)
    return out


def run_info(device: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    info = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                torch=torch.__version__, commit=commit,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if device == "cuda":
        import triton

        info["triton"] = triton.__version__
    else:
        info.update(threads=torch.get_num_threads(),
                    note="other jobs were running on the machine; interleaved rounds")
    return info


def cuda_measure(fn, grads):
    """(median, p20, p80) ms from triton.testing.do_bench and the peak memory above the inputs."""
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    times = triton.testing.do_bench(fn, warmup=10, rep=25, grad_to_none=grads,
                                    quantiles=[0.5, 0.2, 0.8])
    return times, peak


def cpu_times(fns: dict, rounds: int) -> dict:
    """Interleaved: each round calls every function once, so load drifts hit all alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.quantiles(v, n=10) if len(v) > 1 else v * 9 for k, v in times.items()}


def bench_shape(device, dtype, tokens, k, n, fmt, rounds, kernel) -> list[dict]:
    qw = make_qweight(fmt, n, k, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, k, generator=gen, device=device).to(dtype).requires_grad_()
    dy = torch.randn(tokens, n, generator=gen, device=device).to(dtype)
    w_dense = dequantize(qw, dtype)
    with torch.no_grad():
        y32 = F.linear(x.float(), dequantize(qw, torch.float32))
    fns, errs = {}, {}
    for name, f in providers(x, qw, w_dense, device, kernel).items():
        with torch.no_grad():
            errs[name] = ((f(x).float() - y32).abs().max() / y32.abs().max()).item()
        y = f(x)

        def full(f=f):
            x.grad = None
            f(x).backward(dy)

        fns[(name, "fwd")] = lambda f=f: f(x.detach())
        fns[(name, "bwd")] = lambda y=y: y.backward(dy, retain_graph=True)
        fns[(name, "full")] = full
    rows = []
    if device == "cuda":
        stats = {}
        for key, fn in fns.items():
            (med, p20, p80), peak = cuda_measure(fn, [x])
            stats[key] = (med, p20, p80, peak)
    else:
        q = cpu_times(fns, rounds)
        stats = {key: (q[key][4], q[key][1], q[key][7], float("nan")) for key in fns}
    for (name, mode), (med, p20, p80, peak) in stats.items():
        rows.append(dict(device=device, dtype=str(dtype).removeprefix("torch."), tokens=tokens,
                         in_features=k, out_features=n, format=fmt, provider=name, mode=mode,
                         median_ms=round(med, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                         ratio_to_dense=round(med / stats[("dense", mode)][0], 2),
                         peak_mem_mb=round(peak, 1),
                         fwd_rel_err=f"{errs[name]:.2e}" if mode == "fwd" else ""))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU, SmolLM2 shapes, torch path only")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and formats")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="tiny shapes on CPU, the kernel through TRITON_INTERPRET=1 (which must "
                         "be set): checks the script runs, measures nothing worth reading")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=20, help="CPU: interleaved rounds")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    if dry:
        args.cpu, args.quick, args.rounds = True, True, 2
    if not args.cpu and not torch.cuda.is_available():
        print("bench_quant: no CUDA GPU (torch.cuda.is_available() is False); nothing "
              "measured (--cpu measures the torch path on this machine)")
        return 0
    device = "cpu" if args.cpu else "cuda"
    info = dict(run_info(device), dry_run=dry)
    shapes = ((64, 72),) if dry else CPU_SHAPES if args.cpu else GPU_SHAPES
    tokens = args.tokens or (40 if dry else 8 * 224 if args.cpu else 4096)
    formats = ("int8", "nf4", "q4_1") if args.quick else FORMATS
    shapes = shapes[:2] if args.quick else shapes
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(args.out / "bench_quant.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for k, n in shapes:
            for fmt in formats:
                case = bench_shape(device, torch.bfloat16, tokens, k, n, fmt, args.rounds,
                                   kernel=device == "cuda" or dry)
                writer.writerows(case)
                f.flush()
                rows += case
                full = {r["provider"]: r["ratio_to_dense"] for r in case if r["mode"] == "full"}
                print(f"{k}->{n} {fmt}: fwd+bwd time / dense {full}", flush=True)
    (args.out / "bench_quant.json").write_text(json.dumps(dict(info, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
