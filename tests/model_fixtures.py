"""Writers of small random checkpoints in every format we read (test-only; uses transformers
as the reference model, the gguf package's own GGUFWriter, and Meta's rotary layout written
out here, so the loaders are checked against code they do not share)."""

import json
from pathlib import Path

import numpy as np
import torch

from model.config import LlamaConfig
from model.formats.hf import config_to_hf


def hf_reference(cfg: LlamaConfig, seed: int = 0):
    """A transformers LlamaForCausalLM with random weights, norms included."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(HFConfig(**config_to_hf(cfg))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # ones would hide a norm-weight mix-up
    return hf


def write_hf(hf, folder: Path, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        hf.save_pretrained(folder, safe_serialization=True)
        return folder
    from safetensors.torch import save_file

    hf.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


META_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
# dim along which Meta splits each tensor across model-parallel shards
META_SPLIT = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1,
              "tok_embeddings": 1, "output": 0}


def to_meta_rotary(w, n_heads: int):
    """HF's half-split q/k rows -> Meta's interleaved rows, one row at a time: RoPE rotates
    HF's pair (i, i + hd/2) of each head, which Meta stores as rows (2i, 2i + 1). llama.cpp's
    converter writes GGUF q/k in this same layout. Written out as an index list, not as the
    reshape/transpose the loaders use."""
    hd = w.shape[0] // n_heads
    rows = [h * hd + j // 2 + (j % 2) * (hd // 2) for h in range(n_heads) for j in range(hd)]
    return w[rows]


def layer_tensor(key: str, v, cfg: LlamaConfig):
    """HF `layers.<i>.<module>.<leaf>` -> (i, module, leaf, tensor in Meta's rotary layout)."""
    _, i, rest = key.split(".", 2)
    mod, _, leaf = rest.rpartition(".")
    if mod == "self_attn.q_proj":
        v = to_meta_rotary(v, cfg.n_heads)
    elif mod == "self_attn.k_proj":
        v = to_meta_rotary(v, cfg.n_kv_heads)
    return i, mod, leaf, v


def write_meta(hf, cfg: LlamaConfig, folder: Path, shards: int = 1) -> Path:
    """Meta's layout: interleaved rotary q/k, Meta names, model-parallel shards."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("model.")
        if k == "embed_tokens.weight":
            state["tok_embeddings.weight"] = v
            if cfg.tie_embeddings:
                state["output.weight"] = v  # Meta checkpoints always carry output.weight
            continue
        if k == "lm_head.weight":
            if not cfg.tie_embeddings:
                state["output.weight"] = v
            continue
        if k == "norm.weight":
            state[k] = v
            continue
        i, mod, leaf, v = layer_tensor(k, v, cfg)
        state[f"layers.{i}.{META_NAMES[mod]}.{leaf}"] = v
    state["rope.freqs"] = torch.zeros(cfg.head_dim // 2)
    for s in range(shards):
        part = {}
        for k, v in state.items():
            short = k.split(".")[-2] if k.startswith("layers.") else k.split(".")[0]
            dim = META_SPLIT.get(short)
            part[k] = v.clone() if dim is None else v.chunk(shards, dim=dim)[s].clone()
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
              "n_kv_heads": cfg.n_kv_heads, "norm_eps": cfg.norm_eps, "vocab_size": -1,
              "multiple_of": 1, "rope_theta": cfg.rope_theta, "max_seq_len": cfg.max_seq_len}
    # multiple_of=1 plus ffn_dim_multiplier reproduces any hidden size exactly
    params["ffn_dim_multiplier"] = (cfg.hidden_dim + 0.5) / int(2 * 4 * cfg.dim / 3)
    (folder / "params.json").write_text(json.dumps(params))
    return folder


def write_gguf(hf, cfg: LlamaConfig, path: Path, qtype: str = "F32", raw_override=None) -> Path:
    """llama.cpp's layout: GGUF names, interleaved rotary q/k, optional quantization."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    names = {v: k for k, v in {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}.items()}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("model.")
        if k == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if k.startswith("layers."):
            i, mod, leaf, v = layer_tensor(k, v, cfg)
            name = f"blk.{i}.{names[mod]}.{leaf}"
        else:
            name = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[k]
        arr = v.float().numpy()
        kind = qtype if arr.ndim == 2 else "F32"
        if raw_override and name in raw_override:
            qt = gguf.GGMLQuantizationType[raw_override[name]]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            raw = np.zeros((arr.shape[0], arr.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=qt)
        elif kind == "F32":
            w.add_tensor(name, arr)
        elif kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
