"""Retrieved histories, after ReLLa (Lin et al. 2024, "ReLLa: Retrieval-enhanced Large
Language Models for Lifelong Sequential Behavior Comprehension in Recommendation").

TALLRec shows the 10 most recent items before the target. ReLLa's semantic user behaviour
retrieval shows instead the history items most relevant to the target: here, from the last
`history_pool` rated items, the `history_len` whose title embeddings have the highest cosine
similarity with the target's title embedding. The chosen items are shown oldest first, split
into preferences and unpreferences exactly as recent ones, so the prompt format is unchanged.

The embedding of an item is the mean of the base model's final-norm hidden states over its
title tokens, computed once per title list and cached by `engine.embed` (data/ never loads a
model: `python -m engine.prepare movielens --history-select semantic` builds these splits).
"""

from __future__ import annotations

import torch

HISTORY_SELECT = ("recent", "semantic")


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

    def __call__(self, candidates: list[str], target: str) -> list[int]:
        if len(candidates) < self.keep:
            raise ValueError(f"{len(candidates)} candidates, fewer than the {self.keep} to keep")
        missing = [c for c in [*candidates, target] if c not in self.row]
        if missing:
            raise ValueError(f"no embedding for item {missing[0]!r}")
        cand = self.unit[[self.row[c] for c in candidates]]  # (C, dim)
        sims = (cand @ self.unit[self.row[target]]).tolist()  # (C,)
        return most_similar(sims, self.keep)


def most_similar(sims: list[float], keep: int) -> list[int]:
    """Positions of the `keep` highest similarities, highest first; among equals (e.g. one
    title under two ids) the newer (later) candidate."""
    return sorted(range(len(sims)), key=lambda k: (-sims[k], -k))[:keep]
