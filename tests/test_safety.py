"""A user's files are never lost, a bad start fails before the model is loaded and writes
nothing, and user or OS errors are one line (issue 13)."""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest

import fileio
from engine.config import config_from_args
from engine.train import TrainingError, train
from fileio import WriteError, atomic_write, atomic_write_dir, make_dir
from tests.test_engine import assert_same_adapter, tiny_cfg


@pytest.fixture(autouse=True)
def _fresh_faults(monkeypatch):
    monkeypatch.setattr(fileio, "_FAULT_COUNTS", {})


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the checks must all come first."""
    import engine.train

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the checks")

    monkeypatch.setattr(engine.train, "load_base", refuse)


# -- the writer -------------------------------------------------------------------------------

def test_atomic_write_full_disk_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "train.json"
    target.write_text("old")
    monkeypatch.setenv("TALLREC_FAIL_AT", "write-train.json")
    with pytest.raises(WriteError) as e:
        atomic_write(target, "new")
    assert str(e.value) == f"cannot write {target}: no space left on device"
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["train.json"]


def test_write_into_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(WriteError, match=r"cannot write .*f/sub: not a directory$"):
        make_dir(tmp_path / "f" / "sub")
    with pytest.raises(WriteError, match=r"cannot write .*f/x.json: not a directory$"):
        atomic_write(tmp_path / "f" / "x.json", "{}")


def test_failed_folder_write_keeps_the_old_folder(tmp_path):
    atomic_write_dir(tmp_path / "last", lambda d: (d / "a").write_text("1"))

    def fails(d):
        (d / "a").write_text("2")
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with pytest.raises(WriteError, match=r"last: read-only file system$"):
        atomic_write_dir(tmp_path / "last", fails)
    assert (tmp_path / "last" / "a").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["last"]  # no .last.tmp-PID left behind


def test_written_files_are_0644(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, epochs=1, max_steps=1)
    train(cfg, progress=False)
    want = fileio.FILE_MODE
    files = [p for p in Path(cfg.out).rglob("*") if p.is_file()]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == \
        {p.name: want for p in files}


# -- validate, then touch the disk ------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    dict(shots=5000),  # the toy pool holds fewer rows
    dict(base="missing.gguf"),
    dict(data_root="/nonexistent", domain="movie"),
    dict(init_adapter="/nonexistent/adapter"),
    dict(memory_budget="1KiB"),
])
def test_bad_start_fails_before_loading_and_writes_nothing(tmp_path, data_root, no_model_load,
                                                           bad):
    cfg = replace(tiny_cfg(tmp_path, data_root), **bad)
    with pytest.raises((ValueError, OSError)):
        train(cfg, progress=False)
    assert not Path(cfg.out).exists()  # so the corrected command runs as it is


def test_garbage_base_with_overwrite_keeps_a_users_files(tmp_path, data_root, no_model_load):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    cfg = tiny_cfg(tmp_path, data_root, base=str(tmp_path / "x.gguf"), overwrite=True)
    Path(cfg.out).mkdir()
    (Path(cfg.out) / "important.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="--overwrite refused: .* holds important.txt"):
        train(cfg, progress=False)
    assert (Path(cfg.out) / "important.txt").read_text() == "precious"
    (Path(cfg.out) / "important.txt").unlink()  # an empty folder: now the base is what fails
    with pytest.raises(ValueError, match="x.gguf"):
        train(cfg, progress=False)


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, data_root, no_model_load):
    cfg = tiny_cfg(tmp_path, data_root, overwrite=True)
    out = Path(cfg.out)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))  # looks like a run, but
    (out / "important.txt").write_text("precious")  # holds something no run writes
    with pytest.raises(FileExistsError, match=r"--overwrite refused: .* holds important.txt"):
        train(cfg, progress=False)
    assert (out / "important.txt").read_text() == "precious"


def test_overwrite_replaces_a_previous_run(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, epochs=1, max_steps=1)
    train(cfg, progress=False)
    (Path(cfg.out) / "eval_toy_test.json").write_text("{}")  # evaluate.py's, also ours
    again = tiny_cfg(tmp_path, data_root, epochs=1, max_steps=2, overwrite=True)
    assert train(again, progress=False)["steps"] == 2
    assert not (Path(cfg.out) / "eval_toy_test.json").exists()


# -- OS errors while training -------------------------------------------------------------------

def test_full_disk_at_a_checkpoint_keeps_the_last_good_one_and_resume_continues(
        tmp_path, data_root, monkeypatch):
    kw = dict(save_every=2, eval_every=4, epochs=2)
    full = tiny_cfg(tmp_path / "full", data_root, **kw)
    train(full, progress=False)
    cut = tiny_cfg(tmp_path / "cut", data_root, **kw)
    out = Path(cut.out)
    monkeypatch.setenv("TALLREC_FAIL_AT", "write-last:2")  # the 2nd save (step 4) fails
    with pytest.raises(TrainingError) as e:
        train(cut, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot write {out / 'last'}: no space left on device; kept the last "
                          f"good checkpoint {out / 'last'}")
    assert msg.endswith(f"then run python train.py --out {out} --resume")
    assert not list(out.glob(".*tmp*"))  # no temp folder left behind
    monkeypatch.delenv("TALLREC_FAIL_AT")
    train(tiny_cfg(tmp_path / "cut", data_root, resume=True, **kw), progress=False)
    assert_same_adapter(Path(full.out) / "last", out / "last")


def test_cli_prints_one_line_for_os_errors(tmp_path, data_root, capsys, monkeypatch):
    from train import main

    cfg = tiny_cfg(tmp_path, data_root, epochs=1)
    monkeypatch.setenv("TALLREC_FAIL_AT", "write-config.json")
    args = ["--config", str(tmp_path / "c.json")]
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "config.json: no space left on device; no checkpoint had been saved yet" in err
    monkeypatch.delenv("TALLREC_FAIL_AT")
    (tmp_path / "c.json").write_text(json.dumps({**cfg.to_dict(), "max_steps": 1}))
    assert main(args) == 0  # the failed start left nothing that blocks the rerun


# -- --resume and the flags ---------------------------------------------------------------------

def test_resume_with_only_out_takes_the_saved_settings(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path, data_root, epochs=1, max_steps=1)
    train(cfg, progress=False)
    resumed = config_from_args(["--resume", "--out", cfg.out])
    assert resumed.to_dict() == {**cfg.to_dict(), "resume": True}
    assert config_from_args(["--resume", "--out", cfg.out, "--max-steps", "3"]).max_steps == 3
    with pytest.raises(ValueError, match=r"settings differ .*: lr \(0\.003 -> 0\.001\), "
                                         r"shots \(48 -> 16\)"):
        config_from_args(["--resume", "--out", cfg.out, "--lr", "1e-3", "--shots", "16"])


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1e-3"], "--lr must be > 0, got -0.001"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--shots", "-2"], "--shots must be >= 1 (or -1), got -2"),
    (["--max-steps", "0"], "--max-steps must be >= 1 (or -1), got 0"),
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
    (["--weight-decay", "inf"], "--weight-decay must be >= 0, got inf"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1), got 1.0"),
    (["--lora-alpha", "-16"], "--lora-alpha must be > 0, got -16.0"),
    (["--memory-budget", "lots"], "--memory-budget: cannot read a size from 'lots'"),
    (["--resume", "--out", "/nonexistent/run"], "/nonexistent/run holds no run"),
])
def test_train_flags_are_checked_in_one_line(argv, message, capsys):
    from train import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_bad_config_file_is_named(tmp_path, capsys):
    from train import main

    f = tmp_path / "cfg.json"
    f.write_text('{"lr": 1e-3,}')
    assert main(["--config", str(f)]) == 2
    assert f"--config {f}: invalid JSON at line 1" in capsys.readouterr().err
    f.write_text('{"lr": "fast"}')
    assert main(["--config", str(f)]) == 2
    assert "--lr must be float, got 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--limit", "-3"], "--limit must be a positive row count or -1 (all), got -3"),
    (["--cutoff-len", "-1"], "--cutoff-len must be >= 1, got -1"),
    (["--data", "EMPTY"], "nothing to score: EMPTY holds no rows"),
    (["--out", "DIR"], "is a folder; give a file name"),
])
def test_evaluate_checks_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    import model
    from evaluate import main

    monkeypatch.setattr(model, "load_base", lambda *a, **k: pytest.fail("model loaded"))
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    argv = [str(empty) if a == "EMPTY" else str(tmp_path) if a == "DIR" else a for a in argv]
    message = message.replace("EMPTY", str(empty))
    assert main(["--ckpt", "none", "--base", "random:tiny", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_prepare_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from data.prepare import main

    (tmp_path / "file").write_text("x")
    assert main(["toy", "--out", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err
    out = tmp_path / "toy"
    assert main(["toy", "--out", str(out)]) == 0
    before = (out / "valid.json").read_bytes()
    monkeypatch.setenv("TALLREC_FAIL_AT", "write-valid.json")
    assert main(["toy", "--out", str(out), "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write {out / 'valid.json'}: no space left on device" in err
    assert (out / "valid.json").read_bytes() == before  # never truncated
    assert sorted(os.listdir(out)) == ["test.json", "train.json", "valid.json"]
