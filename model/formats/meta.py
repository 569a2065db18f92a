"""Meta's original layout: `params.json` + `consolidated.NN.pth` model-parallel shards, with
`tokenizer.model` beside them or one folder up. Loaded with weights_only=True and mmap, so
shards are read lazily and no pickled object is ever executed."""

import json
from pathlib import Path

import torch

from model.config import LlamaConfig
from model.formats import CheckpointError, permute_rotary

# Meta name -> (our name, dim along which model-parallel shards are concatenated, or None).
LAYER_MAP = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
TOP_MAP = {"tok_embeddings.weight": ("embed_tokens.weight", 1),
           "norm.weight": ("norm.weight", None), "output.weight": ("lm_head.weight", 0)}


def config_from_meta(params: dict, vocab_size: int | None = None) -> LlamaConfig:
    """Read Meta's `params.json`; its hidden size is derived from `multiple_of`."""
    dim = params["dim"]
    hidden = int(2 * (4 * dim) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        vocab = vocab_size
    return LlamaConfig(
        dim=dim, n_layers=params["n_layers"], n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"), hidden_dim=hidden, vocab_size=vocab,
        max_seq_len=params.get("max_seq_len", 2048), norm_eps=params.get("norm_eps", 1e-6),
        rope_theta=params.get("rope_theta", 10000.0),
    )


def meta_name(key: str):
    if key.startswith("layers."):
        _, i, rest = key.split(".", 2)
        if rest in LAYER_MAP:
            name, dim = LAYER_MAP[rest]
            return f"layers.{i}.{name}", dim
    if key in TOP_MAP:
        return TOP_MAP[key]
    return None, None


def read_meta(folder: Path):
    try:
        params = json.loads((folder / "params.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder / 'params.json'}: cannot read ({e})") from e
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: params.json found but no consolidated.*.pth shards")
    shards = []
    for path in files:
        try:
            shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch raises many types for bad pickles; keep the cause
            raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint "
                                  f"({type(e).__name__}: {e})") from e
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{files[0]}: no tok_embeddings.weight; not a LLaMA checkpoint")
    vocab = shards[0]["tok_embeddings.weight"].shape[0]
    cfg = config_from_meta(params, vocab_size=vocab)
    return cfg, _iter_tensors(shards, files, cfg)


def _iter_tensors(shards, files, cfg):
    for key in shards[0]:
        name, dim = meta_name(key)
        if name is None:
            continue  # rope.freqs and other buffers we recompute

        def load(key=key, name=name, dim=dim):
            parts = [s[key] for s in shards]
            t = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            if name.endswith("q_proj.weight"):
                t = permute_rotary(t, cfg.n_heads)
            elif name.endswith("k_proj.weight"):
                t = permute_rotary(t, cfg.n_kv_heads)
            return t

        yield name, load, files[0]
