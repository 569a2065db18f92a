"""Where the shared data and the download cache live.

The real data (TALLRec splits, MovieLens, Alpaca, tokenizers, stories260K) is never copied
into the repo: it is read from `--data-root`, else $TALLREC_DATA, else `../shared/data`
beside the project root.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_data_root() -> Path:
    env = os.environ.get("TALLREC_DATA")
    if env:
        return Path(env)
    return PROJECT_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """Download cache (the default base model's wheel, MovieLens zips)."""
    env = os.environ.get("TALLREC_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "tallrec"
    path.mkdir(parents=True, exist_ok=True)
    return path
