"""The one way this project writes files: atomically, 0644, and failing in one line.

A leaf module (standard library only) so that `model/`, `data/`, `engine/` and the CLIs all
write through it without importing each other.

Every file is written beside its target under a temporary name, flushed to disk and renamed
over the target, so a reader (or a killed process) sees the old file or the new one, never
half of one. A folder (a checkpoint) is written the same way as a whole: into `.NAME.tmp-PID`,
then swapped in by two renames; a kill between them leaves `.NAME.old`, which `find_dir`
falls back to. A failed write removes its temporary file or folder and raises `WriteError`,
an OSError whose message is one line: the path and the reason (no space left on device,
read-only file system, not a directory, ...).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

# The mode every written file gets: 0644 under the usual umask 022 (tempfile-style writers,
# safetensors' among them, create 0600 files otherwise).
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK

_FAULT_COUNTS: dict[str, int] = {}


def fault_point(point: str):
    """Fault injection for tests: TALLREC_KILL_AT=<point>[:<n>] SIGKILLs the process the n-th
    time (default first) it passes <point>; TALLREC_FAIL_AT=<point>[:<n>] raises ENOSPC there
    instead, as a full disk would; TALLREC_TERM_AT=<point>[:<n>] sends it SIGTERM, as a
    user's `kill` would. With TALLREC_KILL_RANK=<r>, only torchrun's rank r."""
    if os.environ.get("TALLREC_KILL_RANK", os.environ.get("RANK", "0")) != \
            os.environ.get("RANK", "0"):
        return
    for var in ("TALLREC_KILL_AT", "TALLREC_FAIL_AT", "TALLREC_TERM_AT"):
        want = os.environ.get(var)
        if not want:
            continue
        name, _, nth = want.partition(":")
        if name != point:
            continue
        key = f"{var}={point}"
        _FAULT_COUNTS[key] = _FAULT_COUNTS.get(key, 0) + 1
        if _FAULT_COUNTS[key] != int(nth or 1):
            continue
        if var == "TALLREC_KILL_AT":
            os.kill(os.getpid(), signal.SIGKILL)
        if var == "TALLREC_TERM_AT":
            os.kill(os.getpid(), signal.SIGTERM)
            continue
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), point)


def reason(e: BaseException) -> str:
    """An OS error's cause in words, lower case, without Python's `[Errno N]` decoration."""
    if isinstance(e, WriteError):
        return e.reason
    if isinstance(e, OSError) and e.strerror:
        return e.strerror[0].lower() + e.strerror[1:]
    return str(e) or type(e).__name__


def describe(e: BaseException) -> str:
    """One line for any error a CLI reports: `PATH: reason` for OS errors that name a file."""
    if isinstance(e, OSError) and not isinstance(e, WriteError) and e.filename:
        return f"{e.filename}: {reason(e)}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class WriteError(OSError):
    """A write that failed and was rolled back; `path` is the target, never a temp name."""

    def __init__(self, path: Path | str, cause: BaseException):
        self.path, self.reason = Path(path), reason(cause)
        super().__init__(getattr(cause, "errno", None) or errno.EIO, self.reason, str(path))

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


def remove_path(path: Path):
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # best effort: the caller is already reporting the error that matters


def atomic_write(path: Path | str, data: bytes | str | Callable[[Path], None]):
    """Write `data` (bytes, text, or a function that writes the file at the path it is given)
    to `path` atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if callable(data):
            data(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        fault_point(f"write-{path.name}")
        os.replace(tmp, path)
    except OSError as e:
        remove_path(tmp)
        raise WriteError(path, e) from None
    except BaseException:
        remove_path(tmp)
        raise


def atomic_write_text(path: Path | str, text: str):
    atomic_write(path, text)


def atomic_write_json(path: Path | str, obj, indent: int | None = 2, newline: bool = False):
    atomic_write(path, json.dumps(obj, indent=indent) + ("\n" if newline else ""))


def make_dir(path: Path | str):
    """mkdir -p, failing as a WriteError (e.g. a file where a folder should be)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(path, e) from None
    if not path.is_dir():
        raise WriteError(path, OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)))


def append_line(path: Path | str, line: str):
    """Append one line to a log. A failed append may leave a torn last line: readers of
    append-only logs skip lines that do not parse."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise WriteError(path, e) from None


def _fsync_tree(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_dir(target: Path | str, write: Callable[[Path], None]):
    """Fill a fresh temporary folder with `write(folder)`, then swap it in for `target`."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old"
    try:
        remove_path(tmp)
        tmp.mkdir(parents=True)
        write(tmp)
        _fsync_tree(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, FILE_MODE)
        fault_point(f"write-{target.name}")
        if target.exists():
            remove_path(old)
            os.replace(target, old)
        fault_point(f"swap-{target.name}")
        os.replace(tmp, target)
    except OSError as e:
        remove_path(tmp)
        raise WriteError(target, e) from None  # names the folder, not the temporary one
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(old)


def find_dir(target: Path | str) -> Path | None:
    """The committed folder, or the previous one if a crash hit between the renames."""
    target = Path(target)
    if target.is_dir():
        return target
    old = target.parent / f".{target.name}.old"
    return old if old.is_dir() else None


def remove_temps(folder: Path | str) -> list[Path]:
    """Delete what killed writers left in `folder` (`.NAME.tmp-PID` files and folders)."""
    stale = sorted(Path(folder).glob(".*.tmp-*"))
    for path in stale:
        remove_path(path)
    return stale
