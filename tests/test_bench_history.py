"""bench.history_relevance's pieces on hand-made windows: the recorder sees what build_windows
shows, the recent selector equals TALLRec's recent build, the genre oracle's choice by hand."""

import pytest

from bench.history_relevance import Recorder, by_genre, jaccard, measure, recent
from data.movielens import MovieLensConfig, Rating, build_windows


def test_jaccard_by_hand():
    assert jaccard(frozenset("ab"), frozenset("bc")) == pytest.approx(1 / 3)
    assert jaccard(frozenset(), frozenset()) == 0.0


def test_genre_oracle_picks_the_overlapping_newest_first():
    genres = {"a": frozenset({"Drama"}), "b": frozenset({"Comedy"}),
              "c": frozenset({"Drama", "War"}), "d": frozenset({"Drama"}),
              "t": frozenset({"Drama"})}
    # a and d both match exactly (1.0): d, the newer, first; then c (1/2); b shares nothing
    assert by_genre(genres, 3)(["a", "b", "c", "d"], "t", "u") == [3, 0, 2]


def _user(n):
    titles = {str(i): f"Movie {i}" for i in range(1, n + 1)}
    ratings = [Rating("1", str(i), 4 if i % 3 else 2, f"{100 + i}") for i in range(1, n + 1)]
    return titles, ratings


def test_recent_selector_builds_tallrec_windows_and_recorder_sees_them():
    titles, ratings = _user(30)
    cfg = MovieLensConfig(history_len=4, history_pool=10, max_windows=None)
    rec = Recorder(recent(4))
    assert build_windows(ratings, titles, cfg, select=rec) == build_windows(ratings, titles, cfg)
    # window for target 30 shows 26..29
    assert rec.shown[-1] == (["26", "27", "28", "29"], "30")
    assert len(rec.shown) == 26


def test_measure_recent_by_hand():
    """Genres: items divisible by 5 are Drama, the rest Comedy. The last window's test rows
    (split at 0.8/0.9 of 26 windows: rows 23..25, targets 28, 29, 30) show 4 recent items."""
    titles, ratings = _user(30)
    genres = {k: frozenset({"Drama"} if int(k) % 5 == 0 else {"Comedy"}) for k in titles}
    cfg = MovieLensConfig(history_len=4, history_pool=10, max_windows=None)
    got = measure(ratings, titles, genres, cfg, recent(4))
    # target 28 (Comedy) sees 24..27: 25 is Drama -> 3/4; 29 sees 25..28 -> 3/4;
    # 30 (Drama) sees 26..29 -> 0/4
    assert got["genre_jaccard"] == pytest.approx((0.75 + 0.75 + 0.0) / 3)
    # max_windows keeps the last 20 windows (targets 11..30); the test rows are targets 29
    # (3/4) and 30 (0/4), not the first windows' 23 and 24 (3/4 each)
    cfg = MovieLensConfig(history_len=4, history_pool=10, max_windows=20)
    assert measure(ratings, titles, genres, cfg, recent(4))["genre_jaccard"] == 0.375
