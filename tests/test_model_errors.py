"""Every bad base-model input gets one clear error naming the file and the problem."""

import json

import pytest
import torch

from model import CheckpointError, LlamaConfig, TokenizerError, load_base
from model.config import ConfigError
from tests.model_fixtures import hf_reference, write_gguf, write_hf, write_meta

CFG = LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64,
                  max_seq_len=32)


@pytest.fixture(scope="module")
def hf():
    return hf_reference(CFG)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_base(tmp_path / "nope")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_base(tmp_path)


def test_config_without_weights(tmp_path, hf):
    hf.config.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_base(tmp_path)


def test_truncated_safetensors(tmp_path, hf):
    folder = write_hf(hf, tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
        load_base(folder)


def test_truncated_gguf(tmp_path, hf):
    path = write_gguf(hf, CFG, tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="m.gguf.*corrupt or truncated"):
        load_base(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"this is not gguf at all" * 10)
    with pytest.raises(CheckpointError, match="m.gguf"):
        load_base(path)


def test_config_weights_shape_mismatch(tmp_path, hf):
    folder = write_hf(hf, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor layers.0.mlp.*has shape"):
        load_base(folder)


@pytest.mark.parametrize("qtype", ["Q5_0", "Q4_K", "Q6_K"])
def test_unsupported_gguf_quantization(tmp_path, hf, qtype):
    path = write_gguf(hf, CFG, tmp_path / "m.gguf",
                      raw_override={"blk.0.attn_q.weight": qtype})
    with pytest.raises(CheckpointError, match=f"blk.0.attn_q.weight uses GGUF type {qtype}"):
        load_base(path)


def test_tokenizer_vocab_mismatch(tmp_path, hf, data_root):
    folder = write_hf(hf, tmp_path)
    (folder / "tokenizer.model").write_bytes(
        (data_root / "tokenizer" / "llama" / "tokenizer.model").read_bytes())
    with pytest.raises(TokenizerError, match="32000 tokens but the model's vocabulary is 64"):
        load_base(folder)


def test_meta_checkpoint_with_pickled_object_is_refused(tmp_path, hf):
    folder = write_meta(hf, CFG, tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"tok_embeddings.weight": torch.zeros(64, 32), "x": Evil()},
               folder / "consolidated.00.pth", pickle_protocol=2)
    with pytest.raises(CheckpointError, match="consolidated.00.pth: cannot load as a weights-only"):
        load_base(folder)


def test_missing_tensor(tmp_path, hf):
    from safetensors.torch import load_file, save_file

    folder = write_hf(hf, tmp_path)
    state = load_file(folder / "model.safetensors")
    state.pop("model.norm.weight")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 tensors.*norm.weight"):
        load_base(folder)


def test_unknown_preset_and_bad_config():
    with pytest.raises(ConfigError, match="unknown model preset 'llama-99b'"):
        load_base("random:llama-99b")
    with pytest.raises(ConfigError, match="dim must be a positive integer"):
        LlamaConfig(dim=-1)
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
