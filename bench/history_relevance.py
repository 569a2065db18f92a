"""How relevant are retrieved histories? For the MovieLens test windows, the mean genre overlap
(Jaccard, from u.item's genre flags) between each shown history item and the target, and the
no-training like-rate rule's AUC, for each way of choosing the 10 items shown:

- recent: TALLRec's 10 most recent ratings;
- semantic: the grid's `--history-select semantic` (the 10 of the last --pool ratings whose
  title embeddings are closest to the target's: mean-pooled final hidden states of the base);
- the same with other title embeddings of the same base: a prompt's last token ("This movie
  title: "..." means in one word:"", PromptEOL, Jiang et al. 2023) and middle layers;
- collaborative: the grid's `--retrieval collaborative` (the 10 candidates whose rating
  vectors over the training users are closest to the target's, the window's user left out);
- genre: the 10 of the same candidates whose genres overlap the target's most, an oracle that
  reads the labels MovieLens gives, to show what relevant retrieval would look like.

No model is trained; the embeddings are computed once (seconds to a minute on CPU).

    python -m bench.history_relevance [--data-root DIR] [--base smollm2-135m] [--pool 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from baselines.train import like_rate_auc  # noqa: E402
from data.history import CollaborativeSelector, SemanticSelector, most_similar  # noqa: E402
from data.movielens import (  # noqa: E402
    MovieLensConfig,
    RawFiles,
    build_windows,
    read_genres,
    read_items,
    read_ratings,
    split_windows,
    training_users,
)
from engine.embed import title_vectors  # noqa: E402
from model.checkpoint import load_base  # noqa: E402
from model.config import DEFAULT_BASE  # noqa: E402
from paths import DATA_ROOT_HELP, data_root  # noqa: E402

EOL_PROMPT = 'This movie title: "{}" means in one word:"'


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


class Recorder:
    """A history selector that remembers, per window, the ids it showed and the target's."""

    def __init__(self, select):
        self.select, self.shown = select, []

    def __call__(self, candidates: list[str], target: str, user: str) -> list[int]:
        chosen = self.select(candidates, target, user)
        self.shown.append(([candidates[k] for k in chosen], target))
        return chosen


def recent(keep: int):
    return lambda candidates, target, user: list(range(len(candidates) - keep, len(candidates)))


def by_genre(genres: dict[str, frozenset], keep: int):
    """The candidates sharing most genres with the target; ties to the more recent."""
    def select(candidates, target, user):
        return most_similar([jaccard(genres[c], genres[target]) for c in candidates], keep)
    return select


@torch.no_grad()
def prompt_embeddings(model, tok, titles: dict[str, str], layers: list[int | None]):
    """{layer: (ids, (N, dim))}: the hidden state of EOL_PROMPT's last token after block
    `layer` (None: the final norm, what the LM head reads)."""
    caught = {}
    for i in layers:
        if i is not None:
            model.layers[i].register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out))
    ids = list(titles)
    out = {i: [] for i in layers}
    for s in range(0, len(ids), 32):
        enc = [tok.encode(EOL_PROMPT.format(titles[i]), bos=True) for i in ids[s:s + 32]]
        x = torch.full((len(enc), max(map(len, enc))), tok.pad_id, dtype=torch.long)
        for r, e in enumerate(enc):  # right padding: the real tokens never see it
            x[r, :len(e)] = torch.tensor(e)
        final = model.hidden_states(x)
        last = torch.tensor([len(e) - 1 for e in enc])
        for i in layers:
            h = final if i is None else caught[i]
            out[i].append(h[torch.arange(len(enc)), last].float())
    return {i: (ids, torch.cat(v)) for i, v in out.items()}


def measure(ratings, titles, genres, cfg: MovieLensConfig, select) -> dict:
    rec = Recorder(select)
    windows = build_windows(ratings, titles, cfg, select=rec)
    shown = rec.shown[-len(windows):]  # build_windows keeps the last max_windows
    test, test_shown = split_windows(windows, cfg)["test"], split_windows(shown, cfg)["test"]
    return {
        "genre_jaccard": statistics.mean(statistics.mean(jaccard(genres[h], genres[t]) for h in hs)
                                         for hs, t in test_shown),
        "like_rate_auc": like_rate_auc([s.to_record() for s in test]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", help=DATA_ROOT_HELP)
    ap.add_argument("--base", default=DEFAULT_BASE, help="model whose hidden states embed titles")
    ap.add_argument("--pool", type=int, default=50, help="candidates: the last N ratings")
    args = ap.parse_args(argv)
    if args.pool < MovieLensConfig.history_len:
        ap.error(f"--pool {args.pool}: want at least the {MovieLensConfig.history_len} items shown")
    src = data_root(args.data_root) / "raw" / "ml-100k"
    if not src.is_dir():
        ap.error(f"{src}: no raw MovieLens-100K folder (set --data-root)")
    raw = RawFiles(src)
    item_label, item_bytes = raw.read("u.item")
    titles, genres = read_items(item_label, item_bytes), read_genres(item_label, item_bytes)
    ratings = read_ratings(*raw.read("u.data"))
    cfg = MovieLensConfig(history_pool=args.pool)
    keep = cfg.history_len

    print(f"MovieLens test windows, {keep} items shown of the last {args.pool} ratings")
    print(f"{'history items shown':<48} {'genre Jaccard':>13} {'like-rate AUC':>13}")

    def row(name, select):
        m = measure(ratings, titles, genres, cfg, select)
        print(f"{name:<48} {m['genre_jaccard']:>13.4f} {m['like_rate_auc']:>13.4f}", flush=True)

    row("recent (TALLRec)", recent(keep))
    row("semantic: mean of final hidden states (grid)",
        SemanticSelector(title_vectors(titles, args.base), keep))
    model, tok = load_base(args.base, torch.float32, "cpu")
    model.eval()
    n = len(model.layers)
    for layer, vectors in prompt_embeddings(model, tok, titles, [None, n // 3, n // 2,
                                                                   2 * n // 3]).items():
        where = "final norm" if layer is None else f"block {layer} of {n}"
        row(f"semantic: prompt's last token, {where}", SemanticSelector(vectors, keep))
    row("collaborative: training users' ratings (grid)",
        CollaborativeSelector(ratings, training_users(ratings, cfg), keep))
    row("genre overlap (oracle: MovieLens' genre labels)", by_genre(genres, keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
