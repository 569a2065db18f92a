"""Hugging Face folders: `config.json` + `model.safetensors`, sharded safetensors with
`model.safetensors.index.json`, or `pytorch_model*.bin` (loaded with weights_only=True)."""

import json
from pathlib import Path

import torch

from model.config import ConfigError, LlamaConfig
from model.formats import CheckpointError

SKIP = ("rotary_emb.inv_freq",)


def config_from_hf(path: str | Path) -> LlamaConfig:
    """Read a Hugging Face `config.json` of a LLaMA-architecture model."""
    path = Path(path)
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config.json ({e})") from e
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "llama") not in ("llama", "mistral") and \
            "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ConfigError(f"{path}: model_type {hf.get('model_type')!r} is not a LLaMA model")
    # transformers >= 5 nests rope settings in `rope_parameters`; older files keep them flat.
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                         else None)
    if scaling:
        raise ConfigError(f"{path}: rope scaling {scaling} is not supported")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        return LlamaConfig(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            hidden_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
            tie_embeddings=hf.get("tie_word_embeddings", False), head_dim=hf.get("head_dim"),
        )
    except KeyError as e:
        raise ConfigError(f"{path}: missing key {e} in config.json") from e
    except (ConfigError, TypeError, AttributeError) as e:
        raise ConfigError(f"{path}: {e}") from e


def config_to_hf(cfg: LlamaConfig) -> dict:
    """The `config.json` transformers needs to build the same model."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }


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
    files = _weight_files(folder)
    _check_headers(files)
    return cfg, _iter_tensors(files)


def _check_headers(files):
    """Read each safetensors header now (bytes, not weights), so a damaged file fails
    before a model is built."""
    from safetensors import SafetensorError, safe_open

    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") \
                    from None


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
