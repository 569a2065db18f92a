"""model/adapter.py: our adapters against peft (both directions), merged export against
transformers, and every bad adapter input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import LlamaConfig, LoRAConfig, load_base
from model.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    export_merged,
    load_adapter,
    read_adapter_config,
    save_adapter,
)
from model.lora import lora_state_dict
from tests.model_fixtures import hf_reference, write_hf
from tests.test_lora import randomize_lora
from tests.test_model import assert_logits_close

CONFIGS = {
    "gqa-untied": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=97),
    "gqa-tied": dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, hidden_dim=80, vocab_size=61,
                     tie_embeddings=True, rope_theta=100000.0, norm_eps=1e-5),
}
LORAS = {  # TALLRec's stage 1 (alpaca-lora) and stage 2 settings, and every target
    "qv-r8": LoRAConfig(r=8, alpha=16, dropout=0.05, targets=["q", "v"]),
    "all-r4": LoRAConfig(r=4, alpha=12, dropout=0.0,
                         targets=["q", "k", "v", "o", "gate", "up", "down"]),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def base(request, tmp_path_factory):
    cfg = LlamaConfig(max_seq_len=64, **CONFIGS[request.param])
    folder = write_hf(hf_reference(cfg, seed=1), tmp_path_factory.mktemp(request.param))
    return cfg, folder


def fresh_hf(cfg):
    return hf_reference(cfg, seed=1)  # peft wraps the model in place: one per use


def assert_adapter_matters(model, ids, ref):
    """The adapter moves the logits far more than the tolerance, so a dropped or misplaced
    adapter tensor cannot pass."""
    plain = model(ids)
    model_state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with torch.no_grad():
        for k, v in lora_state_dict(model).items():
            if k.endswith("lora_b"):
                v.zero_()
        diff = (model(ids) - ref).abs().max() / ref.abs().max()
        model.load_state_dict(model_state, strict=False)
    assert diff > 1e-2, f"adapter changes logits by only {diff:.2e}"
    torch.testing.assert_close(model(ids), plain, rtol=0, atol=0)


@pytest.mark.parametrize("lora", list(LORAS))
def test_our_adapter_loads_in_peft(base, lora, tmp_path):
    from peft import PeftModel

    cfg, folder = base
    model, _ = load_base(folder, lora=LORAS[lora])
    randomize_lora(model, seed=2)
    model.eval()
    save_adapter(model, tmp_path / "ad", base_name=str(folder))
    written = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert written["base_model_name_or_path"] == str(folder)
    assert not list((tmp_path / "ad").glob("*.tmp"))
    peft_model = PeftModel.from_pretrained(fresh_hf(cfg), tmp_path / "ad").eval()
    assert peft_model.peft_config["default"].r == LORAS[lora].r
    ids = torch.randint(0, cfg.vocab_size, (2, 15))
    with torch.no_grad():
        ref = peft_model(ids).logits
        assert_logits_close(model(ids), ref)
        assert_adapter_matters(model, ids, ref)


@pytest.mark.parametrize("lora", list(LORAS))
def test_peft_adapter_loads_here(base, lora, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg, folder = base
    want = LORAS[lora]
    peft_cfg = LoraConfig(r=want.r, lora_alpha=want.alpha, lora_dropout=want.dropout,
                          target_modules=[f"{t}_proj" for t in want.targets], bias="none",
                          task_type="CAUSAL_LM")
    peft_model = get_peft_model(fresh_hf(cfg), peft_cfg)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(tmp_path / "ad")
    peft_model.eval()

    lora_cfg, base_name = read_adapter_config(tmp_path / "ad")
    assert (lora_cfg.r, lora_cfg.alpha, lora_cfg.targets) == (want.r, want.alpha, want.targets)
    model, _ = load_base(folder, lora=lora_cfg)
    load_adapter(model, tmp_path / "ad")
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 15))
    with torch.no_grad():
        ref = peft_model(ids).logits
        assert_logits_close(model(ids), ref)
        assert_adapter_matters(model, ids, ref)


def test_alpaca_lora_bin_layout(tmp_path):
    """TALLRec's stage-1 adapter as alpaca-lora wrote it: old peft config fields, fp16 tensors
    in adapter_model.bin."""
    model, _ = load_base("random:tiny", lora=LoRAConfig(r=8, alpha=16, targets=["q", "v"]))
    folder = tmp_path / "alpaca-lora"
    folder.mkdir()
    (folder / ADAPTER_CONFIG).write_text(json.dumps({
        "base_model_name_or_path": "decapoda-research/llama-7b-hf", "bias": "none",
        "enable_lora": None, "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 16,
        "lora_dropout": 0.05, "merge_weights": False, "modules_to_save": None,
        "peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"],
        "task_type": "CAUSAL_LM"}))
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in lora_state_dict(model).items():
        module, _, leaf = name.rpartition(".")
        key = f"base_model.model.model.{module}.lora_{leaf[-1].upper()}.weight"
        state[key] = torch.randn(t.shape, generator=gen).half()
    torch.save(state, folder / "adapter_model.bin")
    lora, base_name = read_adapter_config(folder)
    assert (lora.r, lora.alpha, lora.targets) == (8, 16, ["q", "v"])
    assert base_name == "decapoda-research/llama-7b-hf"
    load_adapter(model, folder)
    for name, t in lora_state_dict(model).items():
        module, _, leaf = name.rpartition(".")
        key = f"base_model.model.model.{module}.lora_{leaf[-1].upper()}.weight"
        torch.testing.assert_close(t, state[key].float(), rtol=0, atol=0)


def test_export_merged_loads_here_and_in_transformers(base, tmp_path):
    from transformers import LlamaForCausalLM

    cfg, folder = base
    model, _ = load_base(folder, lora=LORAS["all-r4"])
    randomize_lora(model, seed=5)
    model.eval()
    out = export_merged(model, tmp_path / "merged")
    ids = torch.randint(0, cfg.vocab_size, (2, 15))
    with torch.no_grad():
        ref = model(ids)
        ours, _ = load_base(out)
        assert ours.cfg == cfg and not any(n.endswith("lora_a") for n, _ in
                                           ours.named_parameters())
        assert_logits_close(ours(ids), ref)
        hf = LlamaForCausalLM.from_pretrained(out).eval()
        assert_logits_close(hf(ids).logits, ref)
        assert_adapter_matters(model, ids, ref)
    keys = set(load_file(out / "model.safetensors"))
    assert ("lm_head.weight" in keys) != cfg.tie_embeddings
    assert not any("lora" in k for k in keys)


def test_export_merged_with_tokenizer(data_root, tmp_path):
    model, tok = load_base("stories260k", lora=LoRAConfig(r=2, targets=["q", "v"]))
    randomize_lora(model)
    out = export_merged(model, tmp_path / "merged", tokenizer=tok)
    again, tok2 = load_base(out)
    text = "Once upon a time"
    assert tok2.encode(text) == tok.encode(text)
    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert_logits_close(again(ids), model.eval()(ids))


# --- bad input: one clear error, and no LoRA weight changed --------------------------------

SMALL = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=64,
             max_seq_len=32)
QV = LoRAConfig(r=4, alpha=8, targets=["q", "v"])


def tiny_model(lora=QV, **over):
    from model.llama import Llama

    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**SMALL, **over}), lora)


@pytest.fixture
def adapter(tmp_path):
    model = tiny_model()
    randomize_lora(model)
    return save_adapter(model, tmp_path / "ad", base_name="tiny")


def assert_refused(model, folder, match):
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with pytest.raises(AdapterError, match=match):
        load_adapter(model, folder)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed load"


def test_roundtrip(adapter):
    model = tiny_model()
    load_adapter(model, adapter)
    src = load_file(adapter / ADAPTER_WEIGHTS)
    assert len(src) == 2 * 2 * SMALL["n_layers"]
    for k, v in lora_state_dict(model).items():
        module, _, leaf = k.rpartition(".")
        assert torch.equal(v, src[f"base_model.model.model.{module}.lora_{leaf[-1].upper()}"
                                  f".weight"])


@pytest.mark.parametrize("over, lora, match", [
    (dict(dim=48, n_heads=4), QV, r"shapes .* differ.*other hidden sizes"),
    (dict(n_layers=3), QV, r"4 missing.*layers 0\.\.1, the model 0\.\.2"),
    (dict(n_layers=1), QV, r"4 unexpected.*layers 0\.\.1, the model 0\.\.0"),
    ({}, LoRAConfig(r=4, alpha=8, targets=["q", "k", "v"]),
     r"target modules \['q', 'v'\] \(adapter\) vs \['q', 'k', 'v'\] \(model\)"),
    ({}, LoRAConfig(r=8, alpha=16, targets=["q", "v"]), r"rank r 4 \(adapter\) vs 8 \(model\)"),
    ({}, LoRAConfig(r=4, alpha=16, targets=["q", "v"]), r"lora_alpha 8.* vs 16"),
])
def test_mismatched_base(adapter, over, lora, match):
    assert_refused(tiny_model(lora, **over), adapter, match)


def test_model_without_lora(adapter):
    with pytest.raises(AdapterError, match="no LoRA layers"):
        load_adapter(tiny_model(lora=None), adapter)


def rewrite(folder, edit):
    state = load_file(folder / ADAPTER_WEIGHTS)
    edit(state)
    save_file(state, folder / ADAPTER_WEIGHTS)


def test_missing_key(adapter):
    rewrite(adapter, lambda s: s.pop("base_model.model.model.layers.1.self_attn.v_proj"
                                     ".lora_B.weight"))
    assert_refused(tiny_model(), adapter, r"1 missing \(.*layers\.1\.self_attn\.v_proj\.lora_B")


@pytest.mark.parametrize("key", ["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight",
                                 "base_model.model.lm_head.weight"])
def test_extra_key(adapter, key):
    rewrite(adapter, lambda s: s.__setitem__(key, torch.zeros(4, 32)))
    assert_refused(tiny_model(), adapter, rf"1 unexpected \({key}\)")


def test_config_rank_disagrees_with_tensors(adapter):
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "r": 2, "lora_alpha": 4}))
    assert_refused(tiny_model(LoRAConfig(r=2, alpha=4)), adapter, r"\(4, 32\) vs \(2, 32\)")


def test_corrupt_safetensors(adapter):
    path = adapter / ADAPTER_WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    assert_refused(tiny_model(), adapter, "corrupt or truncated safetensors")


def test_empty_weights_file(adapter):
    save_file({}, adapter / ADAPTER_WEIGHTS)
    assert_refused(tiny_model(), adapter, "holds no tensors")


def test_nan_tensor(adapter):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    rewrite(adapter, lambda s: s[key].fill_(float("nan")))
    assert_refused(tiny_model(), adapter, f"non-finite.*{key}")


def test_missing_files(adapter, tmp_path):
    assert_refused(tiny_model(), tmp_path / "nowhere", "adapter folder not found")
    (adapter / ADAPTER_WEIGHTS).unlink()
    assert_refused(tiny_model(), adapter, "no adapter_model.safetensors or adapter_model.bin")
    (adapter / ADAPTER_CONFIG).unlink()
    assert_refused(tiny_model(), adapter, "no adapter_config.json")


@pytest.mark.parametrize("edit, match", [
    (dict(use_dora=True), r"features .* use_dora=True"),
    (dict(use_rslora=True), "use_rslora"),
    (dict(rank_pattern={"q_proj": 16}), "rank_pattern"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="PREFIX_TUNING"), "'PREFIX_TUNING' is not a LoRA adapter"),
    (dict(target_modules=".*attn.*"), "not a list of module names"),
    (dict(target_modules=["c_attn"]), r"unknown LoRA target modules \['c_attn'\]"),
    (dict(r=0), "rank r must be a positive integer"),
    (dict(lora_alpha=-1), "alpha must be positive"),
])
def test_bad_config(adapter, edit, match):
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    (adapter / ADAPTER_CONFIG).write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(AdapterError, match=match):
        read_adapter_config(adapter)
    assert_refused(tiny_model(), adapter, match)


def test_unreadable_config(adapter):
    (adapter / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: cannot read"):
        read_adapter_config(adapter)


def test_merged_model_refuses_load(adapter):
    from model.lora import merge_lora

    model = tiny_model()
    merge_lora(model)
    assert_refused(model, adapter, "merged; unmerge first")



def test_export_merged_with_bpe_tokenizer(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from model.llama import Llama
    from model.tokenizer import BPETokenizer

    # A small byte-level BPE with special tokens, as SmolLM2's (whose GGUF takes seconds to read).
    hf_tok = Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    corpus = ['Whether the user will like "Heat (1995)"?', "Yes", "No", "User Preference:"] * 5
    hf_tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = BPETokenizer(hf_tok, "tiny-bpe", bos_id=1, eos_id=2, pad_id=0)
    cfg = LlamaConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=tok.vocab_size,
                      max_seq_len=32, tie_embeddings=True)
    out = export_merged(Llama(cfg, QV), tmp_path / "merged", tokenizer=tok)
    _, tok2 = load_base(out)
    text = '<|im_start|>user\nWhether the user will like "Heat (1995)"?<|im_end|>\nYes'
    assert tok2.encode(text) == tok.encode(text) and tok.encode(text)[0] == 1
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
