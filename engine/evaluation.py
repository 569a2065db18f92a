"""Finding what `evaluate.py --ckpt` points at: a run folder, an adapter folder, or none."""

from __future__ import annotations

import json
from pathlib import Path

from engine.state import find_dir
from model.adapter import read_adapter_config


def resolve_checkpoint(ckpt: str):
    """-> (adapter folder or None, the run's config dict or None, LoRAConfig or None, base)."""
    if ckpt == "none":
        return None, None, None, None
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt {path} not found (a run folder from train.py, an "
                                f"adapter folder, or 'none')")
    run_cfg = None
    if (path / "adapter_config.json").is_file():
        adapter = path
        cfg_file = path.parent / "config.json"
    else:
        adapter = find_dir(path / "best") or find_dir(path / "last")
        cfg_file = path / "config.json"
        if adapter is None:
            raise FileNotFoundError(f"--ckpt {path}: no adapter_config.json, and no best/ or "
                                    f"last/ checkpoint inside (did the run save one yet?)")
    if cfg_file.is_file():
        run_cfg = json.loads(cfg_file.read_text())
    lora_cfg, base = read_adapter_config(adapter)
    return adapter, run_cfg, lora_cfg, base
