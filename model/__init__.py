"""The LLaMA model and everything that reads or writes it; imports kernels/ (the fused LoRA
path) and the leaf paths.py, never data/ or engine/.

config.py (LlamaConfig, presets, DEFAULT_BASE) · llama.py (the model) · lora.py (LoRA layers,
built in when the model is built) · adapter.py (PEFT-format adapter files) · checkpoint.py
(`load_base`: a base spec to a filled model and its tokenizer) · formats/ (HF, Meta and GGUF
readers, each with its own config reader) · tokenizer.py (SentencePiece and byte-level BPE).
"""

from model.checkpoint import load_base, probe_base
from model.config import DEFAULT_BASE, PRESETS, LlamaConfig
from model.formats import CheckpointError
from model.llama import Llama
from model.lora import LoRAConfig
from model.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["DEFAULT_BASE", "PRESETS", "CheckpointError", "Llama", "LlamaConfig", "LoRAConfig",
           "Tokenizer", "TokenizerError", "load_base", "load_tokenizer", "probe_base"]
