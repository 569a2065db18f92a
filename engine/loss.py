"""The causal-LM loss without full-vocabulary logits for every token.

    causal_lm_loss(model, input_ids, attention_mask=None, labels=None, chunk_size=1024,
                   reduction="mean") -> (loss, n_tokens)

    input_ids (B, T) int64; attention_mask (B, T) 1/0 or None; labels (B, T) int64 with -100 at
    positions that carry no loss (prompt, padding), or None = input_ids where the mask is 1.
    Position t predicts labels[:, t + 1] (the usual shift). loss is the fp32 mean over the
    n_tokens non-ignored targets (reduction="sum": their sum; 0 with a graph when n_tokens = 0).
    Equal to F.cross_entropy(model(ids, mask).float()[:, :-1].reshape(-1, V),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    and so are its gradients (tests/test_loss.py).

Why: a (B·T, V) fp32 logits tensor is the largest activation of the model (8 × 512 × 32000 × 4
bytes = 524 MB for LLaMA-7B, more with the bf16 copy and the softmax grad). Two savings:
1. Only positions whose target is not -100 reach the LM head (TALLRec's response-only loss
   keeps a few tokens per sample).
2. `LinearCrossEntropy` runs the LM head in chunks of `chunk_size` rows and, since the head is
   frozen, computes ∂L/∂h in the forward pass, chunk by chunk:
       logits = h Wᵀ (compute dtype) → fp32;  lse = logsumexp(logits)
       loss   = Σ_i lse_i − logits_i[y_i]
       ∂loss/∂logits = softmax(logits) − onehot(y)      (fp32)
       ∂loss/∂h      = (softmax − onehot) W             (compute dtype, as autograd would)
   Only ∂L/∂h (N × dim) is kept for backward, which scales it by the incoming gradient; no
   logits survive a chunk. Liger-Kernel's fused linear cross-entropy uses the same trick.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.collate import IGNORE_INDEX


class LinearCrossEntropy(torch.autograd.Function):
    """apply(h (N, D), weight (V, D), target (N,), chunk_size) -> fp32 sum of CE over N rows.
    The weight must be frozen: its gradient is not computed (we refuse rather than drop it)."""

    @staticmethod
    def forward(ctx, h, weight, target, chunk_size):
        need_grad = ctx.needs_input_grad[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_grad else None
        for s in range(0, h.shape[0], chunk_size):
            t = target[s:s + chunk_size]
            logits = F.linear(h[s:s + chunk_size], weight)  # (c, V), compute dtype
            lp_dtype = logits.dtype
            logits = logits.float()  # a copy unless already fp32
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            loss += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                # softmax − onehot, in place on the fp32 logits to keep one (c, V) buffer.
                p = logits.sub_(lse[:, None]).exp_()
                p[torch.arange(t.shape[0], device=p.device), t] -= 1.0
                grad_h[s:s + chunk_size] = (p.to(lp_dtype) @ weight.to(lp_dtype)).to(h.dtype)
        if need_grad:
            ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), None, None, None


def linear_cross_entropy(h, weight, target, chunk_size: int = 1024) -> torch.Tensor:
    """Sum over rows of cross_entropy(h Wᵀ, target), chunked; rows with target -100 must have
    been removed already."""
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("linear_cross_entropy: the LM head weight requires grad, but this loss "
                         "treats it as frozen and would not compute its gradient")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if h.dim() != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"expected h (N, D) and target (N,), got {tuple(h.shape)} and "
                         f"{tuple(target.shape)}")
    return LinearCrossEntropy.apply(h, weight, target, chunk_size)


def causal_lm_loss(model, input_ids, attention_mask=None, labels=None, chunk_size: int = 1024,
                   reduction: str = "mean"):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if labels is None:
        labels = input_ids if attention_mask is None else \
            input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} "
                         f"differ in shape")
    B, T = input_ids.shape
    h = model.hidden_states(input_ids, attention_mask)  # (B, T, dim)
    targets = labels[:, 1:].reshape(-1)  # (B·(T-1),): position t predicts token t+1
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = keep // (T - 1) * T + keep % (T - 1)  # row of h (B·T rows) that predicts each target
    h_sel = h.reshape(B * T, -1).index_select(0, rows)  # (N, dim): the LM head sees only these
    loss = linear_cross_entropy(h_sel, model.lm_head.weight, targets[keep], chunk_size)
    n = keep.numel()
    if reduction == "mean":
        loss = loss / max(n, 1)
    return loss, n
