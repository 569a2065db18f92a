from model.checkpoint import load_base, probe_base
from model.config import DEFAULT_BASE, PRESETS, LlamaConfig
from model.formats import CheckpointError
from model.llama import Llama
from model.lora import LoRAConfig
from model.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = ["DEFAULT_BASE", "PRESETS", "CheckpointError", "Llama", "LlamaConfig", "LoRAConfig",
           "Tokenizer", "TokenizerError", "load_base", "load_tokenizer", "probe_base"]
