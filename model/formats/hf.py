"""Hugging Face folders: `config.json` + `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model*.bin` (loaded with weights_only=True)."""

import json
from pathlib import Path

import torch

from model.config import config_from_hf
from model.formats import CheckpointError

SKIP = ("rotary_emb.inv_freq",)


def hf_name(key: str) -> str | None:
    """HF key -> ours: drop the `model.` prefix; None for buffers we recompute."""
    if key.endswith(SKIP):
        return None
    return key[len("model."):] if key.startswith("model.") else key


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{folder / index}: not a valid shard index ({e})") from e
            files = [folder / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{folder}: shards listed in {index} are missing: {missing}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(f"{folder}: config.json found but no model.safetensors, sharded "
                          f"safetensors index, or pytorch_model.bin")


def read_hf(folder: Path):
    cfg = config_from_hf(folder / "config.json")
    return cfg, _iter_tensors(_weight_files(folder))


def _iter_tensors(files):
    from safetensors import SafetensorError, safe_open

    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        name = hf_name(key)
                        if name is not None:
                            yield name, (lambda f=f, key=key: f.get_tensor(key)), path
            except SafetensorError as e:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles; keep the cause
                raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint "
                                      f"({type(e).__name__}: {e})") from e
            for key, t in state.items():
                name = hf_name(key)
                if name is not None:
                    yield name, (lambda t=t: t), path
