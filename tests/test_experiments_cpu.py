"""The `cpu` grid: its plan (runs, priority order, dependencies, presets), the cache of the
committed cpu-small grid staying valid, semantic-history runs end to end on a tiny model,
and the summary's status, like-rate row, semantic table and atomic writes."""

import json
import os
from pathlib import Path

import pytest
import torch

from engine.experiments import grid_from_preset, plan_runs, run_grid, write_summary
from engine.experiments.summary import LIKE_RATE, aggregate, baseline_rows, collect, shot_series

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_plan_runs_priority_and_dependencies(tmp_path):
    grid = grid_from_preset("cpu", out=str(tmp_path))
    runs = plan_runs(grid)
    names = [r.name for r in runs]
    # by hand: zero-shot on movie, book, movie-sem (3); IT x 3 seeds with 2 evals (9);
    # RT/IT+RT x movie/book x 3 K x 3 seeds, 2 evals each (108); semantic RT/IT+RT x 3 K x
    # 3 seeds, 1 eval each (36)
    assert len(runs) == len(set(names)) == 156
    assert names[:3] == ["eval-zero-shot-on-movie", "eval-zero-shot-on-book",
                         "eval-zero-shot-on-movie-sem"]
    assert names[3:10] == ["rt-movie-k64-s0", "eval-rt-movie-k64-s0-on-movie", "it-s0",
                           "eval-it-s0-on-movie", "eval-it-s0-on-book", "itrt-movie-k64-s0",
                           "eval-itrt-movie-k64-s0-on-movie"]
    first = {n: i for i, n in enumerate(names)}
    for r in runs:  # every run after the one it needs
        assert r.needs is None or first[r.needs] < first[r.name]
    # K order 64, 256, 16 on movie, each K with recent then semantic histories, then book;
    # cross-domain tests last
    tuned = [n for n in names if n.startswith(("rt-", "itrt-"))]
    assert [n for n in tuned if n.startswith("rt-movie-k")] == [
        f"rt-movie-k{k}-s{s}" for k in (64, 256, 16) for s in (0, 1, 2)]
    assert first["itrt-movie-k64-s2"] < first["rt-movie-sem-k64-s0"] < first["rt-movie-k256-s0"]
    assert first["itrt-movie-sem-k16-s2"] < first["rt-book-k64-s0"]
    cross = [n for n in names if n.startswith(("eval-rt-", "eval-itrt-"))
             and n.endswith(("-on-book", "-on-movie"))
             and ("-movie-k" in n) != n.endswith("-on-movie")]
    assert len(cross) == 36 and names[-36:] == cross
    # presets reach the train configs: rt-cpu with early stopping, it-cpu, bf16, full tests
    rt = next(r for r in runs if r.name == "rt-book-k256-s1").cfg
    assert (rt.lr, rt.batch_size, rt.epochs, rt.warmup_ratio, rt.eval_every_epochs,
            rt.val_size, rt.patience, rt.precision, rt.domain, rt.shots, rt.seed) == \
        (1e-3, 16, 20, 0.1, 2, 300, 3, "bf16", "book", 256, 1)
    it = next(r for r in runs if r.name == "it-s2").cfg
    assert (it.stage, it.lr, it.epochs, it.val_size, it.seed) == ("it", 3e-4, 3, 100, 2)
    assert all(r.spec["limit"] == -1 for r in runs if r.kind == "eval")
    sem = next(r for r in runs if r.name == "itrt-movie-sem-k256-s0")
    folder = tmp_path / "data" / "movie-semantic"
    assert sem.cfg.data == str(folder / "train.json")
    assert sem.cfg.val_data == str(folder / "valid.json")
    assert sem.spec["history"]["pool"] == 50 and sem.needs == "it-s0"



def test_shots_flag_keeps_the_presets_order():
    # --shots 16 256 on the cpu preset (order 64, 256, 16) runs 256 before 16
    assert grid_from_preset("cpu", shots=[16, 256]).shot_order == [256, 16]
    assert grid_from_preset("cpu", shots=[32, 16]).shot_order == [16, 32]
    assert grid_from_preset("cpu", shots=[16], shot_order=[16]).shot_order == [16]

def test_committed_cpu_small_cache_stays_valid():
    """New TrainConfig fields must not change the hashes of the committed cpu-small runs."""
    committed = ROOT / "results" / "cpu-small" / "runs"
    if not committed.is_dir():
        pytest.skip("no committed cpu-small results")
    runs = plan_runs(grid_from_preset("cpu-small"))
    stored = {p.parent.name: json.loads(p.read_text())["hash"]
              for p in committed.glob("*/spec.json")}
    assert len(stored) == len(runs) == 23
    assert {r.name: r.hash for r in runs} == stored


def test_committed_cpu_cache_stays_valid():
    """Every committed `cpu` run (semantic ones too) keeps its hash under today's plan."""
    committed = ROOT / "results" / "cpu" / "runs"
    if not committed.is_dir():
        pytest.skip("no committed cpu results")
    plan = {r.name: r.hash for r in plan_runs(grid_from_preset("cpu"))}
    stored = {p.parent.name: json.loads(p.read_text())["hash"]
              for p in committed.glob("*/spec.json")}
    assert len(stored) > 100 and set(stored) <= set(plan)
    assert {n: plan[n] for n in stored} == stored


def test_collaborative_retrieval_plans_its_own_runs_and_data():
    grid = grid_from_preset("cpu", out="o", train_domains=["movie"], eval_domains=["movie"],
                            shots=[256], variants=["rt"], semantic_variants=["rt"], seeds=[0],
                            retrieval="collaborative")
    runs = {r.name: r for r in plan_runs(grid)}
    assert set(runs) == {"rt-movie-k256-s0", "eval-rt-movie-k256-s0-on-movie",
                         "rt-movie-cf-k256-s0", "eval-rt-movie-cf-k256-s0-on-movie-cf"}
    train, test = runs["rt-movie-cf-k256-s0"], runs["eval-rt-movie-cf-k256-s0-on-movie-cf"]
    assert train.cfg.data == str(Path("o") / "data" / "movie-collaborative" / "train.json")
    assert train.meta["history"] == test.meta["history"] == "collaborative"
    assert test.spec["history"] == {"select": "collaborative", "history_len": 10, "pool": 50,
                                    "folder": str(Path("o") / "data" / "movie-collaborative")}
    sem = {r.name: r.hash for r in plan_runs(grid_from_preset(
        "cpu", out="o", train_domains=["movie"], eval_domains=["movie"], shots=[256],
        variants=["rt"], semantic_variants=["rt"], seeds=[0]))}
    assert sem["rt-movie-k256-s0"] == runs["rt-movie-k256-s0"].hash  # recent runs shared
    assert sem["rt-movie-sem-k256-s0"] != train.hash
    with pytest.raises(ValueError, match="unknown retrieval 'bm25'"):
        grid_from_preset("cpu", retrieval="bm25")


def test_semantic_runs_end_to_end(tmp_path, data_root):
    """A random tiny base on movie: the semantic build is made once (same rows as TALLRec's
    files, other histories), the semantic runs score it, and the summary pairs them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grid = grid_from_preset(
            "tiny", out=str(tmp_path / "g"), data_root=str(data_root), variants=["zero-shot"],
            semantic_variants=["zero-shot", "rt"], train_domains=["movie"],
            eval_domains=["movie"], shots=[8], seeds=[0], eval_limit=12, cutoff_len=512,
            rt=dict(cutoff_len=512, val_size=8))
        counts = run_grid(grid, progress=False)
    finally:
        torch.set_num_threads(before)
    assert counts["failed"] == 0 and counts["ran"] == 4
    folder = tmp_path / "g" / "data" / "movie-semantic"
    sem = json.loads((folder / "test.json").read_text())
    ref = json.loads((data_root / "tallrec" / "movie" / "test.json").read_text())
    assert [r["output"] for r in sem] == [r["output"] for r in ref]
    assert [r["input"].rsplit("\n", 1)[1] for r in sem] == \
        [r["input"].rsplit("\n", 1)[1] for r in ref]  # the same target question
    assert sum(a["input"] != b["input"] for a, b in zip(sem, ref, strict=True)) > 100
    res = {p.parent.name: json.loads(p.read_text())
           for p in (tmp_path / "g" / "runs").glob("*/result.json")}
    assert set(res) == {"eval-zero-shot-on-movie", "eval-zero-shot-on-movie-sem",
                        "rt-movie-sem-k8-s0", "eval-rt-movie-sem-k8-s0-on-movie-sem"}
    zs = res["eval-zero-shot-on-movie-sem"]
    assert zs["data"] == str(folder / "test.json") and zs["n"] == 12
    assert res["eval-rt-movie-sem-k8-s0-on-movie-sem"]["ckpt"].endswith("train/best")
    train_log = (tmp_path / "g" / "runs" / "rt-movie-sem-k8-s0" / "log.txt").read_text()
    assert str(folder / "train.json") in train_log
    md = write_summary(tmp_path / "g", plan_runs(grid)).read_text()
    diff = res["eval-zero-shot-on-movie-sem"]["auc"] - res["eval-zero-shot-on-movie"]["auc"]
    assert (f"| variant | no training | 8-shot |\n|---|---|---|\n"
            f"| Zero-shot (base) | {diff:+.4f} (n=1) | — |\n\n") in md  # no recent RT: no row
    assert "Status: 3 of 3 planned cells done (all their seeds), 0 partly; 4 of 4 runs" in md


def _eval(out, name, variant, auc, seed=None, shots=None, train=None, history=None):
    meta = {"variant": variant, "seed": seed, "shots": shots, "train_domain": train,
            "eval_domain": "movie", **({"history": history} if history else {})}
    (out / "runs" / name).mkdir(parents=True)
    (out / "runs" / name / "result.json").write_text(json.dumps(
        {"status": "ok", "kind": "eval", "hash": "x", "meta": meta, "auc": auc}))


def test_summary_semantic_table_like_rate_and_cells_by_hand(tmp_path):
    grid = grid_from_preset("cpu", out=str(tmp_path), train_domains=["movie"],
                            eval_domains=["movie"], shots=[64], shot_order=[64],
                            variants=["zero-shot", "rt"], semantic_variants=["rt"])
    planned = plan_runs(grid)  # cells: zero-shot, rt K=64, rt|sem K=64 (3 seeds each)
    for seed, (rec, sem) in enumerate([(0.60, 0.63), (0.62, 0.66), (0.64, 0.65)]):
        _eval(tmp_path, f"eval-rt-movie-k64-s{seed}-on-movie", "rt", rec, seed, 64, "movie")
        if seed < 2:
            _eval(tmp_path, f"eval-rt-movie-sem-k64-s{seed}-on-movie-sem", "rt", sem, seed, 64,
                  "movie", "semantic")
    _eval(tmp_path, "eval-zero-shot-on-movie", "zero-shot", 0.55)
    # a run of another command sharing the folder: in the tables, not in this plan's progress
    _eval(tmp_path, "eval-rt-movie-k16-s0-on-movie", "rt", 0.58, 0, 16, "movie")
    bl = tmp_path / "bl.json"
    bl.write_text(json.dumps({"results": [
        {"model": m, "domain": "movie", "shots": 64, "like_rate_test_auc": 0.726,
         "per_seed": [{"seed": 0, "test_auc": 0.6}]} for m in ("gru4rec", "caser")]}))
    assert [r["auc"] for r in baseline_rows(json.loads(bl.read_text()))
            if r["method"] == LIKE_RATE] == [0.726]  # one row, not one per model
    md = write_summary(tmp_path, planned, baseline_files=[str(bl)]).read_text()
    # paired differences 0.03 and 0.04 (seed 2 has no semantic run): mean 0.035, std
    # |0.03 - 0.04| / sqrt(2) = 0.00707
    assert "| RT only | — | +0.0350 ± 0.0071 (n=2) |" in md
    assert f"| {LIKE_RATE} | 0.7260 (n=1) |" in md
    assert "| RT, semantic history (ReLLa) | — | 0.6450 ± 0.0212 (n=2) |" in md  # K = 16, 64
    assert ("Status: PARTIAL - 2 of 3 planned cells done (all their seeds), 1 partly; 6 of 13 "
            "runs finished (and 1 finished outside this plan).") in md


def test_summary_tables_each_retrieval_against_recent(tmp_path):
    for seed, (rec, sem, cf) in enumerate([(0.60, 0.58, 0.65), (0.62, 0.61, 0.64)]):
        _eval(tmp_path, f"r{seed}", "rt", rec, seed, 256, "movie")
        _eval(tmp_path, f"s{seed}", "rt", sem, seed, 256, "movie", "semantic")
        _eval(tmp_path, f"c{seed}", "rt", cf, seed, 256, "movie", "collaborative")
    md = write_summary(tmp_path, 6).read_text()
    # semantic - recent: -0.02, -0.01; collaborative - recent: +0.05, +0.02
    sem_part = md.split("## Semantic (retrieved) minus recent")[1].split("##")[0]
    cf_part = md.split("## Collaborative (retrieved) minus recent")[1].split("##")[0]
    assert "| RT only | — | -0.0150 ± 0.0071 (n=2) |" in sem_part
    assert "| RT only | — | +0.0350 ± 0.0212 (n=2) |" in cf_part
    assert "| RT, collaborative history | movie | movie | 256 | 0.6450 ± 0.0071 (n=2) | 2 |" in md


def test_summary_is_replaced_whole(tmp_path, monkeypatch):
    _eval(tmp_path, "z", "zero-shot", 0.55)
    path = write_summary(tmp_path, 1)
    before = path.read_text()
    _eval(tmp_path, "z2", "rt", 0.6, 0, 16, "movie")

    def broken(fd):  # the process dies after writing the new text, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", broken)  # fileio flushes every file before renaming it
    with pytest.raises(KeyboardInterrupt):
        write_summary(tmp_path, 2)
    monkeypatch.undo()
    assert path.read_text() == before
    assert not list(path.parent.glob(".summary.md*"))  # and no temporary file is left


def test_fig4_draws_the_baselines_beside_our_variants(tmp_path):
    """Fig. 4 compares with the ID baselines, as TALLRec's does: each panel gets our variants,
    then every baseline at its K and the like-rate rule as a line."""
    _eval(tmp_path, "z", "zero-shot", 0.54)
    for seed, auc in enumerate([0.56, 0.58]):
        _eval(tmp_path, f"r16-{seed}", "rt", auc, seed, 16, "movie")
    _eval(tmp_path, "r64", "rt", 0.60, 0, 64, "movie")
    bl = tmp_path / "bl.json"
    bl.write_text(json.dumps({"results": [
        {"model": "caser", "domain": "movie", "shots": k, "like_rate_test_auc": 0.726,
         "per_seed": [{"seed": 0, "test_auc": a}]} for k, a in ((16, 0.53), (64, 0.615))]}))
    rows, _ = collect(tmp_path, [str(bl)])
    series = shot_series(rows, aggregate(rows), "movie")
    flat = [(m, base, [(k, round(g["mean"], 4)) for k, g in pts]) for m, base, pts in series]
    assert flat == [("zero-shot", False, [(None, 0.54)]),
                    ("rt", False, [(16, 0.57), (64, 0.6)]),
                    ("caser", True, [(16, 0.53), (64, 0.615)]),
                    (LIKE_RATE, True, [(None, 0.726)])]
    write_summary(tmp_path, baseline_files=[str(bl)])
    assert (tmp_path / "fig4_shots.png").stat().st_size > 0
