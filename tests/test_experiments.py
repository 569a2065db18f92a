"""The experiment grid on the tiny model and the synthetic toy domain: end to end, cache,
resume after SIGKILL, cache conflicts, failures, aggregation by hand, errors, plots."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.experiments import (
    CacheConflict,
    aggregate,
    collect,
    grid_from_preset,
    plan_runs,
    run_grid,
    write_summary,
)
from engine.experiments import runner as runner_mod
from engine.experiments.__main__ import main as cli_main
from tests.references import pairwise_auc

ROOT = Path(__file__).resolve().parent.parent


# The tiny model's matmuls are too small for two threads; on a shared 2-core machine two
# threads contending with another process made the grid 5x slower.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out, data_root, **over):
    return grid_from_preset("tiny", out=str(out), data_root=str(data_root), **over)


def results(out) -> dict:
    return {p.parent.name: json.loads(p.read_text())
            for p in Path(out).glob("runs/*/result.json")}


@pytest.fixture(scope="module")
def grid_out(tmp_path_factory, data_root):
    """The whole tiny preset (2 K values x 2 seeds x 4 variants), run once for the module."""
    out = tmp_path_factory.mktemp("grid")
    counts = run_grid(tiny(out, data_root), progress=False)
    write_summary(out, planned=len(plan_runs(tiny(out, data_root))))
    return out, counts


class Counter:
    def __init__(self, monkeypatch, fail_if=None):
        self.train, self.evals = [], []
        real_train, real_eval = runner_mod.train, runner_mod.execute_eval

        def train(cfg, progress=True):
            self.train.append(cfg)
            if fail_if is not None and fail_if(cfg):
                raise RuntimeError(f"injected failure at K={cfg.shots}")
            return real_train(cfg, progress)

        def execute_eval(grid, run, adapter):
            self.evals.append(run.name)
            return real_eval(grid, run, adapter)

        monkeypatch.setattr(runner_mod, "train", train)
        monkeypatch.setattr(runner_mod, "execute_eval", execute_eval)


def test_tiny_grid_end_to_end(grid_out, data_root):
    out, counts = grid_out
    res = results(out)
    # 1 zero-shot eval + per seed: IT train + eval, and (RT, IT+RT) x 2 K: train + eval
    assert len(res) == 1 + 2 * (2 + 2 * 2 * 2) == 21
    assert counts["ran"] == 21 and counts["failed"] == 0
    assert all(r["status"] == "ok" for r in res.values())
    # IT+RT really starts from the IT adapter of its seed; RT from the base
    for seed in (0, 1):
        itrt = json.loads((out / f"runs/itrt-toy-k8-s{seed}/train/config.json").read_text())
        assert itrt["init_adapter"] == res[f"it-s{seed}"]["adapter"]
        rt = json.loads((out / f"runs/rt-toy-k8-s{seed}/train/config.json").read_text())
        assert rt["init_adapter"] is None and rt["shots"] == 8 and rt["seed"] == seed
    ev = res["eval-rt-toy-k16-s1-on-toy"]
    assert ev["n"] == 32 == len(ev["probs"]) and ev["synthetic_data"] is True
    assert ev["auc"] == pytest.approx(pairwise_auc(ev["labels"], ev["probs"]), abs=1e-6)
    summary = (out / "summary.md").read_text()
    assert "SYNTHETIC toy data" in summary and "21 of 21 runs finished" in summary


def test_second_invocation_runs_nothing(grid_out, data_root, monkeypatch):
    out, _ = grid_out
    before = {n: r["seconds"] for n, r in results(out).items()}
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")}
    calls = Counter(monkeypatch)
    counts = run_grid(tiny(out, data_root), progress=False)
    assert calls.train == [] and calls.evals == []
    assert counts["ran"] == 0 and counts["cached"] == 21
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/result.json")} == stamps
    assert {n: r["seconds"] for n, r in results(out).items()} == before


def test_cache_entry_of_other_settings_is_an_error(grid_out, data_root, monkeypatch):
    out, _ = grid_out
    calls = Counter(monkeypatch)
    with pytest.raises(CacheConflict, match=r"config\.lr: 0\.003 -> 0\.001"):
        run_grid(tiny(out, data_root, rt={"lr": 1e-3}), progress=False)
    assert calls.train == []  # refused before any work
    # the CLI says so too, with its own exit code
    assert cli_main(["--preset", "tiny", "--out", str(out), "--data-root", str(data_root),
                     "--rt", "lr=0.001", "--no-progress"]) == 2


def test_resume_after_sigkill_matches_uninterrupted(grid_out, data_root, tmp_path):
    out_full, _ = grid_out
    out = tmp_path / "cut"
    args = ["--preset", "tiny", "--out", str(out), "--data-root", str(data_root),
            "--variants", "rt", "--shots", "16", "--seeds", "0", "--rt", "save_every=1",
            "--no-progress"]
    # dies right after the first step's checkpoint
    env = {**os.environ, "TALLREC_KILL_AT": "step-1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine.experiments", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = out / "runs" / "rt-toy-k16-s0"
    assert (run / "train" / "last").is_dir() and not (run / "result.json").exists()
    assert cli_main(args) == 0
    log = (run / "log.txt").read_text()
    assert "resumed from" in log and "at step 1" in log
    res = results(out)
    assert res["rt-toy-k16-s0"]["steps"] == 2 and res["rt-toy-k16-s0"]["status"] == "ok"
    # the same scores as the uninterrupted grid's run (whose only difference, save_every,
    # does not change the computation)
    full = results(out_full)["eval-rt-toy-k16-s0-on-toy"]
    assert res["eval-rt-toy-k16-s0-on-toy"]["probs"] == full["probs"]


def test_sigterm_stops_the_grid_with_a_checkpoint_and_the_same_command_resumes(
        grid_out, data_root, tmp_path):
    out_full, _ = grid_out
    out = tmp_path / "cut"
    args = ["--preset", "tiny", "--out", str(out), "--data-root", str(data_root),
            "--variants", "rt", "--shots", "16", "--seeds", "0", "--no-progress"]
    # step 1 of 2 is no save point (the tiny preset saves at its evaluations, every 100)
    env = {**os.environ, "TALLREC_TERM_AT": "step-1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine.experiments", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "grid stopped: stopped by SIGTERM at step 1 of 2" in proc.stderr
    run = out / "runs" / "rt-toy-k16-s0"
    # neither failed nor done: the next invocation resumes it from the stop's checkpoint
    assert (run / "train" / "last").is_dir() and not (run / "result.json").exists()
    assert cli_main(args) == 0
    log = (run / "log.txt").read_text()
    assert "SIGTERM: stopping after this step" in log
    assert "resumed from" in log and "at step 1" in log
    res = results(out)
    assert res["rt-toy-k16-s0"]["steps"] == 2 and res["rt-toy-k16-s0"]["status"] == "ok"
    full = results(out_full)["eval-rt-toy-k16-s0-on-toy"]
    assert res["eval-rt-toy-k16-s0-on-toy"]["probs"] == full["probs"]


def test_failed_run_is_recorded_and_the_grid_goes_on(data_root, tmp_path, monkeypatch):
    out = tmp_path / "fail"
    grid = tiny(out, data_root, variants=["rt"], seeds=[0])
    calls = Counter(monkeypatch, fail_if=lambda cfg: cfg.shots == 8)
    counts = run_grid(grid, progress=False)
    res = results(out)
    assert counts["failed"] == 2 and counts["ran"] == 2
    assert res["rt-toy-k8-s0"]["status"] == "failed"
    assert "injected failure at K=8" in res["rt-toy-k8-s0"]["error"]
    assert "Traceback" in (out / "runs/rt-toy-k8-s0/log.txt").read_text()
    assert res["eval-rt-toy-k8-s0-on-toy"]["status"] == "failed"  # needs the failed run
    assert "needs rt-toy-k8-s0" in res["eval-rt-toy-k8-s0-on-toy"]["error"]
    assert res["rt-toy-k16-s0"]["status"] == res["eval-rt-toy-k16-s0-on-toy"]["status"] == "ok"
    assert [c.shots for c in calls.train] == [8, 16]
    summary = write_summary(out, planned=4).read_text()
    assert "PARTIAL - 2 of 4 runs finished, 2 failed" in summary
    # the next invocation retries only the failed runs
    monkeypatch.undo()
    calls = Counter(monkeypatch)
    counts = run_grid(grid, progress=False)
    assert [c.shots for c in calls.train] == [8] and counts["ran"] == 2
    assert all(r["status"] == "ok" for r in results(out).values())


def test_threads_apply_to_a_single_worker(data_root, tmp_path, monkeypatch):
    """--threads 1 --workers 1 runs on one thread (it was ignored without --workers > 1), and
    the caller's thread count is back afterwards."""
    import torch

    seen = []
    monkeypatch.setattr(runner_mod, "work", lambda *a, **k: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    run_grid(tiny(tmp_path, data_root, seeds=[0]), progress=False, workers=1, threads=1)
    assert seen == [1] and torch.get_num_threads() == 2
    run_grid(tiny(tmp_path, data_root, seeds=[0]), progress=False, workers=1)
    assert seen == [1, 2]


def test_two_workers_give_the_results_of_one(grid_out, data_root, tmp_path):
    # seed 0 of the tiny grid in 2 worker processes x 1 thread; the module's grid ran the
    # same runs (same names and hashes) in this process, one at a time, on 1 thread
    out_one, _ = grid_out
    out = tmp_path / "w2"
    counts = run_grid(tiny(out, data_root, seeds=[0]), progress=False, workers=2, threads=1)
    one, two = results(out_one), results(out)
    assert counts["ran"] == len(two) == 11 and counts["failed"] == 0
    assert len({r["pid"] for r in two.values()}) == 2  # both workers took runs
    for name, r in two.items():
        assert r["status"] == "ok" and r["hash"] == one[name]["hash"], name
        if r["kind"] == "eval":
            assert r["probs"] == one[name]["probs"] and r["auc"] == one[name]["auc"], name
    for name in ("rt-toy-k16-s0", "itrt-toy-k8-s0"):
        a = (out_one / "runs" / name / "train" / "last" / "adapter_model.safetensors")
        b = (out / "runs" / name / "train" / "last" / "adapter_model.safetensors")
        assert a.read_bytes() == b.read_bytes(), name


def test_a_stopped_grid_passes_the_stop_on_to_its_workers(data_root, tmp_path, monkeypatch):
    # w0 (this process) is stopped at once; unless the stop reaches it as SIGTERM, the spawned
    # worker goes on through the whole grid while run_workers waits for it
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(runner_mod, "work", stopped)
    out = tmp_path / "stop"
    with pytest.raises(KeyboardInterrupt):
        run_grid(tiny(out, data_root, seeds=[0]), progress=False, workers=2, threads=1)
    assert not list(out.glob("runs/*/result.json"))


def test_run_lock_excludes_a_second_worker_and_dies_with_its_owner(tmp_path):
    from engine.experiments.workers import try_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from engine.experiments.workers import try_lock; "
         "lock = try_lock(Path(sys.argv[1])); print(lock is not None, flush=True); "
         "time.sleep(120)", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        assert try_lock(tmp_path) is None  # a live owner: no second worker on this run
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: the owner crashes, nothing of it cleans up
        holder.wait()
    lock = try_lock(tmp_path)  # the crashed worker's run is free again
    assert lock is not None
    assert try_lock(tmp_path) is None  # and held once more, by us
    lock.release()
    assert try_lock(tmp_path) is not None


def _eval_result(folder, variant, auc, seed=None, shots=None, train_domain=None,
                 eval_domain="movie", status="ok"):
    meta = {"variant": variant, "seed": seed, "shots": shots, "train_domain": train_domain,
            "eval_domain": eval_domain}
    name = f"eval-{variant}-{train_domain}-k{shots}-s{seed}-on-{eval_domain}"
    path = folder / "runs" / name
    path.mkdir(parents=True)
    (path / "result.json").write_text(json.dumps(
        {"status": status, "kind": "eval", "hash": "x", "meta": meta, "auc": auc,
         "synthetic_data": False}))


def test_all_cells_sorts_shots_as_numbers(tmp_path):
    for shots in (256, 16, 64):
        _eval_result(tmp_path, "rt", 0.6, 0, shots, "movie")
    md = write_summary(tmp_path, planned=3).read_text()
    rows = [line for line in md.split("## All cells")[1].splitlines() if line.startswith("| RT")]
    assert [r.split(" | ")[3] for r in rows] == ["16", "64", "256"]  # not "16", "256", "64"


def test_figures_name_the_grid_settings(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    for shots in (16, 64):
        _eval_result(tmp_path, "rt", 0.6, 0, shots, "movie")
    kept = []
    monkeypatch.setattr(plt, "close", kept.append)  # keep the figures to read their titles
    write_summary(tmp_path, planned=2, title="cpu (smollm2-135m); rt train_on_inputs=false")
    titles = [f.get_suptitle() for f in kept]
    assert len(titles) == 2 and all("\ncpu (smollm2-135m); rt train_on_inputs=false" in t
                                    for t in titles), titles
    monkeypatch.undo()
    for f in kept:
        plt.close(f)


def test_aggregation_by_hand(tmp_path):
    # TALLRec movie K=16 over 3 seeds, K=64 over 1 seed, book from movie, zero-shot, a
    # failed run that must not count, and a baseline file in the baselines CLI's format
    for seed, auc in [(0, 0.60), (1, 0.70), (2, 0.80)]:
        _eval_result(tmp_path, "it+rt", auc, seed, 16, "movie")
    _eval_result(tmp_path, "it+rt", 0.65, 0, 64, "movie")
    for seed, auc in [(0, 0.50), (1, 0.56)]:
        _eval_result(tmp_path, "it+rt", auc, seed, 16, "movie", "book")
    _eval_result(tmp_path, "zero-shot", 0.51)
    _eval_result(tmp_path, "rt", 0.99, 3, 16, "movie", status="failed")
    (tmp_path / "baselines").mkdir()
    (tmp_path / "baselines" / "b.json").write_text(json.dumps({"results": [
        {"model": "sasrec", "domain": "movie", "shots": 16,
         "per_seed": [{"seed": 0, "test_auc": 0.52}, {"seed": 1, "test_auc": 0.58}]}]}))
    rows, status = collect(tmp_path)
    assert sorted(status.values()) == ["failed"] + ["ok"] * 7
    agg = aggregate(rows)
    g = agg["it+rt", "movie", "movie", 16]
    # mean 0.7; sample std sqrt(((-0.1)^2 + 0 + 0.1^2) / 2) = 0.1
    assert g["n"] == 3 and g["mean"] == pytest.approx(0.7) and g["std"] == pytest.approx(0.1)
    assert agg["it+rt", "movie", "movie", 64] == {"mean": 0.65, "n": 1, "std": None}
    cross = agg["it+rt", "movie", "book", 16]  # 0.53 ± sqrt(2 * 0.03^2 / 1)
    assert cross["mean"] == pytest.approx(0.53) and cross["std"] == pytest.approx(0.0424264, 1e-5)
    assert agg["sasrec", "movie", "movie", 16]["std"] == pytest.approx(np.sqrt(2 * 0.03 ** 2))
    md = write_summary(tmp_path, planned=9).read_text()
    assert "| TALLRec (IT+RT) | 0.7000 ± 0.1000 (n=3) | 0.6500 (n=1) |" in md
    assert "| Zero-shot (base) | 0.5100 (n=1) | 0.5100 (n=1) |" in md
    assert "| sasrec | 0.5500 ± 0.0424 (n=2) | — |" in md
    assert ("| TALLRec (IT+RT) | movie | 0.7000 ± 0.1000 (n=3) | 0.6500 (n=1) | "
            "0.5300 ± 0.0424 (n=2) | — |") in md
    assert "PARTIAL - 7 of 9 runs finished, 1 failed" in md and "SYNTHETIC" not in md


def test_bad_grids_are_clear_errors(data_root, tmp_path):
    with pytest.raises(ValueError, match=r"unknown variant 'it\+it'; known: zero-shot, it, rt, "
                                         r"it\+rt"):
        tiny(tmp_path, data_root, variants=["rt", "it+it"])
    with pytest.raises(ValueError, match="unknown train domain 'music'"):
        tiny(tmp_path, data_root, train_domains=["music"])
    with pytest.raises(ValueError, match="unknown eval domain 'music'"):
        tiny(tmp_path, data_root, eval_domains=["music"])
    with pytest.raises(ValueError, match="cannot be mixed"):
        tiny(tmp_path, data_root, eval_domains=["toy", "movie"])
    with pytest.raises(ValueError, match=r"--shots 4000 is larger than the toy training pool "
                                         r"\(2000 rows\)"):
        run_grid(tiny(tmp_path, data_root, shots=[16, 4000]), progress=False, plan_only=True)
    with pytest.raises(ValueError, match="--base is required"):
        grid_from_preset("paper")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit):  # argparse names the allowed variants
        cli_main(["--preset", "tiny", "--variants", "it+it"])


def test_plan_prints_runs_and_eta(data_root, tmp_path, capsys):
    assert cli_main(["--preset", "tiny", "--out", str(tmp_path), "--data-root", str(data_root),
                     "--plan"]) == 0
    text = capsys.readouterr().out
    assert "itrt-toy-k16-s1" in text and "21 runs, 0 cached, 21 to run; ETA" in text
    assert not (tmp_path / "runs").exists()


def test_plan_warns_when_bf16_would_be_emulated(data_root, tmp_path, capsys, monkeypatch):
    """The cpu preset pins bf16: on a CPU without AVX512-BF16/AMX the plan says that every run
    run as fp32 GEMMs of bf16 operands (slower than fp32) and names the way out, before any
    work."""
    import engine.precision

    args = ["--preset", "tiny", "--out", str(tmp_path), "--data-root", str(data_root), "--plan"]
    monkeypatch.setattr(engine.precision, "cpu_bf16_support", lambda: (False, "no bf16"))
    assert cli_main(args + ["--precision", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "WARNING: every run here is bf16" in text and "--precision fp32" in text
    assert cli_main(args + ["--precision", "fp32"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    monkeypatch.setattr(engine.precision, "cpu_bf16_support", lambda: (True, "has bf16"))
    assert cli_main(args + ["--precision", "bf16"]) == 0
    assert "WARNING" not in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_expected_eta_scales_rec_tuning_by_the_finished_runs_early_stop(data_root, tmp_path):
    from engine.experiments.eta import Estimator

    grid = tiny(tmp_path, data_root, shots=[16], seeds=[0])
    runs = {r.name: r for r in plan_runs(grid)}
    rt, it, ev = runs["rt-toy-k16-s0"], runs["it-s0"], runs["eval-rt-toy-k16-s0-on-toy"]
    assert rt.cfg.batch_size == 8 and rt.cfg.epochs == 1  # 16 shots: 2 planned steps
    folder = tmp_path / "runs" / rt.name
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps({"name": rt.name, "spec": rt.spec}))
    (folder / "result.json").write_text(json.dumps({"status": "ok", "kind": "train",
                                                    "steps": 1, "train_tokens_per_s": 50.0}))
    est = Estimator(grid)
    est.measure_from_cache([folder, tmp_path / "runs" / "absent"])
    assert est.rt_share == [0.5] and est.train_rate == 50.0
    load = grid.load_seconds
    assert est.seconds(rt, 0.5) == pytest.approx((est.seconds(rt) - load) * 0.5 + load)
    for other in (it, ev):  # stage 1 and tests run whole
        assert est.seconds(other, 0.5) == est.seconds(other)
    status = {name: "todo" for name in runs}
    table = est.plan_table(list(runs.values()), status, {n: est.seconds(r)
                                                         for n, r in runs.items()})
    assert "if rec-tuning runs stop early as the 1 finished ones did (median 50%" in table


def test_eta_times_each_training_stage_at_its_own_measured_rate(data_root, tmp_path):
    from engine.experiments.eta import Estimator

    grid = tiny(tmp_path, data_root, shots=[16], seeds=[0, 1])
    runs = {r.name: r for r in plan_runs(grid)}
    finished = {"it-s0": 20.0, "rt-toy-k16-s0": 80.0, "rt-toy-k16-s1": 100.0}
    for name, rate in finished.items():
        folder = tmp_path / "runs" / name
        folder.mkdir(parents=True)
        (folder / "spec.json").write_text(json.dumps({"name": name, "spec": runs[name].spec}))
        (folder / "result.json").write_text(json.dumps(
            {"status": "ok", "kind": "train", "steps": 1, "train_tokens_per_s": rate}))
    est = Estimator(grid)
    est.measure_from_cache(sorted((tmp_path / "runs").glob("*/")))
    assert est.stage_rates == {"it": 20.0, "rt": 90.0} and est.train_rate == 80.0
    load = grid.load_seconds
    for name, rate in (("it-s1", 20.0), ("itrt-toy-k16-s1", 90.0)):
        trained, scored = est.tokens(runs[name])
        assert est.seconds(runs[name]) == pytest.approx(
            trained / rate + scored / est.eval_rate + load)
    table = est.plan_table([runs["it-s1"]], {"it-s1": "todo"}, {"it-s1": 1.0})
    assert "at 20 it / 90 rt train /" in table


def test_summary_title_names_settings_given_over_the_preset(data_root, tmp_path):
    args = ["--preset", "tiny", "--out", str(tmp_path), "--data-root", str(data_root),
            "--summary-only"]
    assert cli_main(args + ["--rt", "train_on_inputs=false", "lr=0.01"]) == 0
    title = (tmp_path / "summary.md").read_text().splitlines()[0]
    assert title.startswith("# tiny (random:tiny-32k); rt train_on_inputs=false lr=0.01")
    assert cli_main(args) == 0
    assert (tmp_path / "summary.md").read_text().startswith("# tiny (random:tiny-32k): ")


def test_plots_written(grid_out):
    out, _ = grid_out
    import matplotlib.image

    for name in ("fig4_shots.png", "fig5_cross_domain.png"):
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000
        img = matplotlib.image.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert img[..., :3].std() > 0.05  # not a blank canvas


def test_summary_only_from_copied_cache(grid_out, tmp_path):
    out, _ = grid_out
    copy = tmp_path / "copy"
    shutil.copytree(out / "runs", copy / "runs")
    assert cli_main(["--preset", "tiny", "--out", str(copy), "--summary-only"]) == 0
    assert (copy / "summary.md").read_text().count("SYNTHETIC") >= 2


def test_a_finished_stage_whose_adapter_is_gone_is_trained_again(data_root, tmp_path,
                                                                 monkeypatch, capsys):
    # a fresh clone: the committed cache holds every result but no adapter (.gitignore), and
    # IT+RT has not run yet; it must start from its IT adapter, trained again the same way
    out = tmp_path / "clone"
    grid = tiny(out, data_root, variants=["it+rt"], shots=[8], seeds=[0])
    run_grid(grid, progress=False)
    first = results(out)
    for name in ("itrt-toy-k8-s0", "eval-itrt-toy-k8-s0-on-toy"):
        (out / "runs" / name / "result.json").unlink()
    for folder in out.glob("runs/*/train"):
        shutil.rmtree(folder)
    capsys.readouterr()
    assert runner_mod.check_cache(grid, plan_runs(grid))["it-s0"] == "retrain"
    calls = Counter(monkeypatch)
    counts = run_grid(grid, progress=False)
    assert [c.stage for c in calls.train] == ["it", "rt"]
    assert calls.train[1].init_adapter == first["it-s0"]["adapter"]
    assert calls.evals == ["eval-itrt-toy-k8-s0-on-toy"]
    assert counts["failed"] == 0
    assert "it-s0: finished, but its adapter is gone" in capsys.readouterr().out
    again = results(out)
    assert again["it-s0"]["best_val_metric"] == first["it-s0"]["best_val_metric"]
    assert again["eval-itrt-toy-k8-s0-on-toy"]["probs"] == \
        first["eval-itrt-toy-k8-s0-on-toy"]["probs"]
    # the zero-shot eval needs nothing; an adapter no run still needs is not trained again
    shutil.rmtree(out / "runs" / "it-s0" / "train")
    monkeypatch.undo()
    calls = Counter(monkeypatch)
    assert run_grid(grid, progress=False)["ran"] == 0 and calls.train == []
