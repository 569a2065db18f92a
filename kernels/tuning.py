"""Block sizes for the fused LoRA kernels, and a small cached autotuner for the GEMM tiles.

Why a hand-rolled tuner and not @triton.autotune: the interpreter rejects @triton.autotune with
more than one config unless given a CPU do_bench, and the decorator would hide the JITFunction
that tests/test_kernels_lora.py compiles ahead of time for sm_90. Here the launcher times each
candidate once per key (kernel, dtype, M rounded up to a power of two, N, K, mask, rank block)
in the process, keeps the fastest in `_CACHE`, and launches with it. Benchmarks warm the cache
before they time (bench/bench_lora.py runs every case once first), so tuning never lands in a
timed region. Every candidate writes the whole output from the same inputs, so timing one
(which runs it) leaves the result unchanged.

Under the interpreter the candidates are CPU-sized (few, large tiles: it pays per program and
per op) and there is one unless TALLREC_TUNE_INTERPRETER=1, which the CPU dry run of the GPU
check sets so that the timing-and-cache path runs on CPU too (timed with a host clock).
TALLREC_AUTOTUNE=0 launches the first candidate (the previous fixed config) without timing.
"""

from __future__ import annotations

import os
import time

import torch
import triton

from kernels.dispatch import INTERPRET

# Hopper, 16-bit: the fixed config used before (first: the default), the two 128×256 shapes
# Triton's tutorial 03 lists first for large bf16 GEMMs, and a 4-warp, 4-stage variant. Shared
# memory per stage ≤ (128·64 + 64·256)·2 B = 48 KB, three stages 144 KB of the H200's 228 KB.
GEMM_16BIT = (
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
)
_CACHE: dict[tuple, dict] = {}
FORCE: dict | None = None  # a test pins one GEMM config here (every candidate is tested)


def _flag(name: str, default: str) -> bool:
    return os.environ.get(name, default).lower() in ("1", "true", "on", "yes")


def _fit(v: int, hi: int) -> int:
    return min(hi, max(16, triton.next_power_of_2(v)))


def gemm_candidates(dtype: torch.dtype, m: int, n: int, k: int) -> list[dict]:
    """GEMM tile configs worth timing for an (M, K) × (K, N) product; the first is the default."""
    if INTERPRET:
        big = dict(BLOCK_M=_fit(m, 64), BLOCK_N=_fit(n, 128), BLOCK_K=_fit(k, 128))
        if not _flag("TALLREC_TUNE_INTERPRETER", "0"):
            return [big]
        return [big, dict(BLOCK_M=_fit(m, 32), BLOCK_N=_fit(n, 64), BLOCK_K=_fit(k, 64))]
    if dtype in (torch.float16, torch.bfloat16):
        if m <= 64:  # a few rows: weight-bandwidth-bound, one short tile
            return [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)]
        return [dict(c) for c in GEMM_16BIT]
    if dtype == torch.float32:  # IEEE fp32 runs on CUDA cores: smaller tiles
        return [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2)]
    return [dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)]


def down_config(dtype: torch.dtype, m: int, k: int) -> dict:
    """The memory-bound (M, K) × (K, r) pass: not tuned (one read of x, no reuse to win)."""
    if INTERPRET:
        return dict(BLOCK_M=_fit(m, 64), BLOCK_K=_fit(k, 128))
    if dtype in (torch.float16, torch.bfloat16):
        return dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=3)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_K=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_K=32, num_warps=4, num_stages=2)


def _launch_config(dtype: torch.dtype, m: int, n: int, k: int) -> tuple[dict, dict]:
    """(default GEMM config, down config): what runs without tuning; the AOT test compiles it."""
    return gemm_candidates(dtype, m, n, k)[0], down_config(dtype, m, k)


def flags(dtype: torch.dtype) -> dict:
    return dict(UPCAST=INTERPRET and dtype in (torch.float16, torch.bfloat16),
                IEEE=dtype in (torch.float32, torch.float64), ACC_FP64=dtype == torch.float64,
                ROUND_BF16=INTERPRET and dtype == torch.bfloat16)


def _time_ms(fn) -> float:
    if INTERPRET:  # host clock: the interpreter runs synchronously on the CPU
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    fn()  # compile outside the estimate do_bench makes from its first call
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def tuned_gemm(key: tuple, candidates: list[dict], launch) -> dict:
    """The fastest of `candidates` for `key` (timed once per process), launched by the caller.
    launch(cfg) runs the kernel once with cfg."""
    if FORCE is not None:
        return FORCE
    if len(candidates) == 1 or not _flag("TALLREC_AUTOTUNE", "1"):
        return candidates[0]
    cfg = _CACHE.get(key)
    if cfg is None:
        times = []
        for c in candidates[1:]:
            try:  # a candidate that cannot compile or launch here (shared memory) just loses
                times.append(_time_ms(lambda c=c: launch(c)))
            except Exception:  # noqa: BLE001 -- the default below still raises its own error
                times.append(float("inf"))
        # The default is timed last and without a guard: if it fails, the caller sees why.
        times.insert(0, _time_ms(lambda: launch(candidates[0])))
        cfg = _CACHE[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return cfg


def tuned_configs() -> dict[str, dict]:
    """The cache as text keys, for benchmark reports."""
    return {"/".join(map(str, key)): cfg for key, cfg in _CACHE.items()}
