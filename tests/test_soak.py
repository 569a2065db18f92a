"""Soak: a toy run SIGKILLed at 3 seeded random steps (one in each epoch but the last),
resumed each time with only `--resume --out`, ends with the same bytes as an uninterrupted
run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

from engine.train import train
from tests.test_engine import ROOT, _cli, tiny_cfg

FILES = ("last/adapter_model.safetensors", "best/adapter_model.safetensors", "best/best.json")


def test_kill_at_three_random_steps_and_resume_gives_identical_files(tmp_path, data_root):
    kw = dict(epochs=4, save_every=2, eval_every=3)  # 48 shots / 16 = 3 steps an epoch: 12
    full = tiny_cfg(tmp_path / "full", data_root, **kw)
    train(full, progress=False)
    cut = tiny_cfg(tmp_path / "cut", data_root, **kw)
    out = Path(cut.out)
    rng = random.Random(13)
    kills = [rng.randint(3 * e + 1, 3 * e + 3) for e in range(3)]
    argv = _cli(cut)
    for step in kills:
        env = {**os.environ, "TALLREC_KILL_AT": f"step-{step}"}
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == -9, (step, proc.stderr[-2000:])  # really SIGKILLed there
        argv = ["--resume", "--out", str(out)]  # the run's config.json gives the rest
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in FILES:
        assert (out / name).read_bytes() == (Path(full.out) / name).read_bytes(), name
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 13))  # every step logged once, none lost
    assert not list(out.glob(".*"))  # no temporary or half-swapped folder left behind
