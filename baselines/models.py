"""ID-based sequential recommenders scored on one target item, as TALLRec's baselines.

TALLRec (Bao et al. 2023, Sec. 4.1) trains GRU4Rec, Caser and SASRec on the same K shots as
the LLM: the history is padded to 10 with its last item, a like/dislike embedding is
concatenated to each history item's embedding, and the sequence representation is scored
against the target item with a sigmoid output and an MSE loss. GRU-BERT (here GRU-text) also
concatenates a frozen text embedding of each item to its id embedding.

One `SeqRecommender` holds what all of them share (item and feedback embeddings, the scoring
head); the models differ only in the sequence encoder: (B, L, D) -> (B, H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

MODELS = ("gru4rec", "caser", "sasrec", "gru-text")


@dataclass
class ModelConfig:
    n_items: int  # embedding rows, padding id 0 included
    item_dim: int = 32
    feedback_dim: int = 8
    hidden: int = 32  # sequence representation and head width
    max_len: int = 10  # history length after padding
    dropout: float = 0.1
    caser_heights: tuple[int, ...] = (2, 3, 4)
    caser_filters: int = 16  # horizontal filters per height
    caser_vertical: int = 1
    sasrec_blocks: int = 2
    text_dim: int = 0  # width of the frozen text embedding (gru-text), 0 = none

    def __post_init__(self):
        if self.n_items < 2:
            raise ValueError(f"n_items must be >= 2 (padding + one item), got {self.n_items}")
        if self.max_len < max(self.caser_heights):
            raise ValueError(f"max_len {self.max_len} is shorter than a Caser filter")
        for name in ("item_dim", "feedback_dim", "hidden", "sasrec_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def item_width(self) -> int:
        return self.item_dim + self.text_dim

    @property
    def step_width(self) -> int:  # one history position: [item ; feedback]
        return self.item_width + self.feedback_dim


class ItemEmbedding(nn.Module):
    """id embedding, optionally followed by the item's frozen text embedding."""

    def __init__(self, cfg: ModelConfig, text_table: torch.Tensor | None = None):
        super().__init__()
        self.ids = nn.Embedding(cfg.n_items, cfg.item_dim, padding_idx=0)
        if cfg.text_dim:
            if text_table is None or tuple(text_table.shape) != (cfg.n_items, cfg.text_dim):
                got = None if text_table is None else tuple(text_table.shape)
                raise ValueError(f"text_table must be ({cfg.n_items}, {cfg.text_dim}), got {got}")
            # Standardise each dimension over the items that have a text (LLM hidden states
            # have a few huge dimensions that would swamp the id embedding); the rows of
            # items without a text (padding) stay zero. A buffer: saved, never trained.
            t = text_table.float()
            has = t.abs().sum(-1) > 0
            mean, std = t[has].mean(0), t[has].std(0, unbiased=False) + 1e-6
            self.register_buffer("text", torch.where(has[:, None], (t - mean) / std, 0.0))
        else:
            self.text = None

    def forward(self, ids):  # (...) -> (..., item_dim + text_dim)
        e = self.ids(ids)
        if self.text is None:
            return e
        return torch.cat([e, self.text[ids]], dim=-1)


class GRUEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gru = nn.GRU(cfg.step_width, cfg.hidden, batch_first=True)

    def forward(self, x):  # (B, L, D) -> (B, H)
        _, h = self.gru(x)  # h: (1, B, H), the state after the last step
        return h[0]


class CaserEncoder(nn.Module):
    """Caser (Tang & Wang 2018): horizontal filters of several heights over the (L, D) image,
    max-pooled over time, plus vertical filters that weight the L positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, L = cfg.step_width, cfg.max_len
        self.horizontal = nn.ModuleList(
            nn.Conv2d(1, cfg.caser_filters, (h, D)) for h in cfg.caser_heights)
        self.vertical = nn.Conv2d(1, cfg.caser_vertical, (L, 1))
        width = cfg.caser_filters * len(cfg.caser_heights) + cfg.caser_vertical * D
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(width, cfg.hidden)

    def forward(self, x):  # (B, L, D) -> (B, H)
        img = x.unsqueeze(1)  # (B, 1, L, D)
        hs = [F.relu(conv(img)).squeeze(3).amax(dim=2) for conv in self.horizontal]  # (B, n_h)
        v = self.vertical(img).flatten(1)  # (B, n_v * D)
        return F.relu(self.fc(self.drop(torch.cat(hs + [v], dim=1))))


class SASRecBlock(nn.Module):
    """One single-head self-attention block, post-norm as in SASRec (Kang & McAuley 2018)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):  # (B, L, d)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # Not causal: the whole history is known when the target is scored.
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), dim=-1)  # (B, L, L)
        x = self.ln1(x + self.drop(self.proj(att @ v)))
        return self.ln2(x + self.drop(self.ff(x)))


class SASRecEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inp = nn.Linear(cfg.step_width, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.sasrec_blocks))

    def forward(self, x):  # (B, L, D) -> (B, H)
        L = x.shape[1]
        h = self.drop(self.inp(x) + self.pos(torch.arange(L, device=x.device)))  # (B, L, H)
        for block in self.blocks:
            h = block(h)
        return h[:, -1]  # the last position, as SASRec reads its next-item state


ENCODERS = {"gru4rec": GRUEncoder, "caser": CaserEncoder, "sasrec": SASRecEncoder,
            "gru-text": GRUEncoder}


class SeqRecommender(nn.Module):
    """P(like) = sigmoid(head([u ; t ; u * t])), u = the sequence representation projected
    to the item width, t = the target item's embedding. The product term lets a small head
    express "the target resembles the history" without learning it through a ReLU layer."""

    def __init__(self, name: str, cfg: ModelConfig, text_table: torch.Tensor | None = None):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown baseline {name!r}; known: {MODELS}")
        if (name == "gru-text") != (cfg.text_dim > 0):
            raise ValueError("gru-text needs text_dim > 0 and a text table; the others take none")
        self.name, self.cfg = name, cfg
        self.items = ItemEmbedding(cfg, text_table)
        self.feedback = nn.Embedding(2, cfg.feedback_dim)  # 0 = disliked, 1 = liked
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = ENCODERS[name](cfg)
        E = cfg.item_width
        self.to_item = nn.Linear(cfg.hidden, E)
        self.head = nn.Sequential(nn.Linear(3 * E, cfg.hidden), nn.ReLU(),
                                  nn.Linear(cfg.hidden, 1))

    def forward(self, history, feedback, target):
        """history, feedback: (B, L) ints; target: (B,) -> logits (B,)."""
        x = torch.cat([self.items(history), self.feedback(feedback)], dim=-1)  # (B, L, D)
        u = self.to_item(self.encoder(self.drop(x)))  # (B, E)
        t = self.items(target)  # (B, E)
        return self.head(torch.cat([u, t, u * t], dim=-1)).squeeze(-1)


def mse_loss(logits, labels):
    """TALLRec's baselines: MSE between sigmoid(logit) and the 0/1 label."""
    return F.mse_loss(torch.sigmoid(logits), labels.float())
