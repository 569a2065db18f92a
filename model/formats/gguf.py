"""GGUF files (llama.cpp): metadata, tokenizer and tensors, dequantized with the `gguf`
package. llama.cpp stores q/k in Meta's interleaved rotary layout; we permute them back."""

from pathlib import Path

import numpy as np
import torch

from kernels.quant_reference import QWeight, check_shape
from model.config import ConfigError, LlamaConfig
from model.formats import CheckpointError, permute_rotary
from model.quant import is_quantizable

# Each type here is tested against a file the gguf package itself writes; it cannot write
# K-quants (Q4_K, Q6_K: quantize raises NotImplementedError), so those stay unsupported.
SUPPORTED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

LAYER_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_MAP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


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


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors alike
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file "
                              f"({type(e).__name__}: {e})") from e


def read_gguf_metadata(path: str | Path, reader=None) -> dict:
    reader = reader or _reader(Path(path))
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:  # a malformed field; name it rather than guess a value
            raise CheckpointError(f"{path}: unreadable GGUF metadata field {key!r} ({e})") from e
    return out


def gguf_name(key: str) -> str | None:
    stem, _, suffix = key.rpartition(".")
    if key.startswith("blk."):
        _, i, part = stem.split(".", 2)
        return f"layers.{i}.{LAYER_MAP[part]}.{suffix}" if part in LAYER_MAP else None
    return f"{TOP_MAP[stem]}.{suffix}" if stem in TOP_MAP else None


KEEP_BLOCKS = ("Q8_0", "Q4_0", "Q4_1")  # the block formats --quant gguf trains on directly


def _raw_blocks(t, name: str, path) -> QWeight:
    """A Linear weight's blocks exactly as stored: (out, in/32 · block bytes) uint8 rows."""
    kind = t.tensor_type.name
    if kind not in KEEP_BLOCKS:
        raise CheckpointError(f"{path}: --quant gguf keeps Q8_0/Q4_0/Q4_1 blocks, but {t.name} "
                              f"is {kind}; use --quant int8 or nf4 (re-quantized on load) or "
                              f"--quant none")
    k, n = (int(d) for d in t.shape)  # GGUF lists dims inner first
    check_shape(kind.lower(), n, k, what=f"{path}: {t.name}")
    return QWeight(kind.lower(), n, k, torch.from_numpy(np.array(t.data, copy=True)).reshape(n, -1))


def gguf_linear_format(path: Path) -> str:
    """The block format (q8_0, q4_0, q4_1) of a GGUF file's first decoder Linear weight: what
    the memory planner counts for --quant gguf before the model is loaded."""
    for t in _reader(path).tensors:
        name = gguf_name(t.name)
        if name is not None and is_quantizable(name):
            return t.tensor_type.name.lower()
    raise CheckpointError(f"{path}: no decoder Linear weight found")


def read_gguf(path: Path, keep_blocks: bool = False):
    """-> (config, metadata fields, tensors). With keep_blocks, the decoder's Linear weights
    load as their quantized blocks (kernels.quant_reference.QWeight), not dequantized."""
    from gguf import dequantize

    reader = _reader(path)
    fields = read_gguf_metadata(path, reader)
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: no token_embd.weight tensor; not a LLaMA GGUF")
    vocab = int(tensors["token_embd.weight"].shape[-1])
    try:
        cfg = config_from_gguf(fields, vocab)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing GGUF metadata key {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    cfg.tie_embeddings = "output.weight" not in tensors
    for t in reader.tensors:
        kind = t.tensor_type.name
        if gguf_name(t.name) is not None and kind not in SUPPORTED:
            raise CheckpointError(f"{path}: tensor {t.name} uses GGUF type {kind}, which is not "
                                  f"supported; supported types: {', '.join(SUPPORTED)}")

    def iterate():
        for t in reader.tensors:
            name = gguf_name(t.name)
            if name is None:
                continue

            def load(t=t, name=name):
                if keep_blocks and is_quantizable(name):
                    qw = _raw_blocks(t, name, path)
                    # q/k rows are permuted like the dense weight: a row's blocks move whole.
                    if name.endswith(("q_proj.weight", "k_proj.weight")):
                        heads = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads
                        qw = qw._replace(data=permute_rotary(qw.data, heads).contiguous())
                    return qw
                w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), copy=True))
                w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims inner first
                if name.endswith("q_proj.weight"):
                    w = permute_rotary(w, cfg.n_heads)
                elif name.endswith("k_proj.weight"):
                    w = permute_rotary(w, cfg.n_kv_heads)
                return w

            yield name, load, path

    return cfg, fields, iterate()
