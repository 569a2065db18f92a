"""Yes/No scoring with one forward pass, and the metrics TALLRec reports.

P(Yes) = softmax(logit_yes, logit_no)[0] at the answer position, the last token of the
prompt. TALLRec generates 128 tokens and keeps only the first step's scores; one
forward pass with logits for that single position gives the same number.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import fields
from dataclasses import replace as dc_replace

import numpy as np
import torch
from tqdm import tqdm

from data.collate import CutoffStats, TokenizeConfig, collate_train, encode_all, pad_value
from engine.precision import Precision

MIN_SHARED_PREFIX = 16  # tokens; below this, encoding the prefix once saves too little


def common_prefix_len(rows: list[list[int]]) -> int:
    """Length of the token prefix every row starts with, leaving each row at least one token
    of its own (the answer position must be computed in the batch)."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows) - 1
    for p in range(n):
        if any(r[p] != first[p] for r in rows):
            return p
    return max(n, 0)


@torch.no_grad()
def score(model, tok, records: list[dict], batch_size: int = 16, cutoff_len: int = 512,
          precision: Precision | None = None, progress: bool = True, desc: str = "scoring",
          share_prefix: bool = True):
    """-> (probs, labels, CutoffStats, n_tokens) with probs/labels in the records' order;
    the forward passes run under `precision`'s autocast (None: as the weights are).

    With `share_prefix`, the token prefix all prompts share (the instruction) is run through
    the model once and every batch attends to its keys/values: the same numbers up to
    rounding, about a third fewer tokens through the layers for TALLRec's prompts. n_tokens
    counts every prompt token either way."""
    yes_id, no_id = tok.answer_token_ids()
    examples, stats = encode_all(records, tok, TokenizeConfig(cutoff_len=cutoff_len), eval=True)
    device = next(model.parameters()).device
    # Length-sorted batches: little padding; results are put back in the input order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    probs = np.zeros(len(examples))
    was_training = model.training
    model.eval()
    amp = precision.autocast(device) if precision is not None else nullcontext()
    P = common_prefix_len([e.input_ids for e in examples]) if share_prefix else 0
    if not hasattr(model, "encode_prefix") or P < MIN_SHARED_PREFIX:
        P = 0
    n_tokens = 0
    try:
        prefix = None
        if P:
            with amp:
                prefix = model.encode_prefix(torch.tensor([examples[0].input_ids[:P]],
                                                          device=device))
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress,
                          unit="batch", leave=False):
            idx = order[start:start + batch_size]
            rows = [examples[i] for i in idx]
            if P:  # each row keeps only its own tokens after the shared prefix
                rows = [dc_replace(e, input_ids=e.input_ids[P:], labels=e.labels[P:])
                        for e in rows]
            # Right-padded: causal attention alone is exact for every real token (no mask),
            # and each row's answer is predicted at its own last real position.
            batch = collate_train(rows, pad_value(tok), side="right")
            ids = batch["input_ids"].to(device)
            last = torch.tensor([len(e.input_ids) - 1 for e in rows], device=device)
            kw = {"prefix": prefix} if P else {}
            with amp:  # only two rows of the LM head are read: P(Yes) = softmax(Yes, No)
                pair = model(ids, attention_mask=batch["attention_mask"].to(device),
                             logits_at=last[:, None], vocab_rows=[yes_id, no_id], **kw)[:, 0]
            pair = pair.float()  # (B, 2): logits of Yes, No
            probs[idx] = torch.softmax(pair, dim=-1)[:, 0].cpu().numpy()
            n_tokens += sum(len(examples[i].input_ids) for i in idx)
    finally:
        model.train(was_training)
    labels = np.array([e.label for e in examples], dtype=np.int64)
    return probs, labels, stats, n_tokens


def score_split(model, tok, records: list[dict], batch_size: int = 16, cutoff_len: int = 512,
                precision: Precision | None = None, progress: bool = False,
                desc: str = "scoring", dist=None, share_prefix: bool = True):
    """score() with the rows dealt across torchrun's ranks (engine.distributed.Dist) and
    gathered back in order on every rank; without a process group it is score()."""
    if dist is None or not dist.enabled:
        return score(model, tok, records, batch_size, cutoff_len, precision, progress, desc,
                     share_prefix)
    part = score(model, tok, dist.shard(records), batch_size, cutoff_len, precision,
                 progress and dist.is_main, desc, share_prefix)
    parts = dist.gather(part)
    stats = CutoffStats(**{f.name: sum(getattr(p[2], f.name) for p in parts)
                           for f in fields(CutoffStats)})
    return (dist.unshard([p[0] for p in parts]), dist.unshard([p[1] for p in parts]), stats,
            sum(p[3] for p in parts))


def metrics(probs, labels) -> dict:
    """AUC (scikit-learn), accuracy at 0.5, log-loss, n, positives.

    AUC is undefined when the labels hold one class only: it is reported as None with the
    reason, instead of crashing a long run on its last line.
    """
    from sklearn.metrics import roc_auc_score

    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    n, pos = len(labels), int(labels.sum())
    out = {"n": n, "positives": pos}
    if n == 0:
        return {**out, "auc": None, "auc_undefined": "no samples", "accuracy": None,
                "log_loss": None}
    if 0 < pos < n:
        out["auc"] = float(roc_auc_score(labels, probs))
    else:
        out["auc"] = None
        out["auc_undefined"] = (f"all {n} labels are {'positive' if pos else 'negative'}: "
                                f"AUC needs both classes")
    out["accuracy"] = float(((probs > 0.5) == (labels == 1)).mean())
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    out["log_loss"] = float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())
    return out


def summary_line(name: str, m: dict) -> str:
    auc = "undefined" if m["auc"] is None else f"{m['auc']:.4f}"
    acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.4f}"
    ll = "-" if m["log_loss"] is None or math.isnan(m["log_loss"]) else f"{m['log_loss']:.4f}"
    return f"{name}: AUC {auc}  acc {acc}  log-loss {ll}  n {m['n']}  positives {m['positives']}"
