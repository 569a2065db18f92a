"""The causal-LM loss without full-vocabulary logits for every token.

    causal_lm_loss(model, input_ids, attention_mask=None, labels=None, chunk_size=1024,
                   reduction="mean", share_prefix=False) -> (loss, n_tokens)

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

share_prefix: rows of a batch that start with the same tokens (TALLRec's instruction, ~70 of
~224) have the same hidden states there, since every row has the same LoRA weights. The
common prefix (P tokens, with the same labels in every row) then runs once, batch 1, and the
rows run only their own tokens against its keys/values (Llama.hidden_states_shared). The
loss is the same sum over (position, row): positions 0..P-2 predict prefix tokens 1..P-1 in
every row, so their CE is computed once and counted B times; position P-1 is shared but
predicts each row's own token P; then each row's positions as usual. n_tokens is unchanged.
One difference with LoRA dropout: the rows share one dropout mask on the prefix (same
expected gradient). Batches sharing fewer than MIN_SHARED_PREFIX tokens take the plain path.
"""

from __future__ import annotations

import torch

from data.collate import IGNORE_INDEX
from engine.scoring import MIN_SHARED_PREFIX
from kernels.cpu_bf16 import linear
from model.llama import right_padded


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
            logits = linear(h[s:s + chunk_size], weight)  # (c, V), compute dtype
            lp_dtype = logits.dtype
            logits = logits.float()  # a copy unless already fp32
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            # logsumexp with one exp pass, kept for the softmax: e = exp(x − max), in place
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()
            total = e.sum(dim=-1)
            loss += (top.squeeze(1) + total.log() - target_logit).sum()
            if need_grad:
                # softmax − onehot, in place on the same fp32 buffer
                p = e.div_(total[:, None])
                p[torch.arange(t.shape[0], device=p.device), t] -= 1.0
                # p W, as linear(p, Wᵀ): an fp32 GEMM where bf16 would be emulated
                grad_h[s:s + chunk_size] = linear(p.to(lp_dtype),
                                                  weight.to(lp_dtype).t()).to(h.dtype)
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
                   reduction: str = "mean", share_prefix: bool = False):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if labels is None:
        labels = input_ids if attention_mask is None else \
            input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} "
                         f"differ in shape")
    B = input_ids.shape[0]
    P = batch_prefix_len(input_ids, attention_mask, labels) \
        if share_prefix and hasattr(model, "hidden_states_shared") else 0
    weight = model.lm_head.weight
    if P:
        h_prefix, h_rows = model.hidden_states_shared(input_ids, attention_mask, P)
        # positions 0..P-2: the same predictions of the same tokens in every row, so once x B
        loss_p, n_p = shifted_loss_sum(h_prefix, labels[:1, :P], weight, chunk_size)
        # position P-1 (shared) predicts each row's token P; then the rows' own positions
        h = torch.cat((h_prefix[:, P - 1:].expand(B, -1, -1), h_rows), dim=1)  # (B, T-P+1, dim)
        loss_r, n_r = shifted_loss_sum(h, labels[:, P - 1:], weight, chunk_size)
        loss, n = loss_p * B + loss_r, n_p * B + n_r
    else:
        h = model.hidden_states(input_ids, attention_mask)  # (B, T, dim)
        loss, n = shifted_loss_sum(h, labels, weight, chunk_size)
    if reduction == "mean":
        loss = loss / max(n, 1)
    return loss, n


def shifted_loss_sum(h, labels, weight, chunk_size: int):
    """h (B, T, dim), labels (B, T): the fp32 sum of CE where position t predicts
    labels[:, t + 1] and that label is not ignored -> (sum, count)."""
    B, T = labels.shape
    targets = labels[:, 1:].reshape(-1)  # (B·(T-1),): position t predicts token t+1
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    rows = keep // (T - 1) * T + keep % (T - 1)  # row of h (B·T rows) that predicts each target
    h_sel = h.reshape(B * T, -1).index_select(0, rows)  # (N, dim): the LM head sees only these
    return linear_cross_entropy(h_sel, weight, targets[keep], chunk_size), keep.numel()


def batch_prefix_len(input_ids, attention_mask, labels) -> int:
    """How many leading tokens every row shares, with the same labels and no padding, leaving
    each row at least one token of its own; 0 when that is under MIN_SHARED_PREFIX, for a
    single row, or for rows that are not right-padded (the shared pass needs them so)."""
    B, T = input_ids.shape
    if B < 2 or (attention_mask is not None and not right_padded(attention_mask)):
        return 0
    same = ((input_ids == input_ids[:1]) & (labels == labels[:1])).all(0)  # (T,)
    lengths = torch.full((B,), T, device=input_ids.device)
    if attention_mask is not None:
        same &= attention_mask.bool().all(0)
        lengths = attention_mask.sum(1)
    differ = torch.cat((~same, same.new_ones(1)))  # a sentinel: no difference means P = T
    # the first difference, and the shortest row, in one host sync
    first, shortest = torch.stack((differ.int().argmax(), lengths.min())).tolist()
    P = min(first, shortest - 1)
    return P if P >= MIN_SHARED_PREFIX else 0
