"""Planner vs reality: activation bytes autograd saves, parameter/optimizer bytes of real tensors,
the 7B plan, bad inputs; and checkpointing gives bit-identical gradients."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.loss import causal_lm_loss
from engine.memory import GiB, PlanError, choose, main, plan
from engine.precision import get_precision
from model.config import PRESETS, LlamaConfig
from model.llama import Llama
from model.lora import LoRAConfig, lora_modules


def build(cfg, lora, prec, seed=0):
    torch.manual_seed(seed)
    model = Llama(cfg, lora).to(prec.weight_dtype)
    for m in lora_modules(model).values():
        m.reset_lora_parameters(torch.device("cpu"))  # fp32 adapters, as load_base
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith(("lora_a", "lora_b")))
    return model


def batch(cfg, B, T, padded, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[0, :3] = 0  # a left-padded row
    return ids, mask


def measured_saved_bytes(model, ids, mask, prec, backend):
    """Bytes of the distinct non-parameter storages autograd packs for backward during one
    forward + loss (checkpointed blocks pack their inputs through the same hooks)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    kernel = SDPBackend.MATH if backend == "math" else SDPBackend.FLASH_ATTENTION
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            prec.autocast("cpu"), sdpa_kernel(kernel):
        loss, _ = causal_lm_loss(model, ids, mask, chunk_size=64)
    loss.backward()  # the graph was usable
    return sum(storages.values())


TINY = LlamaConfig.from_preset("tiny")
# SmolLM2-135M's per-layer shapes (GQA 9/3 heads, head_dim 64, vocab 49152, tied), 3 layers.
SMOL = LlamaConfig(**{**PRESETS["smollm2-135m"], "n_layers": 3})
CASES = [  # cfg, B, T, precision, dropout, checkpoint_every, padded, backend, targets
    (TINY, 2, 32, "fp32", 0.0, 0, False, "cpu-flash", "q,v"),
    (TINY, 2, 32, "fp32", 0.1, 1, True, "cpu-flash", "q,v"),
    (TINY, 2, 32, "bf16", 0.1, 2, True, "cpu-flash", "q,k,v,o,gate,up,down"),
    (TINY, 2, 32, "fp32", 0.0, 0, True, "math", "v,gate"),
    (SMOL, 2, 64, "fp32", 0.0, 0, False, "cpu-flash", "q,v"),
    (SMOL, 2, 64, "fp32", 0.0, 1, False, "cpu-flash", "q,v"),
    (SMOL, 2, 64, "bf16", 0.05, 0, True, "cpu-flash", "q,v"),
    (SMOL, 2, 64, "bf16", 0.1, 2, True, "cpu-flash", "q,v,o,down"),
]


@pytest.mark.parametrize("cfg,B,T,precision,dropout,ckpt,padded,backend,targets", CASES)
def test_activation_bytes_match_saved_tensors(cfg, B, T, precision, dropout, ckpt, padded,
                                              backend, targets):
    prec = get_precision(precision)
    lora = LoRAConfig(r=4, dropout=dropout, targets=targets.split(","))
    model = build(cfg, lora, prec)
    model.checkpoint_every = ckpt
    ids, mask = batch(cfg, B, T, padded)
    measured = measured_saved_bytes(model, ids, mask, prec, backend)
    p = plan(cfg, T, B, lora, prec, ckpt, backend=backend, lora_impl="torch", padded=padded,
             loss_chunk=64, reserve=0)
    predicted = p.activation_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


@pytest.mark.parametrize("cfg,precision", [(TINY, "bf16"), (SMOL, "bf16"), (TINY, "fp32")])
def test_parameter_and_optimizer_bytes_exact(cfg, precision):
    prec = get_precision(precision)
    lora = LoRAConfig(r=8, dropout=0.0, targets=["q", "v", "down"])
    model = build(cfg, lora, prec)
    p = plan(cfg, 16, 1, lora, prec, reserve=0)
    base = [t for n, t in model.named_parameters() if not n.endswith(("lora_a", "lora_b"))]
    adapters = [t for t in model.parameters() if t.requires_grad]
    assert all(t.dtype == prec.weight_dtype for t in base)
    assert all(t.dtype == torch.float32 for t in adapters)
    assert p.weights == sum(t.nbytes for t in base)  # named_parameters counts tied ones once
    assert p.lora_params == sum(t.nbytes for t in adapters)

    opt = torch.optim.AdamW(adapters, lr=1e-3)
    ids, _ = batch(cfg, 1, 16, False)
    with prec.autocast("cpu"):
        loss, _ = causal_lm_loss(model, ids)
    loss.backward()
    opt.step()
    assert p.lora_grads == sum(t.grad.nbytes for t in adapters)
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert p.optimizer == sum(v.nbytes for v in state)


def test_llama7b_fits_24gib_with_micro_batch_8():
    lora = LoRAConfig(r=8, targets=["q", "v"])
    chosen = choose("llama-7b", 512, "24GiB", lora, "bf16")
    assert chosen.fits and chosen.micro_batch >= 8
    # Numbers: 12.55 GiB bf16 weights; 64 MiB adapter + grads + AdamW; micro-batch 8 with
    # full checkpointing peaks at 15.80 GiB including a 1 GiB runtime reserve.
    p8 = plan("llama-7b", 512, 8, lora, "bf16", "full", budget="24GiB")
    assert p8.fits
    assert p8.weights == 6_738_415_616 * 2
    assert 15 * GiB < p8.peak < 18 * GiB
    # Without checkpointing a block keeps ~149 KB per token: 8 x 512 tokens cannot fit.
    assert not plan("llama-7b", 512, 8, lora, "bf16", "none", budget="24GiB").fits


def test_choose_prefers_less_recomputation_and_explains():
    lora = LoRAConfig(r=8, targets=["q", "v"])
    p = choose("llama-7b", 512, "80GiB", lora, "bf16")
    assert p.checkpoint_every == 0 and p.micro_batch >= 8 and "none" in p.why
    p = choose("llama-7b", 512, "24GiB", lora, "bf16", micro_batch=2)
    assert p.fits and p.micro_batch == 2 and p.checkpoint_every != 1


def test_bad_inputs_give_clear_errors():
    lora = LoRAConfig(r=8, targets=["q", "v"])
    with pytest.raises(PlanError, match=r"smallest budget that works is 1[0-9]\.\d\d GiB"):
        choose("llama-7b", 512, "12GiB", lora)
    with pytest.raises(PlanError, match="nearest plan that fits: micro-batch"):
        choose("llama-7b", 2048, "24GiB", lora, micro_batch=64)
    with pytest.raises(PlanError, match="unknown model preset 'llama-9b'"):
        plan("llama-9b", 512, 1)
    with pytest.raises(PlanError, match="micro_batch must be a positive integer"):
        plan("tiny", 16, -1)
    with pytest.raises(PlanError, match="seq_len must be a positive integer"):
        plan("tiny", 0, 1)
    with pytest.raises(PlanError, match="exceeds"):
        plan("tiny", 1000, 1)
    with pytest.raises(PlanError, match="positive"):
        choose("tiny", 16, "-3GiB")
    with pytest.raises(PlanError, match="none, full or every-k"):
        plan("tiny", 16, 1, checkpoint="sometimes")


def test_cli_prints_table(capsys):
    assert main(["--base", "llama-7b", "--seq", "512", "--budget", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "fits" in out and "why:" in out
    assert main(["--base", "nope", "--budget", "24GiB"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


def _grads(model, ids, mask, ckpt, seed):
    model.checkpoint_every = ckpt
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    loss, _ = causal_lm_loss(model, ids, mask, chunk_size=16)
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointing_gives_bit_identical_gradients(dropout):
    lora = LoRAConfig(r=4, dropout=dropout, targets=["q", "v", "o", "gate", "down"])
    cfg = LlamaConfig(**{**PRESETS["tiny"], "n_layers": 4})
    model = build(cfg, lora, get_precision("fp32"))
    for m in lora_modules(model).values():  # nonzero B, so every gradient path carries signal
        torch.nn.init.normal_(m.lora_b, std=0.05)
    ids, mask = batch(cfg, 3, 24, padded=True)
    ref = _grads(model, ids, mask, 0, seed=7)
    assert all(g.abs().sum() > 0 for g in ref)
    for ckpt in (1, 2, 3):
        got = _grads(model, ids, mask, ckpt, seed=7)
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a, b), f"checkpoint_every={ckpt}: {(a - b).abs().max()}"
    if dropout:  # the masks really differ between seeds, so the equality above means something
        other = _grads(model, ids, mask, 0, seed=8)
        assert not all(torch.equal(a, b) for a, b in zip(ref, other, strict=True))
