"""bench/gpu_check.sh --cpu-dry-run: every script the GPU check runs, with tiny shapes on the
CPU (Triton through its interpreter), so a crash in a benchmark fails here and not on the
device, where it would cost the device time and the results of every later phase."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PY=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "bench/gpu_check.sh"), "--cpu-dry-run", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    with tarfile.open(out / "gpu_check.tgz") as tar:
        files = {m.name.removeprefix("./"): tar.extractfile(m).read().decode()
                 for m in tar.getmembers() if m.isfile()}
    return proc, json.loads((out / "summary.json").read_text()), files


def test_dry_run_exits_0_with_every_step(dry_run):
    proc, summary, files = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert summary["dry_run"] is True
    assert set(summary["steps"]) == {"kernel_tests", "bench_lora", "bench_train_7b",
                                     "quant_tests", "bench_quant"}
    assert all(s["exit_code"] == 0 for s in summary["steps"].values()), summary
    # One archive beside summary.json: the device tool returns at most 8 files.
    assert set(os.listdir(Path(proc.args[-1]))) == {"summary.json", "gpu_check.tgz"}
    env = files["env.txt"]
    for name in ("torch", "triton", "transformers", "peft", "python"):
        assert f"\n{name} " in env, env


def test_dry_run_writes_the_gpu_json_with_every_phase_measured(dry_run):
    _, _, files = dry_run
    train = json.loads(files["bench_train_7b/bench_train_7b.json"])
    assert train["dry_run"] is True
    assert set(train["phases"]) == {"ours_kernel", "ours_torch", "hf_peft"}
    for name, phase in train["phases"].items():
        assert "error" not in phase and "skipped" not in phase, (name, phase)
        assert phase["tokens_per_s"] > 0 and phase["mfu_vs_cublas"] > 0
        assert phase["mfu"] is None  # no datasheet peak for a CPU
    assert train["phases"]["ours_kernel"]["plan"]["lora_impl"] == "triton"
    assert train["phases"]["ours_torch"]["plan"]["lora_impl"] == "torch"

    lora = json.loads(files["bench_lora.json"])
    assert lora["dry_run"] is True and lora["cases"]
    assert all("error" not in c and c["fused_speedup_vs_addmm"] > 0 for c in lora["cases"])
    providers = {r["provider"] for r in lora["rows"]}
    assert {"fused", "addmm", "torch"} <= providers
    assert {r["dropout"] for r in lora["rows"]} == {0.0, 0.05}
    assert lora["tuned_gemm_configs"], "the autotuner's timing path did not run"
    assert files["bench_lora.csv"].count("\n") == len(lora["rows"]) + 1


def test_failed_train_phase_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    from bench import bench_train_7b as bt

    real = bt.build_ours

    def broken(cfg, lora, device):  # as a first compile on a new Triton might fail
        if lora.kernel == "force":
            raise RuntimeError("simulated Triton compile error")
        return real(cfg, lora, device)

    monkeypatch.setattr(bt, "build_ours", broken)
    rc = bt.main([str(tmp_path), "--cpu-dry-run", "--phases", "ours_kernel,ours_torch"])
    assert rc == 1
    phases = json.loads((tmp_path / "bench_train_7b.json").read_text())["phases"]
    assert "simulated Triton compile error" in phases["ours_kernel"]["error"]
    assert "RuntimeError" in phases["ours_kernel"]["traceback"]
    assert phases["ours_torch"]["tokens_per_s"] > 0 and "error" not in phases["ours_torch"]


def test_failed_kernel_case_is_recorded_and_the_next_still_runs(tmp_path, monkeypatch):
    from bench import bench_lora as bl

    def fake(case, device):  # first case fails; the second returns rows without measuring
        if case.p == 0.0:
            raise RuntimeError("simulated launch failure")
        return [dict(provider=p, mode="full", median_ms=ms) for p, ms in (("fused", 1.0),
                                                                           ("addmm", 1.5))]

    monkeypatch.setattr(bl, "bench_case", fake)
    monkeypatch.setattr(bl, "FIELDS", ("provider", "mode", "median_ms"))
    assert bl.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 1
    cases = json.loads((tmp_path / "bench_lora.json").read_text())["cases"]
    assert "simulated launch failure" in cases[0]["error"] and cases[0]["traceback"]
    assert cases[1]["fused_speedup_vs_addmm"] == 1.5


def test_datasheet_peak_by_device_name():
    from bench.common import datasheet_peak_tflops

    # torch.cuda.get_device_name() as these cards report themselves.
    assert datasheet_peak_tflops("NVIDIA H200") == 989.4
    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert datasheet_peak_tflops("NVIDIA GeForce RTX 3090") == 71.0
    # Lower-clocked variants and unknown cards get no datasheet MFU rather than a wrong one.
    for name in ("NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA L4", "cpu"):
        assert datasheet_peak_tflops(name) is None


def test_dry_run_runs_the_quant_kernel_benchmark(dry_run):
    _, _, files = dry_run
    quant = json.loads(files["bench_quant.json"])
    assert quant["dry_run"] is True
    assert {r["provider"] for r in quant["rows"]} == {"dense", "torch", "kernel"}
    assert {r["format"] for r in quant["rows"]} == {"int8", "nf4", "q4_1"}
    assert "passed" in files["quant_tests.log"] and "failed" not in files["quant_tests.log"]
