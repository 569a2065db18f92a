"""The quantized frozen base (model/quant.py, kernels/quant_reference.py): formats against hand
values and the gguf package, the quantized model against a dense model holding the dequantized
weights and against transformers, the planner's byte counts against a hand count, adapters
trained on a quantized base, and the errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.config import TrainConfig
from engine.memory import PlanError, plan
from kernels.quant_reference import (
    NF4,
    QWeight,
    dequantize,
    dequantize_absmax,
    quantize_int8,
    quantize_nf4,
    storage_bytes,
)
from model import LlamaConfig, load_base
from model.adapter import load_adapter, save_adapter
from model.formats import CheckpointError
from model.lora import LoRAConfig, LoRAError, lora_modules, merge_lora
from model.quant import QuantError, QuantizedWeight, quantized_modules
from tests.model_fixtures import hf_reference, write_gguf, write_hf

# QLoRA appendix E (and bitsandbytes' NF4 table), as published: the code must reproduce them.
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
GQA = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=97)


def test_nf4_code_is_qloras():
    torch.testing.assert_close(NF4, torch.tensor(QLORA_NF4), rtol=0, atol=1e-6)


def test_int8_hand_example():
    qw = quantize_int8(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    # row 0: s = 2/127; 1/s = 63.5 rounds (half to even) to 64, 0.5/s = 31.75 to 32
    assert qw.data.tolist() == [[64, -127, 32, 0], [0, 0, 0, 0]]
    assert qw.scales[0].item() == pytest.approx(2 / 127)
    want = torch.tensor([[64 * 2 / 127, -2.0, 32 * 2 / 127, 0.0], [0.0] * 4])
    torch.testing.assert_close(dequantize(qw), want)


def test_nf4_layout_hand_example():
    codes = torch.arange(64) % 16
    w = (NF4[codes] * 3.0)[None]  # every value on a level; absmax 3
    qw = quantize_nf4(w)
    assert qw.scales.tolist() == [[3.0]]
    # element 2j in the low nibble, 2j + 1 in the high one: bytes 0x10, 0x32, ...
    assert qw.data[0, :3].tolist() == [0x10, 0x32, 0x54]
    torch.testing.assert_close(dequantize(qw), w, rtol=0, atol=0)


def test_nf4_error_bound_and_double_quant():
    w = torch.randn(6, 1024)
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    # Nearest level: the error is at most half the widest gap between levels, times absmax.
    half_gap = (NF4[1:] - NF4[:-1]).max() / 2
    err = (dequantize(plain) - w).abs().reshape(6, 16, 64).amax(-1)
    assert (err <= half_gap * plain.scales + 1e-6).all()
    # Second level: int8 codes of absmax - mean, one scale per 256 blocks (here one group).
    absmax = dequantize_absmax(dq.scales, dq.scales2, dq.offset)
    assert dq.scales.dtype == torch.int8 and dq.scales2.shape == (1,)
    assert (absmax - plain.scales).abs().max() <= dq.scales2.max() / 2 + 1e-6
    assert (dequantize(dq) - w).abs().max() < 1.1 * (dequantize(plain) - w).abs().max()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_gguf_blocks_dequantize_like_the_gguf_package(fmt):
    import gguf

    qt = gguf.GGMLQuantizationType[fmt.upper()]
    raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((7, 96), np.float32), qt)
    ours = dequantize(QWeight(fmt, 7, 96, torch.from_numpy(raw)))
    torch.testing.assert_close(ours, torch.from_numpy(gguf.quants.dequantize(raw, qt)),
                               rtol=0, atol=0)


def test_storage_bytes_count_the_tensors():
    w = torch.randn(24, 640)
    assert quantize_int8(w).nbytes == storage_bytes("int8", 24, 640) == 24 * 640 + 24 * 4
    assert quantize_nf4(w).nbytes == storage_bytes("nf4", 24, 640) == 24 * 320 + 240 * 4
    # 240 blocks: 240 int8 codes and one fp32 second-level scale
    assert quantize_nf4(w, True).nbytes == storage_bytes("nf4", 24, 640, True) == 7680 + 244


def test_planner_weight_bytes_hand_count():
    # LLaMA-7B, per layer: q k v o 4096x4096, gate up 11008x4096, down 4096x11008.
    elems = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # 6,476,005,376 quantized weights
    rows = 32 * (4 * 4096 + 2 * 11008 + 4096)  # fp32 int8 scales, one per output row
    rest = (2 * 32000 * 4096 + 32 * 2 * 4096 + 4096) * 2  # embeddings, lm_head, norms in bf16
    p = dict(lora=LoRAConfig(r=8, targets=["q", "v"]), checkpoint="full")
    assert plan("llama-7b", 512, 8, quant="int8", **p).weights == elems + 4 * rows + rest
    assert plan("llama-7b", 512, 8, quant="nf4", **p).weights == elems // 2 + elems // 16 + rest
    assert plan("llama-7b", 512, 8, quant="q4_1", **p).weights == elems // 32 * 20 + rest
    assert plan("llama-7b", 512, 8, **p).weights == (elems + rest // 2) * 2


def test_planner_matches_the_loaded_model():
    cfg = LlamaConfig.from_preset("tiny")
    for quant in ("int8", "nf4", "nf4-dq"):
        model, _ = load_base("random:tiny", dtype=torch.bfloat16, quant=quant)
        q = sum(m.nbytes for m in quantized_modules(model).values())
        dense = sum(t.numel() * t.element_size() for t in model.parameters())
        assert plan(cfg, 16, 1, quant=quant).weights == q + dense, quant


def test_planner_errors():
    with pytest.raises(PlanError, match="name the file's block format"):
        plan("llama-7b", 512, 8, quant="gguf")
    cfg = LlamaConfig(**{**GQA, "dim": 96})  # 96 is not a multiple of 64
    with pytest.raises(PlanError, match="not divisible by the nf4 block size 64"):
        plan(cfg, 16, 1, quant="nf4")


def _dense_twin(model, lora, dtype=torch.float64):
    """A dense model whose Linear weights are `model`'s dequantized ones (the reference)."""
    twin, _ = load_base("random:tiny", dtype=dtype, lora=lora)
    state = {k: v for k, v in model.state_dict().items() if ".weight.q" not in k}
    for name, m in quantized_modules(model).items():
        state[name] = m.dequantize(dtype)
    twin.load_state_dict(state)
    return twin


def _same_bf16_training_step(model, twin, ids):
    """One bf16-autocast forward/backward with LoRA dropout on each, from the same seed."""
    with torch.no_grad():
        for m in (model, twin):
            torch.manual_seed(5)
            for layer in lora_modules(m).values():
                layer.lora_b.normal_()  # a non-zero adapter: its term reaches the output
    outs, grads = [], []
    for m in (model, twin):
        m.train()
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(ids)
        y.float().square().mean().backward()
        outs.append(y)
        grads.append({n: p.grad for n, p in m.named_parameters() if n.endswith(("lora_a",
                                                                               "lora_b"))})
    assert torch.equal(outs[0], outs[1])
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) == 2 * len(lora_modules(model)) > 0
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_training_step_is_the_dense_step_bit_for_bit(quant):
    """bf16 autocast with LoRA dropout, as the CPU default trains: the LoRA layer over a
    quantized W is the dense layer's path with another base product, so with the same seed
    (the same dropout masks) outputs and adapter gradients equal the dense twin's exactly."""
    lora = LoRAConfig(r=4, dropout=0.1, targets=["q", "v", "down"])
    model, _ = load_base("random:tiny", dtype=torch.bfloat16, lora=lora, quant=quant, seed=3)
    twin = _dense_twin(model, lora, torch.bfloat16)
    _same_bf16_training_step(model, twin, torch.randint(0, 256, (2, 11)))


def test_gguf_blocks_train_bit_for_bit_like_the_dense_load(tmp_path):
    """--quant gguf keeps the file's Q4_1 blocks; the dense load dequantizes the same blocks:
    a bf16 training step with dropout is the same on both, bit for bit."""
    cfg = LlamaConfig(max_seq_len=64, **GQA)
    path = write_gguf(hf_reference(cfg), cfg, tmp_path / "m.gguf", qtype="Q4_1")
    lora = LoRAConfig(r=4, dropout=0.1, targets=["q", "v", "down"])
    model, _ = load_base(path, dtype=torch.bfloat16, lora=lora, quant="gguf")
    twin, _ = load_base(path, dtype=torch.bfloat16, lora=lora)
    assert len(quantized_modules(model)) == 7 * cfg.n_layers and not quantized_modules(twin)
    _same_bf16_training_step(model, twin, torch.randint(0, cfg.vocab_size, (2, 13)))


@pytest.mark.parametrize("quant", ["int8", "nf4", "nf4-dq"])
def test_quantized_model_equals_dense_model_of_dequantized_weights(quant):
    lora = LoRAConfig(r=4, dropout=0.0, targets=["q", "v", "down"])
    model, _ = load_base("random:tiny", dtype=torch.float64, lora=lora, quant=quant, seed=3)
    assert len(quantized_modules(model)) == 2 * 7
    assert all(isinstance(m.weight, QuantizedWeight) for m in lora_modules(model).values())
    assert not any(n.endswith("proj.weight") for n, _ in model.named_parameters())
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_b.normal_()  # a non-zero adapter, so its gradient path is exercised
    twin = _dense_twin(model, lora)
    ids = torch.randint(0, 256, (2, 11))
    outs, grads = [], []
    for m in (model, twin):
        y = m(ids)
        y.square().mean().backward()
        outs.append(y)
        grads.append({n: p.grad for n, p in m.named_parameters() if n.endswith("lora_a")})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 6
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_quant_gguf_keeps_the_file_blocks_and_matches_transformers(qtype, tmp_path):
    import gguf

    cfg = LlamaConfig(max_seq_len=64, **GQA)
    hf = hf_reference(cfg)
    path = write_gguf(hf, cfg, tmp_path / "m.gguf", qtype=qtype)
    model, _ = load_base(path, quant="gguf")
    up = model.layers[1].mlp.up_proj.weight
    assert isinstance(up, QuantizedWeight) and up.fmt == qtype.lower()
    on_disk = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_up.weight")
    assert torch.equal(up.qdata, torch.from_numpy(np.array(on_disk.data)).reshape(96, -1))
    # transformers on the gguf package's round trip of the same weights (q/k rows permuted back)
    qt = gguf.GGMLQuantizationType[qtype]
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(
                    p.numpy(), qt), qt)))
        ids = torch.randint(0, cfg.vocab_size, (2, 13))
        ref = hf(ids).logits
        err = (model(ids) - ref).abs().max() / ref.abs().max().clamp(min=1)
    assert err < 1e-4, err


def test_errors(tmp_path):
    cfg = LlamaConfig(max_seq_len=64, **GQA)
    hf = hf_reference(cfg)
    with pytest.raises(QuantError, match="--quant gguf keeps a GGUF.*random: preset"):
        load_base("random:tiny", quant="gguf")
    folder = write_hf(hf, tmp_path / "hf")
    with pytest.raises(QuantError, match="not a .gguf file; use --quant int8 or nf4"):
        load_base(folder, quant="gguf")
    f32 = write_gguf(hf, cfg, tmp_path / "f32.gguf", qtype="F32")
    with pytest.raises(CheckpointError, match="keeps Q8_0/Q4_0/Q4_1 blocks, but blk.0.attn_q"):
        load_base(f32, quant="gguf")
    odd = LlamaConfig(max_seq_len=64, **{**GQA, "hidden_dim": 80})  # down_proj in = 80
    with pytest.raises(QuantError, match=r"down_proj.weight: in_features 80 is not divisible by "
                                         r"the nf4 block size 64.*--quant int8"):
        load_base(write_hf(hf_reference(odd), tmp_path / "odd"), quant="nf4")
    with pytest.raises(QuantError, match="--quant must be one of"):
        load_base("random:tiny", quant="fp8")
    with pytest.raises(ValueError, match="--quant must be one of"):
        TrainConfig(quant="int4")
    model, _ = load_base("random:tiny", lora=LoRAConfig(r=2), quant="int8")
    with pytest.raises(LoRAError, match="cannot merge LoRA into a quantized base"):
        merge_lora(model)


def test_adapter_from_quantized_base_is_portable(tmp_path, data_root):
    """Train on an int8 base through train(); the adapter is the same PEFT file as a dense
    run's; evaluate.py scores it on the int8 and on the dense base."""
    from engine.train import train
    from evaluate import main as evaluate_main

    tok = str(data_root / "tokenizer" / "llama" / "tokenizer.model")
    common = dict(stage="rt", base="random:tiny-32k", tokenizer=tok, domain="toy", shots=16,
                  val_size=16, lr=3e-3, batch_size=8, micro_batch_size=8, epochs=2,
                  warmup_steps=1, eval_every=2, patience=0, seed=5, device="cpu",
                  precision="fp32", eval_batch_size=16)
    runs = {}
    for quant in ("int8", "none"):
        cfg = TrainConfig(**common, quant=quant, out=str(tmp_path / quant))
        train(cfg, progress=False)
        runs[quant] = tmp_path / quant / "last"
    a, b = (load_file(runs[q] / "adapter_model.safetensors") for q in ("int8", "none"))
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype == torch.float32 for k in a)
    conf = [json.loads((runs[q] / "adapter_config.json").read_text()) for q in ("int8", "none")]
    assert conf[0] == conf[1]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the quantized base changed training
    # the int8-trained adapter loads into a dense and an int8 model alike
    lora = LoRAConfig(r=8, targets=["q", "v"])
    for quant in ("none", "int8"):
        m, _ = load_base("random:tiny-32k", lora=lora, quant=quant)
        load_adapter(m, runs["int8"])
        for name, mod in lora_modules(m).items():
            key = f"base_model.model.model.{name}.lora_A.weight"
            torch.testing.assert_close(mod.lora_a, a[key], rtol=0, atol=0)
    save_adapter(m, tmp_path / "resaved")
    assert load_file(tmp_path / "resaved" / "adapter_model.safetensors").keys() == a.keys()
    aucs = {}
    for quant in ("int8", "none"):
        out = tmp_path / f"eval-{quant}.json"
        assert evaluate_main(["--ckpt", str(tmp_path / "int8"), "--tokenizer", tok, "--limit",
                              "24", "--quant", quant, "--no-progress", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["quant"] == quant
        aucs[quant] = np.array(res["probs"])
    assert not np.array_equal(aucs["int8"], aucs["none"])  # really two different bases
    np.testing.assert_allclose(aucs["int8"], aucs["none"], atol=0.05)
