"""Hand-written references shared by the tests: written out from the definitions, never by
calling the product code they check."""


def pairwise_auc(labels, scores) -> float:
    """AUC by its definition: the share of (positive, negative) pairs the scores order right,
    a tie counting one half (Mann-Whitney U / (P * N))."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
