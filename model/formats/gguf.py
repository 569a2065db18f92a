"""GGUF files (llama.cpp): metadata, tokenizer and tensors, read and dequantized here (the
`gguf` package is only the tests' reference). llama.cpp stores q/k in Meta's interleaved
rotary layout; we permute them back."""

import math
import mmap
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from kernels.quant_reference import QWeight, check_shape, dequantize
from model.config import ConfigError, LlamaConfig
from model.formats import CheckpointError, permute_rotary
from model.quant import is_quantizable

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


# -- the file format (github.com/ggml-org/ggml/blob/master/docs/gguf.md), read directly: a
# header, metadata key/values, tensor infos, then aligned tensor data. Parsing it ourselves
# takes ~0.1 s where the gguf package's generic reader took ~3 s on SmolLM2's 49k-token vocab.

GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # metadata value type -> struct format (8 string, 9 array)
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
              16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL",
              21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32",
              27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
# (elements per block, bytes per block) of the types we read. Each is tested against a file
# the gguf package itself writes; it cannot write K-quants (Q4_K, Q6_K: quantize raises
# NotImplementedError), so those stay unsupported.
LAYOUT = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
          "Q4_1": (32, 20)}
SUPPORTED = tuple(LAYOUT)
DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class GGUFTensor(NamedTuple):
    name: str
    kind: str  # GGML type name, e.g. "Q4_1" ("type 99" for one we do not know)
    dims: tuple[int, ...]  # as GGUF lists them: innermost first
    offset: int  # absolute byte offset of its data in the file

    @property
    def shape(self) -> tuple[int, ...]:  # torch order
        return tuple(reversed(self.dims))


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> int/float/bool/str or a list of them) and
    tensor index (`tensors`), with the data memory-mapped and read per tensor (`raw`)."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"GGUF file not found: {path}")
        try:
            with open(path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except (ValueError, struct.error, UnicodeDecodeError, OverflowError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated GGUF file "
                                  f"({type(e).__name__}: {e})") from None

    def _take(self, n: int) -> bytes:
        b = self._map[self._pos:self._pos + n]
        if len(b) != n:
            raise ValueError(f"ends at byte {len(self._map)}, inside a {n}-byte item at "
                             f"{self._pos}")
        self._pos += n
        return b

    def _unpack(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        return self._take(self._unpack("<Q")).decode("utf-8")

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype != 9:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, count = self._unpack("<I"), self._unpack("<Q")
        if etype in _SCALARS:  # numbers: one frombuffer, not `count` unpacks
            dt = np.dtype(_SCALARS[etype].replace("?", "u1"))
            a = np.frombuffer(self._take(count * dt.itemsize), dtype=dt)
            return (a != 0).tolist() if etype == 7 else a.tolist()
        return [self._value(etype) for _ in range(count)]

    def _parse(self):
        self._pos = 0
        if self._take(4) != GGUF_MAGIC:
            raise ValueError("no GGUF magic at the start")
        version = self._unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (readable: 2, 3)")
        n_tensors, n_fields = self._unpack("<Q"), self._unpack("<Q")
        self.fields = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            kind = self._unpack("<I")
            infos.append((name, GGML_TYPES.get(kind, f"type {kind}"), dims, self._unpack("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        self.tensors = [GGUFTensor(n, k, d, start + o) for n, k, d, o in infos]
        for t in self.tensors:
            if t.kind in LAYOUT and t.offset + self.nbytes(t) > len(self._map):
                raise ValueError(f"tensor {t.name} runs past the end of the file")

    @staticmethod
    def nbytes(t: GGUFTensor) -> int:
        per, size = LAYOUT[t.kind]
        return math.prod(t.dims) // per * size

    def raw(self, t: GGUFTensor) -> np.ndarray:
        """A copy of the tensor's bytes, uint8, one row per innermost-dimension row."""
        a = np.frombuffer(self._map, np.uint8, self.nbytes(t), t.offset).copy()
        return a.reshape(math.prod(t.shape[:-1]), -1)


def read_gguf_metadata(path: str | Path) -> dict:
    return GGUFFile(Path(path)).fields


def dequantize_tensor(f: GGUFFile, t: GGUFTensor) -> torch.Tensor:
    """A tensor's values in torch order: F32/F16/BF16 as stored, block types in fp32."""
    raw = torch.from_numpy(f.raw(t))
    if t.kind in DENSE:
        return raw.view(DENSE[t.kind]).reshape(t.shape)
    n, k = math.prod(t.shape[:-1]), t.shape[-1]
    return dequantize(QWeight(t.kind.lower(), n, k, raw)).reshape(t.shape)


def gguf_name(key: str) -> str | None:
    stem, _, suffix = key.rpartition(".")
    if key.startswith("blk."):
        _, i, part = stem.split(".", 2)
        return f"layers.{i}.{LAYER_MAP[part]}.{suffix}" if part in LAYER_MAP else None
    return f"{TOP_MAP[stem]}.{suffix}" if stem in TOP_MAP else None


KEEP_BLOCKS = ("Q8_0", "Q4_0", "Q4_1")  # the block formats --quant gguf trains on directly


def _raw_blocks(f: GGUFFile, t: GGUFTensor, path) -> QWeight:
    """A Linear weight's blocks exactly as stored: (out, in/32 · block bytes) uint8 rows."""
    kind = t.kind
    if kind not in KEEP_BLOCKS:
        raise CheckpointError(f"{path}: --quant gguf keeps Q8_0/Q4_0/Q4_1 blocks, but {t.name} "
                              f"is {kind}; use --quant int8 or nf4 (re-quantized on load) or "
                              f"--quant none")
    n, k = t.shape
    check_shape(kind.lower(), n, k, what=f"{path}: {t.name}")
    return QWeight(kind.lower(), n, k, torch.from_numpy(f.raw(t)))


def gguf_linear_format(path: Path) -> str:
    """The block format (q8_0, q4_0, q4_1) of a GGUF file's first decoder Linear weight: what
    the memory planner counts for --quant gguf before the model is loaded."""
    for t in GGUFFile(path).tensors:
        name = gguf_name(t.name)
        if name is not None and is_quantizable(name):
            return t.kind.lower()
    raise CheckpointError(f"{path}: no decoder Linear weight found")


def read_gguf(path: Path, keep_blocks: bool = False):
    """-> (config, metadata fields, tensors). With keep_blocks, the decoder's Linear weights
    load as their quantized blocks (kernels.quant_reference.QWeight), not dequantized."""
    reader = GGUFFile(path)
    fields = reader.fields
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: no token_embd.weight tensor; not a LLaMA GGUF")
    vocab = tensors["token_embd.weight"].shape[0]
    try:
        cfg = config_from_gguf(fields, vocab)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing GGUF metadata key {e}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    cfg.tie_embeddings = "output.weight" not in tensors
    for t in reader.tensors:
        kind = t.kind
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
                    qw = _raw_blocks(reader, t, path)
                    # q/k rows are permuted like the dense weight: a row's blocks move whole.
                    if name.endswith(("q_proj.weight", "k_proj.weight")):
                        heads = cfg.n_heads if name.endswith("q_proj.weight") else cfg.n_kv_heads
                        qw = qw._replace(data=permute_rotary(qw.data, heads).contiguous())
                    return qw
                w = dequantize_tensor(reader, t)
                if name.endswith("q_proj.weight"):
                    w = permute_rotary(w, cfg.n_heads)
                elif name.endswith("k_proj.weight"):
                    w = permute_rotary(w, cfg.n_kv_heads)
                return w

            yield name, load, path

    return cfg, fields, iterate()
