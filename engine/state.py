"""Run folders that survive a crash at any moment, and never cost a user their files.

Every file and checkpoint folder is written through `fileio` (temporary name, then rename), so
a reader sees the old folder or the new one, never half of one. A kill between the two renames
of a folder leaves `.NAME.old`, which `find_dir` falls back to. `check_out_dir` decides, before
anything is loaded or written, whether `--out` may be used; `prepare_out_dir` then acts on it,
and `--overwrite` only ever replaces a folder that is empty or holds one of our runs.

Layout of a run folder:
  config.json       the effective TrainConfig
  metrics.jsonl     one JSON line per logged step / validation
  last/             adapter + trainer_state.pt (optimizer, RNG, step, data position)
  best/             adapter of the best validation score + best.json
  result.json       written when the run ends
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fileio import (
    append_line,
    atomic_write,
    atomic_write_text,
    make_dir,
    remove_path,
    remove_temps,
)

# What a run folder of ours may hold: the layout above, evaluate.py's results next to it,
# and what an interrupted write leaves behind.
RUN_FILES = {"config.json", "metrics.jsonl", "result.json", "last", "best", ".last.old",
             ".best.old"}


class RunStateError(ValueError):
    """A run folder's config.json or trainer_state.pt that cannot be used; names the file."""


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint's trainer_state.pt."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    best_metric: float | None = None  # val AUC (rt) or -val loss (it): higher is better
    best_step: int | None = None
    bad_evals: int = 0  # validations since the best one
    stopped_early: bool = False
    train_tokens: int = 0


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_trainer_state(path: Path, obj: dict):
    # Serialised in memory, then written through fileio: torch.save straight to a file
    # reports a full disk as a RuntimeError from its zip writer, not as an OSError.
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write(path, buf.getvalue())


def load_trainer_state(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunStateError(f"{path}: missing; the checkpoint folder is incomplete") from None
    except Exception as e:  # torch raises many types for a damaged zip or pickle; keep the cause
        raise RunStateError(f"{path}: corrupt or truncated trainer state "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            ) from None
    keys = ("state", "optimizer", "scaler", "rng")
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise RunStateError(f"{path}: not a trainer state (expected the keys {keys})")
    try:
        obj["state"] = TrainState(**obj["state"])
        if not isinstance(obj["rng"].get("torch"), torch.Tensor) or \
                not isinstance(obj["optimizer"].get("state"), dict):
            raise TypeError("rng or optimizer state of the wrong type")
    except (TypeError, AttributeError) as e:
        raise RunStateError(f"{path}: damaged trainer state ({e})") from None
    return obj


def read_run_config(out: Path) -> dict:
    path = out / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunStateError(f"{out} holds no run (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunStateError(f"{path}: cannot read the run's settings ({e})") from None
    if not isinstance(cfg, dict) or "stage" not in cfg:
        raise RunStateError(f"{path}: not a train.py run configuration")
    return cfg


def _is_ours(name: str) -> bool:
    return name in RUN_FILES or ".tmp-" in name or (name.startswith("eval_")
                                                      and name.endswith(".json"))


def check_out_dir(out: Path, resume: bool, overwrite: bool):
    """Refuse an unusable --out before anything is loaded; writes nothing."""
    if resume:
        if not out.is_dir():
            raise FileNotFoundError(f"--resume: {out} is not a run folder (not found)")
        read_run_config(out)
        return
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; choose another --out")
    above = next((p for p in out.parents if p.exists()), Path("."))
    if not above.is_dir():
        raise NotADirectoryError(f"--out {out}: {above} is a file, not a folder")
    if not os.access(above if not out.exists() else out, os.W_OK):
        raise PermissionError(f"--out {out}: {above if not out.exists() else out} is not "
                              f"writable")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue "
                              f"that run, --overwrite to replace it, or another --out")
    foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p.name))
    if foreign:
        raise FileExistsError(
            f"--overwrite refused: {out} holds {', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}, which no train.py run writes; only an "
            f"empty folder or a previous run is replaced. Move those files or choose another "
            f"--out")
    if not (out / "config.json").is_file():
        raise FileExistsError(f"--overwrite refused: {out} has no config.json, so it is not "
                              f"a train.py run; empty it or choose another --out")
    try:
        read_run_config(out)
    except RunStateError as e:
        raise FileExistsError(f"--overwrite refused: {e}") from None


def prepare_out_dir(out: Path, resume: bool, overwrite: bool):
    """Act on what `check_out_dir` allowed: clear a previous run (--overwrite), create the
    folder, drop what a killed writer left (--resume)."""
    if resume:
        remove_temps(out)
        return
    if overwrite and out.is_dir():
        for p in out.iterdir():
            if _is_ours(p.name):  # checked again: never delete what is not ours
                remove_path(p)
    make_dir(out)


class MetricsLog:
    """Append-only JSONL; on resume, lines past the checkpoint's step are dropped, since the
    resumed run will log those steps again. A line torn by a crash or a full disk is skipped."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            keep = [json.dumps(r) for r in self.read() if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, **record):
        append_line(self.path, json.dumps(record))

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

