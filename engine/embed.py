"""Frozen text embeddings of item titles from our own base model: the mean of the final-norm
hidden states over the title's tokens. Two users: GRU-text (TALLRec's GRU-BERT, with our base
instead of BERT) and retrieved histories (`data.history.SemanticSelector`, after ReLLa), which
data/ cannot build itself since it never loads a model.

Computed once per (base, tokenizer, title list) and cached as a .pt file, so a grid of
runs reads it back instead of running the LLM again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from data.history import SemanticSelector
from fileio import atomic_write, make_dir
from model.config import DEFAULT_BASE
from paths import cache_dir as default_cache_dir

DEFAULT_TEXT_BASE = DEFAULT_BASE


def _cache_path(titles: list[str], base: str, tokenizer: str | None, max_tokens: int,
                cache_dir: Path) -> Path:
    h = hashlib.sha256()
    for part in (str(base), str(tokenizer), str(max_tokens), *titles):
        h.update(part.encode("utf-8") + b"\0")
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in Path(str(base)).name)
    return cache_dir / "baselines" / f"text-{slug}-{h.hexdigest()[:16]}.pt"


@torch.no_grad()
def embed_titles(model, tok, titles: list[str], batch_size: int = 32,
                 max_tokens: int = 64) -> torch.Tensor:
    """(N, dim) fp32; an empty title (padding, unused ids) gets a zero row."""
    dim = model.cfg.dim
    out = torch.zeros(len(titles), dim)
    bos = 1 if tok.bos_id is not None else 0
    # BOS is fed (the model was trained with it) but left out of the mean: its hidden state
    # is the same for every title and often far larger than the rest.
    encoded = {i: tok.encode(t, bos=True)[: bos + max_tokens] for i, t in enumerate(titles) if t}
    order = sorted(encoded, key=lambda i: len(encoded[i]))  # similar lengths share a batch
    device = next(model.parameters()).device
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for row, i in enumerate(idx):  # right padding: a causal model's real tokens never see it
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        h = model.hidden_states(ids.to(device), mask.to(device)).float().cpu()  # (b, T, dim)
        keep = mask.clone()
        keep[:, :bos] = 0
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        out[idx] = pooled
    return out


def title_embeddings(titles: list[str], base: str = DEFAULT_TEXT_BASE,
                     tokenizer: str | None = None, cache_dir: Path | str | None = None,
                     batch_size: int = 32, max_tokens: int = 64,
                     device: str = "cpu") -> torch.Tensor:
    """Cached `embed_titles` with `load_base(base)`; (len(titles), dim)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_path(titles, base, tokenizer, max_tokens, cache)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["titles"] == titles:
            return saved["emb"]
    from model.checkpoint import load_base  # imported here: ID-only baselines never need it

    model, tok = load_base(base, torch.float32, device, tokenizer=tokenizer)
    if tok is None:
        raise ValueError(f"base {base!r} comes without a tokenizer; pass tokenizer=")
    model.eval()
    emb = embed_titles(model, tok, titles, batch_size, max_tokens)
    make_dir(path.parent)
    # atomic: parallel runs never read a half-written cache
    atomic_write(path, lambda tmp: torch.save(
        {"base": str(base), "tokenizer": str(tokenizer), "titles": titles, "emb": emb}, tmp))
    return emb


def title_vectors(titles: dict[str, str], base: str | None = None, tokenizer: str | None = None,
                  cache_dir: Path | str | None = None) -> tuple[list[str], torch.Tensor]:
    """(item ids, (N, dim) title embeddings) for id -> title, cached per title list."""
    ids = list(titles)
    return ids, title_embeddings([titles[i] for i in ids], base or DEFAULT_TEXT_BASE, tokenizer,
                                 cache_dir)


def semantic_selector_factory(keep: int, base: str | None = None, tokenizer: str | None = None,
                              cache_dir: Path | str | None = None):
    """For `data.movielens.build_movielens(make_select=...)`: embeds the catalogue's titles
    once (base None: the default base)."""
    def make(titles: dict[str, str], ratings=None) -> SemanticSelector:
        return SemanticSelector(title_vectors(titles, base, tokenizer, cache_dir), keep)

    return make
