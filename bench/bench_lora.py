"""Benchmark of kernels/lora.py, mirroring tests/test_kernels_lora.py.

Providers: `fused` (lora_linear, Triton), `torch` (lora_linear_reference: x Wᵀ + s·(x Aᵀ) Bᵀ in
plain torch, the tests' baseline) and `peft` (peft.tuners.lora.Linear wrapping an nn.Linear).
Modes: fwd, bwd (backward of a retained graph) and full (forward + backward). x trains (its
gradient is computed, as inside a network), W is frozen, A and B train; dropout is off.
LLaMA-7B shapes: tokens 2048..16384, 4096→4096, 4096→11008, 11008→4096, r = 8, 16, 64, in bf16
and fp16, adapters in the same dtype as x for every provider.

Reported per row: median and 20/80% quantiles (triton.testing.do_bench), TFLOP/s of the median,
peak memory above the inputs (torch.cuda.max_memory_allocated), and for fwd the error of y
against an fp32 reference (max|y - y32| / max|y32|). Written to OUT/bench_lora.csv (row by row,
so a timeout keeps what was measured) and OUT/bench_lora.json, with device, versions, commit, date.

    python -m bench.bench_lora [--quick] [--out DIR]

Without a GPU it says so and exits 0.
"""

import argparse
import csv
import datetime
import inspect
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels.lora import lora_linear, lora_linear_reference

PROVIDERS = ("fused", "torch", "peft")
MODES = ("fwd", "bwd", "full")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOKENS = (2048, 4096, 8192, 16384)
SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (in K, out N)
RANKS = (8, 16, 64)
ALPHA_OVER_R = 2.0
# Short runs keep the full grid (648 timings) near two minutes on an H200; medians of a few
# dozen runs of millisecond kernels are stable enough to compare providers.
WARMUP_MS, REP_MS = 10, 25
FIELDS = ("dtype", "tokens", "in_features", "out_features", "rank", "provider", "mode",
          "median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_mb", "fwd_rel_err_vs_fp32")


@dataclass(frozen=True)
class Case:
    dtype: str
    tokens: int
    k: int
    n: int
    r: int

    def flops(self, mode: str) -> float:
        m, k, n, r = self.tokens, self.k, self.n, self.r
        fwd = 2 * m * (k * n + k * r + r * n)
        # dx = dy W + (s·dy B) A, dA = gᵀ x, dB = s·dyᵀ xa
        bwd = 2 * m * (n * k + n * r + r * k) + 2 * m * r * k + 2 * m * n * r
        return {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode]


def grid(quick: bool) -> list[Case]:
    if quick:
        return [Case("bf16", 4096, k, n, 16) for k, n in SHAPES[:2]]
    return [Case(d, m, k, n, r) for d in DTYPES for m in TOKENS for k, n in SHAPES for r in RANKS]


def make_peft_linear(weight, lora_a, lora_b, r):
    from peft import LoraConfig  # only here: peft is a benchmark baseline, not a dependency
    from peft.tuners.lora import Linear

    n, k = weight.shape
    base = torch.nn.Linear(k, n, bias=False, device=weight.device, dtype=weight.dtype)
    kwargs = dict(r=r, lora_alpha=int(ALPHA_OVER_R * r))
    if "config" in inspect.signature(Linear.__init__).parameters:  # peft >= 0.18
        kwargs["config"] = LoraConfig(r=r, lora_alpha=kwargs["lora_alpha"], lora_dropout=0.0)
    layer = Linear(base, "default", **kwargs).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.lora_A["default"].weight.copy_(lora_a)
        layer.lora_B["default"].weight.copy_(lora_b)
    layer.base_layer.weight.requires_grad_(False)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return layer, params


def providers(case: Case, x, weight, lora_a, lora_b):
    """name -> (forward function of x, tensors whose .grad do_bench resets)."""
    s = ALPHA_OVER_R
    out = {
        "fused": (lambda x_: lora_linear(x_, weight, lora_a, lora_b, s), [x, lora_a, lora_b]),
        "torch": (lambda x_: lora_linear_reference(x_, weight, lora_a, lora_b, s),
                  [x, lora_a, lora_b]),
    }
    try:
        layer, params = make_peft_linear(weight, lora_a.detach(), lora_b.detach(), case.r)
        out["peft"] = (layer, [x, *params])
    except ImportError as e:
        print(f"bench_lora: peft unavailable ({e}); skipping it", file=sys.stderr)
    return out


def measure(fn, grads, quantiles=(0.5, 0.2, 0.8)):
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
    randn = lambda *shape, std: (torch.randn(*shape, generator=gen, device=device) * std)
    x32 = randn(case.tokens, case.k, std=1.0)
    w32 = randn(case.n, case.k, std=case.k**-0.5)
    a32, b32 = randn(case.r, case.k, std=case.k**-0.5), randn(case.n, case.r, std=case.r**-0.5)
    x = x32.to(dtype).requires_grad_()
    weight = w32.to(dtype)
    lora_a, lora_b = a32.to(dtype).requires_grad_(), b32.to(dtype).requires_grad_()
    dy = torch.randn(case.tokens, case.n, generator=gen, device=device).to(dtype)
    with torch.no_grad():
        y32 = lora_linear_reference(x.float(), weight.float(), lora_a.float(), lora_b.float(),
                                    ALPHA_OVER_R)
    rows = []
    for name, (forward, grads) in providers(case, x, weight, lora_a, lora_b).items():
        with torch.no_grad():
            err = ((forward(x).float() - y32).abs().max() / y32.abs().max()).item()
        y = forward(x)
        fns = {
            "fwd": lambda f=forward: f(x),
            "bwd": lambda y=y: y.backward(dy, retain_graph=True),
            "full": lambda f=forward: f(x).backward(dy),
        }
        for mode, fn in fns.items():
            (med, p20, p80), peak_mb = measure(fn, grads)
            rows.append(dict(
                dtype=case.dtype, tokens=case.tokens, in_features=case.k, out_features=case.n,
                rank=case.r, provider=name, mode=mode, median_ms=round(med, 4),
                p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                tflops=round(case.flops(mode) / (med * 1e-3) / 1e12, 1),
                peak_mem_mb=round(peak_mb, 1),
                fwd_rel_err_vs_fp32=f"{err:.2e}" if mode == "fwd" else ""))
        del y, fns
    return rows


def run_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import triton

    return dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        commit=git("rev-parse", "HEAD") or "unknown", dirty=bool(git("status", "--porcelain")),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        warmup_ms=WARMUP_MS, rep_ms=REP_MS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two bf16 shapes at 4096 tokens")
    parser.add_argument("--out", type=Path, default=Path("bench/results"),
                        help="folder for bench_lora.csv and bench_lora.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_lora: needs a CUDA GPU (torch.cuda.is_available() is False); "
              "nothing measured")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    info, cases, rows = run_info(), grid(args.quick), []
    print(f"bench_lora: {len(cases)} cases on {info['device']} (commit {info['commit'][:10]})")
    with open(args.out / "bench_lora.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for case in cases:
            case_rows = bench_case(case, "cuda")
            writer.writerows(case_rows)
            f.flush()
            rows += case_rows
            full = {r["provider"]: r["median_ms"] for r in case_rows if r["mode"] == "full"}
            print(f"{asdict(case)} full fwd+bwd ms: {full}", flush=True)
    (args.out / "bench_lora.json").write_text(json.dumps(dict(info, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
