"""train() end to end on a tiny model and the synthetic toy domain, and evaluate.py."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.config import TrainConfig, config_from_args
from engine.state import load_trainer_state
from engine.train import TrainingError, stop_on_signal, train
from tests.references import pairwise_auc

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tmp_path, data_root, **over) -> TrainConfig:
    # Loss on the answer only: the tiny model's 32k-token LM head over every prompt token was
    # most of these runs' time (the full-prompt loss: test_loss.py, and test_cli.py's run on
    # the default base with the product's defaults).
    base = dict(stage="rt", base="random:tiny-32k",
                tokenizer=str(data_root / "tokenizer" / "llama" / "tokenizer.model"),
                domain="toy", shots=48, val_size=40, lr=3e-3, batch_size=16,
                train_on_inputs=False, micro_batch_size=8, epochs=3, warmup_steps=2,
                eval_every=3, patience=0, lora_dropout=0.05, seed=7, device="cpu", precision="fp32",
                out=str(tmp_path / "run"), eval_batch_size=20)
    base.update(over)
    return TrainConfig(**base)


def adapter(folder) -> dict:
    return load_file(Path(folder) / "adapter_model.safetensors")


def assert_same_adapter(a, b):
    a, b = adapter(a), adapter(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_train_end_to_end(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, epochs=4)
    result = train(cfg, progress=False)
    out = Path(cfg.out)
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert result["steps"] == len(losses) == 12  # 48 shots / 16 per step * 4 epochs
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the loss goes down
    vals = [r for r in log if "val_auc" in r]
    assert [r["step"] for r in vals] == [3, 6, 9, 12]
    best = max(vals, key=lambda r: r["val_auc"])
    best_json = json.loads((out / "best" / "best.json").read_text())
    assert best_json["step"] == best["step"] == result["best_step"]
    assert best_json["auc"] == pytest.approx(best["val_auc"])
    saved = json.loads((out / "config.json").read_text())
    assert saved == cfg.to_dict()


def test_best_adapter_scores_its_recorded_auc(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, epochs=2, eval_every=2)
    train(cfg, progress=False)
    out = Path(cfg.out)
    best_json = json.loads((out / "best" / "best.json").read_text())
    # The validation rows: same seed and size as the run used.
    from engine.train import load_data

    _, val, _, _ = load_data(cfg)
    val_file = tmp_path / "val.json"
    val_file.write_text(json.dumps(val))
    res_file = tmp_path / "res.json"
    from evaluate import main as evaluate_main

    rc = evaluate_main(["--ckpt", str(out), "--data", str(val_file), "--out", str(res_file),
                        "--tokenizer", cfg.tokenizer, "--device", "cpu", "--precision", "fp32",
                        "--no-progress"])
    assert rc == 0
    res = json.loads(res_file.read_text())
    assert res["auc"] == pytest.approx(best_json["auc"], abs=1e-9)
    # evaluate.py's AUC is the pair count on the probabilities it wrote (6 decimals), except
    # that a (positive, negative) pair rounded to one value counts 1/2 there, 0 or 1 unrounded
    pos = [q for q, y in zip(res["probs"], res["labels"], strict=True) if y == 1]
    neg = [q for q, y in zip(res["probs"], res["labels"], strict=True) if y == 0]
    ties = sum(a == b for a in pos for b in neg)
    assert res["auc"] == pytest.approx(pairwise_auc(res["labels"], res["probs"]),
                                       abs=1e-6 + 0.5 * ties / (len(pos) * len(neg)))
    assert res["n"] == len(val) and res["positives"] == sum(res["labels"])


def test_same_seed_same_adapter(tmp_path, data_root):
    a = tiny_cfg(tmp_path / "a", data_root, epochs=1)
    b = tiny_cfg(tmp_path / "b", data_root, epochs=1)
    train(a, progress=False)
    train(b, progress=False)
    assert_same_adapter(Path(a.out) / "last", Path(b.out) / "last")
    c = tiny_cfg(tmp_path / "c", data_root, epochs=1, seed=8)
    train(c, progress=False)
    with pytest.raises(AssertionError):
        assert_same_adapter(Path(a.out) / "last", Path(c.out) / "last")


def _cli(cfg: TrainConfig) -> list[str]:
    args = []
    for k, v in cfg.to_dict().items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, list):
            args += [flag, *map(str, v)]
        elif v is not None:
            args += [flag, str(v)]
    return args


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root) -> TrainConfig:
    """The reference run every resume test compares with, trained once for the module."""
    full = tiny_cfg(tmp_path_factory.mktemp("full"), data_root, save_every=2, eval_every=4,
                    epochs=3)
    train(full, progress=False)
    return full


def cut_run(tmp_path, data_root, fault: str) -> tuple[subprocess.CompletedProcess, Path]:
    """train.py on the uninterrupted run's settings, stopped by a fault point
    (TALLREC_KILL_AT=... or TALLREC_TERM_AT=...: fileio.fault_point)."""
    cut = tiny_cfg(tmp_path / "cut", data_root, save_every=2, eval_every=4, epochs=3)
    assert config_from_args(_cli(cut)) == cut
    var, _, point = fault.partition("=")
    env = {**os.environ, var: point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *_cli(cut)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    return proc, Path(cut.out)


def resume_and_compare(tmp_path, data_root, full: TrainConfig, out: Path):
    """--resume the cut run: the same adapters as the uninterrupted run, every step once."""
    resumed = tiny_cfg(tmp_path / "cut", data_root, save_every=2, eval_every=4, epochs=3,
                       resume=True)
    train(resumed, progress=False)
    assert_same_adapter(Path(full.out) / "last", out / "last")
    assert_same_adapter(Path(full.out) / "best", out / "best")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 10))  # no step logged twice or lost


@pytest.mark.parametrize("kill_at", ["step-5", "swap-last:2"])
def test_resume_after_sigkill_gives_same_adapter(tmp_path, data_root, kill_at, uninterrupted):
    proc, out = cut_run(tmp_path, data_root, f"TALLREC_KILL_AT={kill_at}")
    assert proc.returncode == -9, proc.stderr[-2000:]  # really SIGKILLed
    if kill_at.startswith("swap"):  # died between renames: only the previous folder is left
        assert not (out / "last").exists() and (out / ".last.old").is_dir()
    resume_and_compare(tmp_path, data_root, uninterrupted, out)


def test_sigterm_saves_the_step_in_flight_and_resume_gives_same_adapter(tmp_path, data_root,
                                                                        uninterrupted):
    proc, out = cut_run(tmp_path, data_root, "TALLREC_TERM_AT=step-5")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "stopped by SIGTERM at step 5 of 9" in proc.stderr and "--resume" in proc.stderr
    # step 5 is no save point (save_every 2): the stop itself wrote this checkpoint
    assert load_trainer_state(out / "last" / "trainer_state.pt")["state"].step == 5
    assert not (out / "result.json").exists()
    resume_and_compare(tmp_path, data_root, uninterrupted, out)


def test_stop_on_signal_flags_the_first_signal_raises_on_the_second_and_restores():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signal() as asked:
        os.kill(os.getpid(), signal.SIGTERM)
        assert asked["signal"] is signal.SIGTERM
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
    # an ignored signal stays ignored (a grid worker's SIGINT); off: nothing is installed
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with stop_on_signal() as asked:
            os.kill(os.getpid(), signal.SIGINT)
            assert asked["signal"] is None
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
    with stop_on_signal(enabled=False):
        assert signal.getsignal(signal.SIGTERM) is before


def test_non_empty_out_dir_is_not_overwritten(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root)
    Path(cfg.out).mkdir(parents=True)
    (Path(cfg.out) / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty; pass --resume"):
        train(cfg, progress=False)
    assert (Path(cfg.out) / "keep.txt").read_text() == "precious"


def test_resume_with_different_settings_is_refused(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, epochs=1)
    Path(cfg.out).mkdir(parents=True)  # a run's config.json is all the check reads
    (Path(cfg.out) / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(ValueError, match=r"settings differ.*lr"):
        train(tiny_cfg(tmp_path, data_root, epochs=1, lr=1e-3, resume=True), progress=False)


def hf_base(folder, data_root, dim=64, nan=False) -> str:
    """A tiny HF-format base with LLaMA's vocabulary and tokenizer."""
    import shutil

    from model import LlamaConfig
    from tests.model_fixtures import hf_reference, write_hf

    cfg = LlamaConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                      vocab_size=32000, max_seq_len=1024)
    hf = hf_reference(cfg)
    if nan:  # a corrupt base: one NaN weight poisons every loss
        hf.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("nan")
    write_hf(hf, folder)
    shutil.copy(data_root / "tokenizer" / "llama" / "tokenizer.model", folder)
    return str(folder)


def test_init_adapter_for_another_base_fails(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path / "a", data_root, max_steps=1, val_size=8)
    train(cfg, progress=False)
    other = tiny_cfg(tmp_path / "b", data_root, base=hf_base(tmp_path / "base", data_root, 32),
                     tokenizer=None, init_adapter=str(Path(cfg.out) / "last"))
    with pytest.raises(ValueError, match="(?i)adapter.*(shape|hidden)"):
        train(other, progress=False)


def test_nan_loss_is_reported_and_not_saved(tmp_path, data_root):
    base = hf_base(tmp_path / "base", data_root, nan=True)
    cfg = tiny_cfg(tmp_path, data_root, base=base, tokenizer=None, eval_every=1)
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 1"):
        train(cfg, progress=False)
    assert not (Path(cfg.out) / "last").exists() and not (Path(cfg.out) / "best").exists()


def test_auc_undefined_is_said_not_crashed(tmp_path, data_root, capsys):
    from data.fewshot import load_domain

    rows = [r for r in load_domain("toy", "test").records if r["output"] == "Yes."][:10]
    f = tmp_path / "pos.json"
    f.write_text(json.dumps(rows))
    from evaluate import main as evaluate_main

    rc = evaluate_main(["--ckpt", "none", "--base", "random:tiny-32k", "--tokenizer",
                        str(data_root / "tokenizer" / "llama" / "tokenizer.model"),
                        "--data", str(f), "--out", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["auc"] is None and "both classes" in res["auc_undefined"]
    assert "AUC undefined" in capsys.readouterr().out


def test_steps_when_shots_below_batch(tmp_path, data_root):
    """K=12 < batch 16: mean mode takes one 12-sample step per epoch; tallrec mode too, but
    scales the loss by micro/batch as HF's Trainer did."""
    from engine.train import step_batches

    cfg = tiny_cfg(tmp_path, data_root, shots=12)
    steps = step_batches(12, cfg, 0, [1] * 12)
    assert len(steps) == 1 and sorted(steps[0]) == list(range(12))
    assert step_batches(12, cfg, 0, [1] * 12) == steps  # seeded
    assert step_batches(12, cfg, 1, [1] * 12) != steps  # a new order each epoch


def test_help_lists_every_field():
    from dataclasses import fields

    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60).stdout
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out


def test_config_file_and_presets(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"lr": 5e-4, "shots": 16}))
    cfg = config_from_args(["--stage", "rt", "--config", str(f), "--shots", "32"])
    assert cfg.lr == 5e-4 and cfg.shots == 32 and cfg.micro_batch_size == 32
    it = config_from_args(["--stage", "it"])
    assert (it.lr, it.batch_size, it.cutoff_len, it.epochs) == (3e-4, 128, 256, 3)
    with pytest.raises(ValueError, match="--domain"):
        config_from_args(["--domain", "music"])


def test_help_groups_flags_and_shows_the_stage_defaults():
    from engine.config import build_parser, stage_of

    assert stage_of(["--lr", "1", "--stage", "it"]) == "it" and stage_of([]) == "rt"
    assert stage_of(["--stage=it"]) == "it"
    for stage, lr in (("rt", "0.0001"), ("it", "0.0003")):
        text = " ".join(build_parser(stage).format_help().split())
        assert f"--lr LR peak learning rate (AdamW) (default: {lr})" in text
        for group in ("model:", "LoRA:", "data:", "optimisation:", "evaluation:", "execution:"):
            assert group in text
    text = build_parser("rt").format_help()
    for flag, values in (("--stage", "{it,rt}"), ("--domain", "{movie,book,both,toy}"),
                         ("--lr-schedule", "{linear,cosine,constant}"),
                         ("--device", "{auto,cpu,cuda}"), ("--precision", "{auto,fp32,bf16,fp16}")):
        assert f"{flag} {values}" in text
    assert "(default: None)" not in text
