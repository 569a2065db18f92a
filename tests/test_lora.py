"""model/lora.py: LoRA layers built into the model, against the base model, the kernels'
reference, and the fused kernel (forced onto CPU tensors through the Triton interpreter)."""

import os

import pytest
import torch

from model import LlamaConfig, LoRAConfig, load_base
from model.llama import Llama
from model.lora import (
    LoRAError,
    LoRALinear,
    lora_modules,
    lora_reference,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    set_kernel,
    trainable_summary,
    unmerge_lora,
)

ALL = ["q", "k", "v", "o", "gate", "up", "down"]
# conftest sets TRITON_INTERPRET=1 unless the environment says otherwise: the kernel runs on CPU
# tensors through the interpreter, or compiled on CUDA tensors with TRITON_INTERPRET=0
# (bench/gpu_check.sh's way); with neither there is nothing to run it on.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")


def randomize_lora(model, seed=0, std=0.05):
    """Non-zero A and B, so the adapter changes the output (B = 0 would hide every bug)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_a.copy_(torch.randn(m.lora_a.shape, generator=gen) * std)
            m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * std)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


# --- configuration -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "rank r must be a positive integer"),
    (dict(r=-4), "rank r must be a positive integer"),
    (dict(r=8.0), "rank r must be a positive integer"),
    (dict(alpha=-16), "alpha must be positive"),
    (dict(alpha=0), "alpha must be positive"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(targets=["q", "c_attn"]), r"unknown LoRA target modules \['c_attn'\]"),
    (dict(targets=[]), "unknown LoRA target modules"),
    (dict(kernel="gpu"), "kernel mode must be one of"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(LoRAError, match=match):
        LoRAConfig(**kwargs)


def test_config_accepts_peft_names():
    cfg = LoRAConfig(targets=["v_proj", "q_proj", "q"])
    assert cfg.targets == ["q", "v"] and cfg.scale == 2.0


def test_tallrec_llama7b_trainable_count():
    # TALLRec: LLaMA-7B, r=8 on q_proj and v_proj: 32 layers · 2 · (8·4096 + 4096·8).
    cfg = LlamaConfig.from_preset("llama-7b")
    with torch.device("meta"):
        model = Llama(cfg, LoRAConfig(r=8, alpha=16, targets=["q", "v"]))
    for p in model.parameters():
        p.requires_grad_(True)
    assert mark_only_lora_trainable(model) == 4_194_304
    summary = trainable_summary(model)
    assert summary.startswith("trainable params: 4,194,304 || all params: 6,742,609,920")


# --- the layer -----------------------------------------------------------------------------

def test_cpu_path_is_the_written_out_formula_with_the_kernels_mask():
    """y = x Wᵀ + s · ((x ⊙ m / (1 - p)) Aᵀ) Bᵀ, m a bool keep-mask drawn as the kernels'
    contract says (a uniform 15-bit draw per element, cut from int64 `random_()` words on
    torch's RNG, kept below (1 - p)·2^15): the layer's CPU path and the kernels' torch
    reference, against the formula written out here."""
    from kernels.lora import lora_linear_reference

    x = torch.randn(3, 5, 24)
    layer = LoRALinear(24, 16, r=4, alpha=8, dropout=0.3, kernel="off").train()
    with torch.no_grad():
        layer.weight.normal_()
        layer.lora_b.normal_()
    w, a, b, s = layer.weight, layer.lora_a, layer.lora_b, layer.scale
    for p in (0.0, 0.3):
        layer.dropout = p
        torch.manual_seed(7)
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
        draws = words.view(torch.int16)[:x.numel()].int() & 0x7FFF
        keep = (draws < round((1 - p) * 32768)).view(x.shape) if p else True
        expected = x @ w.T + s * (((x * keep / (1 - p)) @ a.T) @ b.T)
        for path in ("layer", "model.lora", "kernels.lora"):
            torch.manual_seed(7)
            with torch.no_grad():
                got = (layer(x) if path == "layer" else lora_reference(x, w, a, b, s, p)
                       if path == "model.lora" else lora_linear_reference(x, w, a, b, s, p))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=path)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_addmm_path_matches_reference(p):
    # The layer's torch path (cuBLAS x Wᵀ, then addmm_ of s·xa Bᵀ in place) against the
    # separate-ops reference: output and every gradient, same mask, fp64 so only maths differs.
    from kernels.reference import lora_linear_addmm, lora_linear_reference

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 5, 24, generator=g, dtype=torch.float64), torch.randn(16, 24)
    a, b = torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g)
    mask = (torch.rand(3, 5, 24, generator=g) > p) if p else None
    dy = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    outs = []
    for fn in (lora_linear_addmm, lora_linear_reference):
        xi, ai, bi = x.clone().requires_grad_(), a.double().requires_grad_(), b.double()
        bi.requires_grad_()
        y = fn(xi, w.double(), ai, bi, 2.0, p, dropout_mask=mask)
        y.backward(dy)
        outs.append((y, xi.grad, ai.grad, bi.grad))
    for got, ref in zip(*outs, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_addmm_path_under_autocast():
    # bf16 autocast with fp32 adapters, as training runs: the in-place addmm_ is outside
    # autocast, so it must get operands in y's dtype itself.
    from kernels.reference import lora_addmm, lora_reference

    x, w = torch.randn(6, 32), torch.randn(8, 32)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = lora_addmm(x, w, a, b, 2.0), lora_reference(x, w, a, b, 2.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=0, atol=2e-2 * ref.abs().max().item())
    y.float().sum().backward()
    assert a.grad is not None and b.grad.abs().sum() > 0


@needs_kernels
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_layer_kernel_on_equals_off(p):
    """Output and every gradient, forced Triton path vs plain torch, dropout included."""
    torch.manual_seed(0)
    layer = LoRALinear(40, 24, r=4, alpha=8, dropout=p)
    with torch.no_grad():
        layer.weight.normal_(0, 0.2)
        layer.lora_b.normal_(0, 0.2)
    layer.to(DEVICE)
    x = torch.randn(2, 9, 40, device=DEVICE)
    dy = torch.randn(2, 9, 24, device=DEVICE)
    results = {}
    for mode in ("force", "off"):
        layer.kernel = mode
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(123)
        y = layer(xi)
        y.backward(dy)
        results[mode] = (y, xi.grad, layer.lora_a.grad, layer.lora_b.grad)
    for got, ref in zip(results["force"], results["off"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if p:  # the mask really was applied: without it the output differs
        layer.eval()
        assert (layer(x) - results["off"][0]).abs().max() > 1e-3


def test_forced_kernel_on_unsupported_tensor_says_why(monkeypatch):
    import kernels.dispatch

    monkeypatch.setattr(kernels.dispatch, "INTERPRET", False)
    layer = LoRALinear(8, 8, r=2, alpha=4, dropout=0.0, kernel="force")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        layer(torch.randn(3, 8))


# --- the model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_and_lora():
    base, _ = load_base("random:tiny", seed=5)
    model, _ = load_base("random:tiny", seed=6, lora=LoRAConfig(r=4, alpha=8, targets=ALL,
                                                                dropout=0.1))
    # The base's weights into the LoRA model: every key but the adapters must be used.
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and set(missing) == set(lora_state_dict(model))
    return base.eval(), model.eval()


def test_zero_b_equals_base_exactly(base_and_lora):
    base, model = base_and_lora
    assert all((m.lora_b == 0).all() and (m.lora_a != 0).any()
               for m in lora_modules(model).values())
    ids = torch.randint(0, base.cfg.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), base(ids), rtol=0, atol=0)


def test_merge_and_unmerge(base_and_lora):
    _, model = base_and_lora
    model = Llama(model.cfg, model.lora_cfg).eval()
    model.load_state_dict(base_and_lora[1].state_dict())
    randomize_lora(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.cfg.vocab_size, (2, 13))
    with torch.no_grad():
        unmerged = model(ids)
        merge_lora(model)
        merge_lora(model)  # idempotent
        merged = model(ids)
        assert rel_err(merged, unmerged) <= 1e-5
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert len(changed) == 7 * model.cfg.n_layers and all(n.endswith(".weight")
                                                              for n in changed)
        unmerge_lora(model)
    for n, p in model.named_parameters():  # restored up to fp32 rounding of (w + d) - d
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_training_through_merged_layer_refuses():
    model, _ = load_base("random:tiny", lora=LoRAConfig(r=2))
    merge_lora(model)
    with pytest.raises(LoRAError, match="unmerge"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_only_lora_trainable_and_gradients_reach_only_lora():
    model, _ = load_base("random:tiny", lora=LoRAConfig(r=4, targets=["q", "v", "down"]))
    randomize_lora(model)
    for p in model.parameters():
        p.requires_grad_(True)
    n = mark_only_lora_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert len(trainable) == 2 * 3 * model.cfg.n_layers
    assert n == sum(p.numel() for name, p in model.named_parameters() if name in trainable)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9))
    model(ids).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


# --- convergence: kernels on vs off --------------------------------------------------------

def train_losses(kernel: str, dropout: float, steps: int = 5):
    model, _ = load_base("random:tiny", seed=11,
                         lora=LoRAConfig(r=4, alpha=8, dropout=dropout, targets=ALL))
    set_kernel(model, kernel)
    randomize_lora(model, seed=3)
    model.to(DEVICE).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=gen).to(DEVICE)
    torch.manual_seed(99)  # dropout masks: the same draws on both paths
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@needs_kernels
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_convergence_kernels_on_vs_off(dropout):
    on, off = train_losses("force", dropout), train_losses("off", dropout)
    assert off[-1] < off[0] - 0.05, f"loss did not go down: {off.tolist()}"
    torch.testing.assert_close(on, off, rtol=1e-4, atol=0)
