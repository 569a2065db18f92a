"""Benchmark of kernels/lora.py against the strongest unfused baseline, mirroring
tests/test_kernels_lora.py.

Providers: `fused` (lora_linear, Triton), `addmm` (cuBLAS x Wᵀ, then the low-rank term added in
place by addmm_: unsloth's matmul_lora, `kernels.reference.lora_linear_addmm`, the path the
model falls back to), `torch` (the tests' reference, separate ops) and `peft`
(peft.tuners.lora.Linear). Modes: fwd, bwd (backward of a retained graph) and full (forward +
backward). x trains (its gradient is computed, as inside a network), W is frozen, A and B
train. Dropout 0 and 0.05 (TALLRec's): the fused, addmm and torch paths draw the same torch
mask (its cost is in every row), peft its own nn.Dropout.

Grid: the goal shapes first (LLaMA-7B, M = 4096 tokens, 4096→4096 and 4096→11008, r = 8 and
16, bf16), then M = 2048 and 8192 at r = 16 for the row threshold of `fused_is_faster`, then
fp16 at one shape. Every case is run once before timing (compilation, the GEMM-tile autotuner
of kernels/tuning.py, cuBLAS heuristics), so none of that lands in a timed region.

Reported per row: median and 20/80% quantiles (triton.testing.do_bench), TFLOP/s of the median,
peak memory above the inputs, and for fwd the error of y against an fp32 reference. Per case:
fused vs addmm on full (the 1.2× goal). Each case runs under its own exception handler (the
traceback goes into the JSON); CSV and JSON are rewritten after every case.

    python -m bench.bench_lora [--quick] [--out DIR] [--time-limit S] [--cpu-dry-run]

--cpu-dry-run: one tiny bf16 case on CPU through the Triton interpreter (TRITON_INTERPRET=1
needed), host-clock timings, so the script itself is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import error_record, run_info, write_json
from fileio import atomic_write
from kernels import tuning
from kernels.dispatch import INTERPRET
from kernels.lora import lora_linear
from kernels.reference import lora_linear_addmm, lora_linear_reference

MODES = ("fwd", "bwd", "full")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA_OVER_R = 2.0
# Short runs keep the grid near a minute on an H200; medians of a few dozen runs of
# millisecond kernels are stable enough to compare providers.
WARMUP_MS, REP_MS = 10, 25
FIELDS = ("dtype", "tokens", "in_features", "out_features", "rank", "dropout", "provider",
          "mode", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_mb", "fwd_rel_err_vs_fp32")


@dataclass(frozen=True)
class Case:
    dtype: str
    tokens: int
    k: int
    n: int
    r: int
    p: float

    def flops(self, mode: str) -> float:
        m, k, n, r = self.tokens, self.k, self.n, self.r
        fwd = 2 * m * (k * n + k * r + r * n)
        # dx = dy W + (s·dy B) A, dA = gᵀ x, dB = s·dyᵀ xa
        bwd = 2 * m * (n * k + n * r + r * k) + 2 * m * r * k + 2 * m * n * r
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def grid(quick: bool, dry_run: bool) -> list[Case]:
    if dry_run:
        return [Case("bf16", 48, 40, 72, 8, p) for p in (0.0, 0.05)]
    goal = [Case("bf16", 4096, k, n, r, p) for k, n in ((4096, 4096), (4096, 11008))
            for r in (8, 16) for p in (0.0, 0.05)]
    if quick:
        return goal
    rows = [Case("bf16", m, k, n, 16, p) for m in (2048, 8192)
            for k, n in ((4096, 4096), (4096, 11008)) for p in (0.0, 0.05)]
    return goal + rows + [Case("fp16", 4096, 4096, 4096, 16, p) for p in (0.0, 0.05)]


def make_peft_linear(weight, lora_a, lora_b, r, p):
    from peft import LoraConfig  # only here: peft is a benchmark baseline, not a dependency
    from peft.tuners.lora import Linear

    n, k = weight.shape
    base = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    kwargs = dict(r=r, lora_alpha=int(ALPHA_OVER_R * r), lora_dropout=p)
    if "config" in inspect.signature(Linear.__init__).parameters:  # peft >= 0.18
        kwargs["config"] = LoraConfig(r=r, lora_alpha=kwargs["lora_alpha"], lora_dropout=p)
    layer = Linear(base, "default", **kwargs).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    layer.base_layer.weight.requires_grad_(False)
    layer.train()
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def providers(case: Case, x, weight, lora_a, lora_b):
    """name -> (forward function of x, tensors whose .grad is reset between runs)."""
    s, p = ALPHA_OVER_R, case.p
    grads = [x, lora_a, lora_b]
    out = {
        "fused": (lambda x_: lora_linear(x_, weight, lora_a, lora_b, s, p), grads),
        "addmm": (lambda x_: lora_linear_addmm(x_, weight, lora_a, lora_b, s, p), grads),
        "torch": (lambda x_: lora_linear_reference(x_, weight, lora_a, lora_b, s, p), grads),
    }
    try:
        layer, params = make_peft_linear(weight, lora_a.detach(), lora_b.detach(), case.r, p)
        out["peft"] = (layer, [x, *params])
    except ImportError as e:
        print(f"bench_lora: peft unavailable ({e}); skipping it", file=sys.stderr)
    return out


def measure(fn, grads, device: str, quantiles=(0.5, 0.2, 0.8)):
    """(median, p20, p80) ms and peak MiB above what was allocated before (None on CPU)."""
    if device == "cpu":  # dry run: one run on a host clock (exercises the path, times nothing)
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return (ms, ms, ms), None
    import triton.testing

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    times = triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grads,
                                    quantiles=list(quantiles))
    return times, peak_mb


def bench_case(case: Case, device: str) -> list[dict]:
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std):
        return torch.randn(*shape, generator=gen, device=device) * std

    x32 = randn(case.tokens, case.k, std=1.0)
    w32 = randn(case.n, case.k, std=case.k**-0.5)
    a32, b32 = randn(case.r, case.k, std=case.k**-0.5), randn(case.n, case.r, std=case.r**-0.5)
    x = x32.to(dtype).requires_grad_()
    weight = w32.to(dtype)
    lora_a, lora_b = a32.to(dtype).requires_grad_(), b32.to(dtype).requires_grad_()
    dy = randn(case.tokens, case.n, std=1.0).to(dtype)
    with torch.no_grad():
        y32 = lora_linear_reference(x.float(), weight.float(), lora_a.float(), lora_b.float(),
                                    ALPHA_OVER_R)
    rows = []
    for name, (forward, grads) in providers(case, x, weight, lora_a, lora_b).items():
        forward(x).backward(dy)  # warm: compile, autotune, cuBLAS heuristics; not timed
        if case.p == 0.0:
            with torch.no_grad():
                err = ((forward(x).float() - y32).abs().max() / y32.abs().max()).item()
        y = forward(x)
        fns = {
            "fwd": lambda f=forward: f(x),
            "bwd": lambda y=y: y.backward(dy, retain_graph=True),
            "full": lambda f=forward: f(x).backward(dy),
        }
        for mode, fn in fns.items():
            (med, p20, p80), peak_mb = measure(fn, grads, device)
            rows.append(dict(
                dtype=case.dtype, tokens=case.tokens, in_features=case.k, out_features=case.n,
                rank=case.r, dropout=case.p, provider=name, mode=mode, median_ms=round(med, 4),
                p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                tflops=round(case.flops(mode) / (med * 1e-3) / 1e12, 3),
                peak_mem_mb=None if peak_mb is None else round(peak_mb, 1),
                fwd_rel_err_vs_fp32=f"{err:.2e}" if mode == "fwd" and case.p == 0.0 else ""))
        del y, fns
    return rows


def write_csv(path: Path, rows: list[dict]):
    def write(tmp: Path):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the goal shapes only")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for bench_lora.csv and bench_lora.json")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds; cases not started by then are recorded as skipped")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="one tiny case on CPU through the Triton interpreter")
    args = parser.parse_args(argv)
    t_start = time.monotonic()
    device = "cpu" if args.cpu_dry_run else "cuda"
    if args.cpu_dry_run and not INTERPRET:
        print("bench_lora: --cpu-dry-run needs TRITON_INTERPRET=1 in the environment",
              file=sys.stderr)
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_lora: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing measured (or --cpu-dry-run)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    info, cases = run_info(device, args.cpu_dry_run), grid(args.quick, args.cpu_dry_run)
    result = dict(info, warmup_ms=WARMUP_MS, rep_ms=REP_MS, rows=[], cases=[])
    print(f"bench_lora: {len(cases)} cases on {info['device']} (commit {info['commit'][:10]})")
    failed = False
    for case in cases:
        entry = asdict(case)
        if args.time_limit is not None and time.monotonic() - t_start > args.time_limit:
            entry["skipped"] = f"time limit {args.time_limit:.0f} s reached"
        else:
            try:
                case_rows = bench_case(case, device)
                result["rows"] += case_rows
                full = {r["provider"]: r["median_ms"] for r in case_rows if r["mode"] == "full"}
                entry["full_ms"] = full
                entry["fused_speedup_vs_addmm"] = round(full["addmm"] / full["fused"], 3)
                print(f"{entry}", flush=True)
            except Exception as e:  # noqa: BLE001 -- recorded with its traceback, then go on
                entry.update(error_record(e))
                failed = True
                print(f"{asdict(case)}: FAILED {entry['error']}\n{entry['traceback']}", flush=True)
        result["cases"].append(entry)
        result["tuned_gemm_configs"] = tuning.tuned_configs()
        write_csv(args.out / "bench_lora.csv", result["rows"])
        write_json(args.out / "bench_lora.json", result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
