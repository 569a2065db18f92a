"""Chunked causal-LM loss vs F.cross_entropy on full logits: value and every LoRA gradient."""

import pytest
import torch
import torch.nn.functional as F

from engine.loss import causal_lm_loss, linear_cross_entropy
from model.checkpoint import load_base
from model.lora import LoRAConfig, lora_modules


@pytest.fixture(scope="module")
def model():
    lora = LoRAConfig(r=4, dropout=0.0, targets=["q", "v", "o", "down"])
    m, _ = load_base("random:tiny", lora=lora)
    torch.manual_seed(0)
    for mod in lora_modules(m).values():
        torch.nn.init.normal_(mod.lora_b, std=0.1)  # nonzero B: every adapter gets a gradient
    return m


def make_batch(B=3, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :6] = -100  # a prompt without loss
    return ids, mask, labels


def lora_params(m):
    return [p for p in m.parameters() if p.requires_grad]


def reference(m, ids, mask, labels):
    logits = m(ids, mask).float()
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_matches_full_logits_cross_entropy(model, chunk):
    ids, mask, labels = make_batch()
    loss, n = causal_lm_loss(model, ids, mask, labels, chunk_size=chunk)
    ours = torch.autograd.grad(loss, lora_params(model))
    ref = reference(model, ids, mask, labels)
    theirs = torch.autograd.grad(ref, lora_params(model))
    assert n == int((labels[:, 1:] != -100).sum())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_default_labels_and_sum_reduction(model):
    ids, mask, _ = make_batch(seed=1)
    total, n = causal_lm_loss(model, ids, mask, reduction="sum")
    mean, _ = causal_lm_loss(model, ids, mask)
    ref = reference(model, ids, mask, ids.masked_fill(mask == 0, -100))
    torch.testing.assert_close(mean, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total / n, mean, rtol=1e-6, atol=1e-6)


def test_all_ignored_gives_zero_with_a_graph(model):
    ids, mask, labels = make_batch()
    loss, n = causal_lm_loss(model, ids, mask, torch.full_like(labels, -100))
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # no NaN, no crash
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in lora_params(model))
    model.zero_grad(set_to_none=True)


def test_bf16_autocast_close_to_reference():
    m, _ = load_base("random:tiny", dtype=torch.bfloat16, lora=LoRAConfig(r=4, dropout=0.0))
    ids, mask, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(m, ids, mask, labels, chunk_size=7)
        ref = reference(m, ids, mask, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)


def test_keeps_no_logits_for_backward(model):
    """Only ∂L/∂h (N × dim) survives the loss, not an (N × vocab) logits tensor."""
    ids, mask, labels = make_batch(B=4, T=64)
    h = model.hidden_states(ids, mask).detach().requires_grad_()
    rows = h.reshape(-1, h.shape[-1])[:200]
    target = ids.reshape(-1)[:200]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_cross_entropy(rows, model.lm_head.weight, target, chunk_size=32)
    assert [tuple(t.shape) for t in saved] == [(200, 64)]  # dim 64 < vocab 256


def test_refuses_trainable_head_and_bad_shapes(model):
    h = torch.randn(5, 64, requires_grad=True)
    w = torch.randn(256, 64, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w.detach(), torch.zeros(5, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="differ in shape"):
        causal_lm_loss(model, torch.zeros(2, 5, dtype=torch.long),
                       labels=torch.zeros(2, 4, dtype=torch.long))
