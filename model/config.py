"""Model configuration: a typed dataclass, named presets, and readers for checkpoint metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


class ConfigError(ValueError):
    pass


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None = n_heads (no grouped-query attention)
    hidden_dim: int = 11008  # SwiGLU inner size
    vocab_size: int = 32000
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    head_dim: int | None = None  # None = dim // n_heads

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("norm_eps and rope_theta must be positive")

    @property
    def n_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        embed = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embed + self.dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str) -> LlamaConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])


PRESETS: dict[str, dict] = {
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=2048),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=2048),
    "llama2-7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096,
                      norm_eps=1e-5),
    "llama2-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, max_seq_len=4096,
                       norm_eps=1e-5),
    "llama3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                      vocab_size=128256, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         vocab_size=49152, max_seq_len=8192, norm_eps=1e-5, rope_theta=100000.0,
                         tie_embeddings=True),
    "stories260k": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172,
                        vocab_size=512, max_seq_len=512, norm_eps=1e-5, tie_embeddings=True),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=256,
                 max_seq_len=256, norm_eps=1e-5),
    # tiny, with LLaMA's 32,000-token vocabulary: engine tests pair it with the real tokenizer
    "tiny-32k": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                     vocab_size=32000, max_seq_len=1024, norm_eps=1e-5),
}


def config_from_hf(path: str | Path) -> LlamaConfig:
    """Read a Hugging Face `config.json` of a LLaMA-architecture model."""
    path = Path(path)
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config.json ({e})") from e
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


def config_from_gguf(fields_: dict, vocab_size: int) -> LlamaConfig:
    """Read GGUF metadata (`llama.*` keys), given as a plain dict of key -> value."""
    arch = fields_.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not 'llama'")
    p = "llama."
    n_heads = int(fields_[p + "attention.head_count"])
    dim = int(fields_[p + "embedding_length"])
    rope_dim = fields_.get(p + "rope.dimension_count")
    return LlamaConfig(
        dim=dim, n_layers=int(fields_[p + "block_count"]), n_heads=n_heads,
        n_kv_heads=int(fields_.get(p + "attention.head_count_kv", n_heads)),
        hidden_dim=int(fields_[p + "feed_forward_length"]),
        vocab_size=int(fields_.get(p + "vocab_size", vocab_size)),
        max_seq_len=int(fields_.get(p + "context_length", 2048)),
        norm_eps=float(fields_.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(fields_.get(p + "rope.freq_base", 10000.0)),
        head_dim=int(rope_dim) if rope_dim else None,
    )
