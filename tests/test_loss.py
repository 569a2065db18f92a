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


# --- a shared prefix run once (share_prefix) ---------------------------------------------

def prefix_batch(P=20, tails=(9, 4, 13), train_on_inputs=True, seed=3):
    """Rows = the same P tokens + tails of their own lengths, right-padded; each tail starts
    with a different token, so position P-1 predicts a different token in every row."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 256, (P,), generator=g).tolist()
    T = P + max(tails)
    ids = torch.zeros(len(tails), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(tails):
        tail = [(7 + 31 * b) % 256] + torch.randint(0, 256, (n - 1,), generator=g).tolist()
        ids[b, :P + n] = torch.tensor(prefix + tail)
        mask[b, :P + n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if not train_on_inputs:  # the prompt (prefix and the tail's first 2 tokens) carries none
        labels[:, :P + 2] = -100
    return ids, mask, labels


class Spy:
    """Counts the model's shared-prefix passes (the prefix length of each)."""

    def __init__(self, model, monkeypatch):
        real, self.calls = model.hidden_states_shared, []

        def spy(ids, mask, prefix_len):
            self.calls.append(prefix_len)
            return real(ids, mask, prefix_len)
        monkeypatch.setattr(model, "hidden_states_shared", spy)


@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_shared_prefix_equals_full_logits_cross_entropy(model, monkeypatch, train_on_inputs):
    """The prefix once (batch 1) + each row's tail against its keys/values: the same loss,
    token count and LoRA gradients as every row run whole, up to fp32 rounding."""
    ids, mask, labels = prefix_batch(train_on_inputs=train_on_inputs)
    spy = Spy(model, monkeypatch)
    loss, n = causal_lm_loss(model, ids, mask, labels, chunk_size=7, share_prefix=True)
    assert spy.calls == [20]  # the shared path ran, over the whole common prefix
    ours = torch.autograd.grad(loss, lora_params(model))
    ref = reference(model, ids, mask, labels)
    theirs = torch.autograd.grad(ref, lora_params(model))
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    total, n_sum = causal_lm_loss(model, ids, mask, labels, reduction="sum", share_prefix=True)
    assert n_sum == n
    torch.testing.assert_close(total / n, ref, rtol=1e-5, atol=1e-6)


def test_shared_prefix_falls_back_below_the_minimum_or_on_other_labels(model, monkeypatch):
    """Rows sharing fewer than MIN_SHARED_PREFIX tokens, or whose labels differ early (the
    prefix must carry the same labels in every row), a single row, or left padding: the
    plain path, with the same result."""
    from engine.loss import batch_prefix_len
    from engine.scoring import MIN_SHARED_PREFIX

    spy = Spy(model, monkeypatch)
    short = prefix_batch(P=MIN_SHARED_PREFIX - 1)
    ids, mask, labels = prefix_batch()
    other = labels.clone()
    other[1, 5] = -100  # row 1's label differs inside the common tokens
    left = (ids.flip(1), mask.flip(1), labels.flip(1))
    cases = [short, (ids, mask, other), (ids[:1], mask[:1], labels[:1]), left]
    for b_ids, b_mask, b_labels in cases:
        assert batch_prefix_len(b_ids, b_mask, b_labels) == 0
        loss, n = causal_lm_loss(model, b_ids, b_mask, b_labels, share_prefix=True)
        torch.testing.assert_close(loss, reference(model, b_ids, b_mask, b_labels),
                                   rtol=1e-5, atol=1e-6)
    assert spy.calls == []
    # the boundary: exactly the minimum is shared, and each row keeps a token of its own
    assert batch_prefix_len(*prefix_batch(P=MIN_SHARED_PREFIX)) == MIN_SHARED_PREFIX
    same = ids[:1].expand(3, -1)
    assert batch_prefix_len(same, mask[:1].expand(3, -1), labels[:1].expand(3, -1)) == \
        int(mask[0].sum()) - 1


@pytest.mark.parametrize("offload", [False, True])
def test_shared_prefix_under_gradient_checkpointing(model, monkeypatch, offload):
    """--checkpointing full (and offloaded): the rows' pass is checkpointed block by block,
    the batch-1 prefix pass is not (a recompute would record its keys/values twice); the
    gradients are the full-logits reference's."""
    import model.llama as llama

    blocks = []
    real = llama.checkpoint
    monkeypatch.setattr(llama, "checkpoint", lambda fn, x, *a, **kw: blocks.append(
        x.shape[0]) or real(fn, x, *a, **kw))
    monkeypatch.setattr(model, "checkpoint_every", 1)
    monkeypatch.setattr(model, "checkpoint_offload", offload)
    ids, mask, labels = prefix_batch()
    loss, _ = causal_lm_loss(model, ids, mask, labels, share_prefix=True)
    ours = torch.autograd.grad(loss, lora_params(model))
    assert blocks == [3] * model.cfg.n_layers  # the 3 rows' blocks only
    monkeypatch.setattr(model, "checkpoint_every", 0)
    ref = reference(model, ids, mask, labels)
    for a, b in zip(ours, torch.autograd.grad(ref, lora_params(model)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
