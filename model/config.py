"""Model configuration: a typed dataclass and named presets. Each checkpoint format reads its own
metadata into a `LlamaConfig` in `model/formats/`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


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


# the base model used when none is named: a preset whose weights `model.checkpoint` can fetch
DEFAULT_BASE = "smollm2-135m"

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
