"""Retrieved histories, after ReLLa (Lin et al. 2024, "ReLLa: Retrieval-enhanced Large
Language Models for Lifelong Sequential Behavior Comprehension in Recommendation").

TALLRec shows the 10 most recent items before the target. ReLLa's semantic user behaviour
retrieval shows instead the history items most relevant to the target: here, from the last
`history_pool` rated items, the `history_len` whose title embeddings have the highest cosine
similarity with the target's title embedding. The chosen items are shown oldest first, split
into preferences and unpreferences exactly as recent ones, so the prompt format is unchanged.

semantic: the embedding of an item is the mean of the base model's final-norm hidden states
over its title tokens, computed once per title list and cached by `engine.embed` (data/ never
loads a model: `python -m engine.prepare movielens --history-select semantic` builds these).

collaborative: item-based collaborative filtering (Sarwar et al. 2001) as the retriever. An
item's vector is its column of ratings by the training users (those owning no validation or
test window), each centred on that user's mean rating; similarity is the cosine of two items'
vectors with the window's own user left out, so a history is never chosen with the rating it
is labelled by. No model and no text: what other users rated alike.
"""

from __future__ import annotations

import numpy as np
import torch

HISTORY_SELECT = ("recent", "semantic", "collaborative")


class SemanticSelector:
    """history selector for `data.movielens.build_windows`: positions of the `keep`
    candidates most similar to the target, ties to the more recent one."""

    def __init__(self, vectors: dict[str, torch.Tensor] | tuple[list[str], torch.Tensor],
                 keep: int):
        keys, table = (list(vectors), torch.stack(list(vectors.values()))) \
            if isinstance(vectors, dict) else vectors
        if len(keys) != len(table):
            raise ValueError(f"{len(keys)} item ids for {len(table)} embedding rows")
        norms = table.float().norm(dim=1, keepdim=True)
        if bool((norms == 0).any()):
            bad = keys[int((norms[:, 0] == 0).nonzero()[0])]
            raise ValueError(f"item {bad!r} has a zero embedding: cosine similarity undefined")
        self.row = {k: i for i, k in enumerate(keys)}
        self.unit = table.float() / norms  # (N, dim), unit rows: dot product = cosine
        self.keep = keep

    def __call__(self, candidates: list[str], target: str, user: str | None = None) -> list[int]:
        c, t = table_rows(self.row, candidates, target, self.keep, "embedding")
        sims = (self.unit[c] @ self.unit[t]).tolist()  # (C,)
        return most_similar(sims, self.keep)


class CollaborativeSelector:
    """history selector for `data.movielens.build_windows`: positions of the `keep`
    candidates whose centred rating vectors (over `users`) are most similar to the target's,
    the window's own user left out; ties (e.g. items no other user rated: similarity 0) to
    the more recent one. `ratings`: objects with .user, .item and .rating."""

    def __init__(self, ratings, users, keep: int):
        items = sorted({r.item for r in ratings})
        self.row = {k: i for i, k in enumerate(items)}
        self.col = {u: j for j, u in enumerate(sorted(set(users)))}
        if not self.col:
            raise ValueError("no users to read item vectors from")
        m = np.zeros((len(items), len(self.col)))
        for r in ratings:
            if r.user in self.col:
                m[self.row[r.item], self.col[r.user]] = r.rating
        rated = m > 0
        mean = m.sum(0) / np.maximum(rated.sum(0), 1)
        self.m = np.where(rated, m - mean, 0.0)  # (items, users): 0 = not rated
        self.gram = self.m @ self.m.T  # (items, items) dot products, float64
        self.keep = keep

    def __call__(self, candidates: list[str], target: str, user: str | None = None) -> list[int]:
        c, t = table_rows(self.row, candidates, target, self.keep, "collaborative vector")
        dots, sq_c, sq_t = self.gram[c, t], self.gram[c, c], self.gram[t, t]
        j = self.col.get(user)
        if j is not None:  # leave the window's own user out
            dots = dots - self.m[c, j] * self.m[t, j]
            sq_c, sq_t = sq_c - self.m[c, j] ** 2, sq_t - self.m[t, j] ** 2
        # a centred rating is 0 or at least 1/(ratings of that user) away from 0, so a squared
        # norm under 1e-9 is a vector with no rating left (float residue): similarity 0
        ok = (sq_c > 1e-9) & (sq_t > 1e-9)
        sims = np.where(ok, dots / np.sqrt(np.where(ok, sq_c * sq_t, 1.0)), 0.0)
        return most_similar(np.round(sims, 12).tolist(), self.keep)  # rounding: BLAS-order noise


def table_rows(row: dict[str, int], candidates: list[str], target: str, keep: int,
               what: str) -> tuple[list[int], int]:
    """Table rows of the candidates and of the target, or a clear error."""
    if len(candidates) < keep:
        raise ValueError(f"{len(candidates)} candidates, fewer than the {keep} to keep")
    missing = [c for c in [*candidates, target] if c not in row]
    if missing:
        raise ValueError(f"no {what} for item {missing[0]!r}")
    return [row[c] for c in candidates], row[target]


def most_similar(sims: list[float], keep: int) -> list[int]:
    """Positions of the `keep` highest similarities, highest first; among equals (e.g. one
    title under two ids) the newer (later) candidate."""
    return sorted(range(len(sims)), key=lambda k: (-sims[k], -k))[:keep]
