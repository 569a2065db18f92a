"""Data parallelism on CPU with gloo, 2 processes of 1 thread: one DDP step's gradient equals
the single-process one; `torchrun train.py` gives the single-process adapter and validation
AUC; a rank killed with SIGKILL stops the run with an error, and --resume continues it exactly.
The reference is always the single process, which does not use engine.distributed at all."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from engine.config import TrainConfig
from engine.precision import get_precision
from engine.train import load_data, train, train_step
from tests.test_engine import _cli

ROOT = Path(__file__).resolve().parent.parent
TOL = dict(rtol=1e-5, atol=1e-6)  # fp32, sums over ranks in another order
pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(out, data_root, **over) -> TrainConfig:
    # lora_dropout 0: with dropout the ranks draw other masks than the single process
    base = dict(stage="rt", base="random:tiny-32k",
                tokenizer=str(data_root / "tokenizer" / "llama" / "tokenizer.model"),
                domain="toy", shots=16, val_size=24, lr=3e-2, batch_size=8, micro_batch_size=2,
                epochs=2, warmup_steps=1, eval_every=2, save_every=2, patience=0,
                train_on_inputs=False, lora_dropout=0.0, seed=7, device="cpu",
                precision="fp32", eval_batch_size=8, out=str(out))
    base.update(over)
    return TrainConfig(**base)


def torchrun(cfg: TrainConfig | list[str], script: str = "train.py",
             **env) -> subprocess.CompletedProcess:
    args = _cli(cfg) if isinstance(cfg, TrainConfig) else cfg
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TALLREC_DIST_TIMEOUT": "60", **env}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def adapter(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def log(out) -> list[dict]:
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# -- one optimizer step, gradients compared -----------------------------------------------

# (step_mode, micro_batch_size, samples in the step): micro-batches dealt 2 + 2; one
# micro-batch cut in two slices (tallrec weights a slice by its share of the tokens); a
# 1-sample step, where rank 1 joins the all-reduce with a zero-weight stand-in.
CASES = [("mean", 2, 8), ("tallrec", 8, 8), ("tallrec", 2, 6), ("mean", 2, 1)]


def _step_deltas(cfg: TrainConfig, dist_obj=None) -> list[dict]:
    """Per case: SGD(lr=1) parameter change after one train_step = -(the step's gradient)."""
    from dataclasses import replace

    from data.collate import TokenizeConfig, encode_all
    from model.checkpoint import load_base
    from model.lora import mark_only_lora_trainable

    model, tok = load_base(cfg.base, lora=cfg.lora(), tokenizer=cfg.tokenizer, seed=cfg.seed)
    mark_only_lora_trainable(model)
    rows = load_data(cfg)[0]
    examples = encode_all(rows, tok, TokenizeConfig(cfg.cutoff_len, cfg.train_on_inputs))[0]
    if dist_obj is not None:
        dist_obj.wrap(model)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = []
    for mode, mbs, n in CASES:
        c = replace(cfg, step_mode=mode, micro_batch_size=mbs, grad_clip=0.0)
        before = {k: p.detach().clone() for k, p in params.items()}
        opt = torch.optim.SGD(list(params.values()), lr=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, n_tok = train_step(model, opt, scaler, examples[:n], tok, c, torch.device("cpu"),
                                 get_precision("fp32"), 0, dist_obj)
        out.append({"loss": loss, "tokens": n_tok,
                    "delta": {k: p.detach() - before[k] for k, p in params.items()}})
    return out


def _rank_main(rank: int, port: int, cfg: TrainConfig, result_file: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      TALLREC_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    from engine.distributed import from_env
    from engine.memory import plan

    d = from_env("cpu")
    res = _step_deltas(cfg, d)
    sizes = d.ddp._get_ddp_logging_data()["bucket_sizes"]  # what DDP allocated, in bytes
    model = d.ddp.module.model
    planned = plan(model.cfg, 64, 2, cfg.lora(), "fp32", backend="cpu-flash", lora_impl="torch",
                   ddp_world=2).ddp_buckets
    if rank == 0:
        torch.save({"steps": res, "buckets": sum(int(x) for x in sizes.split(",")),
                    "planned_buckets": planned}, result_file)
    d.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_step_gradient_equals_single_process(tmp_path, data_root):
    cfg = cfg_for(tmp_path / "unused", data_root)
    single = _step_deltas(cfg)
    result_file = tmp_path / "ddp.pt"
    mp.spawn(_rank_main, args=(free_port(), cfg, str(result_file)), nprocs=2, join=True)
    got = torch.load(result_file, weights_only=False)
    for case, a, b in zip(CASES, single, got["steps"], strict=True):
        assert a["tokens"] == b["tokens"], case  # the global count, not rank 0's
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), case
        assert any(v.abs().max() > 0 for v in a["delta"].values()), case
        for k in a["delta"]:
            torch.testing.assert_close(b["delta"][k], a["delta"][k], **TOL, msg=f"{case} {k}")
    # the memory planner's per-rank DDP buckets are what DDP allocated
    assert got["planned_buckets"] == got["buckets"] > 0


# -- torchrun train.py ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """The same run as one process (in this process) and under torchrun with 2 ranks."""
    tmp = tmp_path_factory.mktemp("ddp")
    single = cfg_for(tmp / "single", data_root)
    train(single, progress=False)
    ddp = cfg_for(tmp / "ddp", data_root)
    proc = torchrun(ddp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one of 2 DDP ranks" in proc.stdout and "DDP gradient buckets" in proc.stdout
    return single, ddp, tmp


def test_torchrun_adapter_and_auc_equal_single_process(runs):
    single, ddp, _ = runs
    a, b = adapter(Path(single.out) / "last"), adapter(Path(ddp.out) / "last")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], **TOL, msg=k)
    la, lb = log(single.out), log(ddp.out)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        if "loss" in ra:
            assert rb["tokens"] == ra["tokens"] and rb["loss"] == pytest.approx(ra["loss"], 1e-6)
        else:  # validation, scored half by each rank and gathered
            assert rb["val_n"] == ra["val_n"] and rb["val_positives"] == ra["val_positives"]
            assert rb["val_auc"] == pytest.approx(ra["val_auc"], abs=1e-9)
            assert rb["val_log_loss"] == pytest.approx(ra["val_log_loss"], rel=1e-6)
    aucs = [r["val_auc"] for r in la if "val_auc" in r]
    assert len(set(aucs)) > 1  # the AUC moves: the comparison sees a trained adapter
    assert json.loads((Path(ddp.out) / "result.json").read_text())["steps"] == 4


def test_kill_one_rank_stops_the_run_and_resume_continues(runs, data_root):
    _, ddp, tmp = runs
    cut = cfg_for(tmp / "cut", data_root)
    proc = torchrun(cut, TALLREC_KILL_AT="step-3", TALLREC_KILL_RANK="1")
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in proc.stderr, proc.stderr[-3000:]  # torchrun names the rank
    assert not (Path(cut.out) / "result.json").exists()
    resumed = torchrun(cfg_for(tmp / "cut", data_root, resume=True))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = adapter(Path(ddp.out) / "last"), adapter(Path(cut.out) / "last")
    for k in a:  # every rank's RNG and the data position restored: the same bits
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    steps = [r["step"] for r in log(cut.out) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # step 3 (after the step-2 checkpoint) redone, logged once




def test_torchrun_evaluate_splits_the_rows_and_equals_one_process(runs, tmp_path):
    single, _, _ = runs
    from evaluate import main as evaluate_main

    common = ["--ckpt", str(Path(single.out) / "last"), "--domain", "toy", "--limit", "40",
              "--tokenizer", single.tokenizer, "--device", "cpu", "--precision", "fp32",
              "--batch-size", "8", "--no-progress"]
    assert evaluate_main([*common, "--out", str(tmp_path / "one.json")]) == 0
    proc = torchrun([*common, "--out", str(tmp_path / "two.json")], script="evaluate.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["n"] == 40 and two["labels"] == one["labels"]  # gathered back in row order
    torch.testing.assert_close(torch.tensor(two["probs"]), torch.tensor(one["probs"]),
                               rtol=0, atol=2e-6)  # the JSON rounds to 6 digits
    assert two["auc"] == pytest.approx(one["auc"], abs=1e-6)
