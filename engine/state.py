"""Run folders that survive a crash at any moment.

Every checkpoint folder is written beside its target under a temporary name and renamed into
place, so a reader sees the old folder or the new one, never half of one. A kill between
the two renames leaves `.NAME.old`, which `find_dir` falls back to.

Layout of a run folder:
  config.json       the effective TrainConfig
  metrics.jsonl     one JSON line per logged step / validation
  last/             adapter + trainer_state.pt (optimizer, RNG, step, data position)
  best/             adapter of the best validation score + best.json
  result.json       written when the run ends
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import torch

_FAULT_COUNTS: dict[str, int] = {}


def fault_point(point: str):
    """Fault injection for tests: TALLREC_KILL_AT=<point>[:<n>] SIGKILLs the process the n-th
    time (default first) it passes <point>."""
    want = os.environ.get("TALLREC_KILL_AT")
    if not want:
        return
    name, _, nth = want.partition(":")
    if name == point:
        _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
        if _FAULT_COUNTS[point] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _fsync_tree(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_dir(target: Path, write: Callable[[Path], None]):
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_tree(tmp)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    fault_point(f"swap-{target.name}")
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def find_dir(target: Path) -> Path | None:
    """The committed folder, or the previous one if a crash hit between the renames."""
    if target.is_dir():
        return target
    old = target.parent / f".{target.name}.old"
    return old if old.is_dir() else None


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped, since the
    resumed run will log those steps again."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, **record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def prepare_out_dir(out: Path, resume: bool, overwrite: bool):
    if resume:
        if not (out / "config.json").is_file():
            raise FileNotFoundError(f"--resume: {out} holds no run (no config.json)")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue "
                                  f"that run, --overwrite to replace it, or another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
