"""Retrieved histories: the semantic selection on a hand-built embedding, the collaborative one
on hand-computed rating vectors (the window's user left out, no test user read), the rows
both keep identical to the recent build, and the CLIs."""

import json
import math

import numpy as np
import pytest
import torch

from data.history import CollaborativeSelector, SemanticSelector
from data.movielens import (
    MovieLensConfig,
    Rating,
    build_movielens,
    build_windows,
    collaborative_selector_factory,
    read_items,
    read_ratings,
    split_windows,
    training_users,
)
from data.prepare import main as data_prepare_main
from engine.embed import semantic_selector_factory
from engine.prepare import main

N_ITEMS = 45
# Items whose embedding lies close to the target's direction (angle 0), hand-picked so the
# expected top 10 is known without computing anything: 0.01 rad apart, item 33 the closest.
NEAR = [33, 3, 38, 12, 7, 25, 19, 31, 8, 22]
TARGET = 45  # the 45th rating, target of the last window


def fake_vectors() -> dict[str, torch.Tensor]:
    """item id -> 2-d unit vector at an angle: NEAR items at 0.01 .. 0.10 rad in that order,
    every other history item at 1.0 rad or more (further), the target at 0 rad. Lengths
    vary, so a dot product without normalisation would pick other items."""
    angle = {str(i): 1.0 + 0.01 * i for i in range(1, N_ITEMS + 1)}
    for rank, item in enumerate(NEAR, start=1):
        angle[str(item)] = 0.01 * rank
    angle[str(TARGET)] = 0.0
    return {k: (1.0 + int(k) % 3) * torch.tensor([math.cos(a), math.sin(a)])
            for k, a in angle.items()}


def write_raw(folder, n=N_ITEMS):
    """One user rating items 1..n in that order (timestamps 100..), liked when id is even."""
    folder.mkdir(parents=True, exist_ok=True)
    items = [f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|0" for i in range(1, n + 1)]
    (folder / "u.item").write_bytes("\n".join(items).encode("latin-1") + b"\n")
    ratings = [f"1\t{i}\t{4 if i % 2 == 0 else 2}\t{100 + i}" for i in range(1, n + 1)]
    (folder / "u.data").write_text("\n".join(ratings) + "\n")


def test_selector_picks_the_hand_known_top10():
    sel = SemanticSelector(fake_vectors(), keep=10)
    candidates = [str(i) for i in range(1, 45)]  # oldest first
    got = sel(candidates, str(TARGET))
    assert [candidates[k] for k in got] == [str(i) for i in NEAR]  # most similar first


def test_selector_ties_go_to_the_newer_item():
    v = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 0.0]),
         "c": torch.tensor([0.0, 1.0]), "t": torch.tensor([2.0, 0.0])}
    assert SemanticSelector(v, keep=1)(["a", "b", "c"], "t") == [1]
    assert SemanticSelector(v, keep=2)(["b", "a", "c"], "t") == [1, 0]


def test_selector_errors():
    v = {"a": torch.tensor([1.0, 0.0]), "z": torch.zeros(2)}
    with pytest.raises(ValueError, match="zero embedding"):
        SemanticSelector(v, keep=1)
    sel = SemanticSelector({"a": torch.tensor([1.0, 0.0])}, keep=1)
    with pytest.raises(ValueError, match="no embedding for item 'q'"):
        sel(["a"], "q")
    with pytest.raises(ValueError, match="fewer than"):
        SemanticSelector({"a": torch.tensor([1.0, 0.0])}, keep=2)(["a"], "a")


def test_build_shows_the_top10_oldest_first(tmp_path):
    write_raw(tmp_path)
    cfg = MovieLensConfig(max_windows=None, split=(0.0, 0.0), history_pool=50)
    test = build_movielens(tmp_path, cfg,
                           lambda titles, ratings: SemanticSelector(fake_vectors(), 10))
    last = test["test"][-1]
    assert last.target == "Movie 45 (1995)"
    # NEAR in rating (= id) order, split by the label rule (even ids liked).
    assert last.preferences == [f"Movie {i} (1995)" for i in (8, 12, 22, 38)]
    assert last.unpreferences == [f"Movie {i} (1995)" for i in (3, 7, 19, 25, 31, 33)]
    recent = build_movielens(tmp_path, cfg)["test"][-1]
    assert recent.preferences == [f"Movie {i} (1995)" for i in (36, 38, 40, 42, 44)]


def test_pool_limits_the_candidates(tmp_path):
    # With a pool of 20 only ratings 25..44 are candidates: NEAR items 25, 31, 38, 33 stay in,
    # the others are replaced by the closest remaining ones (angle 1.0 + 0.01 id: lowest ids).
    write_raw(tmp_path)
    cfg = MovieLensConfig(max_windows=None, split=(0.0, 0.0), history_pool=20)
    last = build_movielens(tmp_path, cfg,
                           lambda titles, ratings: SemanticSelector(fake_vectors(), 10))["test"][-1]
    shown = sorted(int(t.split()[1]) for t in last.preferences + last.unpreferences)
    assert shown == [25, 26, 27, 28, 29, 30, 31, 32, 33, 38]


def test_same_windows_labels_and_splits_as_recent(data_root):
    """Real MovieLens with random embeddings: every row keeps its target and label; the rows
    whose pool is exactly the last 10 ratings are byte-identical to the recent build."""
    raw = data_root / "raw" / "ml-100k"
    g = torch.Generator().manual_seed(0)

    def make(titles, ratings):
        return SemanticSelector((list(titles), torch.randn(len(titles), 8, generator=g)), 10)

    sem, rec = build_movielens(raw, make_select=make), build_movielens(raw)
    for split in ("train", "valid", "test"):
        assert [(s.target, s.label) for s in sem[split]] == \
            [(s.target, s.label) for s in rec[split]]
        assert all(s.history_len == 10 for s in sem[split])
    changed = sum(s.to_record() != r.to_record() for s, r in zip(sem["test"], rec["test"],
                                                                 strict=True))
    assert 0 < changed < 1000
    ref = json.loads((data_root / "tallrec" / "movie" / "test.json").read_text())
    assert [r.to_record() for r in rec["test"]] == ref  # the recent build is untouched


def test_cli_semantic(tmp_path, monkeypatch):
    write_raw(tmp_path / "raw")
    import engine.prepare as prepare

    def factory(keep, base, tokenizer=None, cache_dir=None):
        assert (keep, base) == (10, "some-base")
        return lambda titles, ratings: SemanticSelector(fake_vectors(), keep)

    monkeypatch.setattr(prepare, "semantic_selector_factory", factory)
    assert main(["movielens", "--raw-dir", str(tmp_path / "raw"), "--out", str(tmp_path / "o"),
                 "--history-select", "semantic", "--embed-base", "some-base",
                 "--max-windows", "0"]) == 0
    rows = json.loads((tmp_path / "o" / "test.json").read_text())
    assert '"Movie 33 (1995)"' in rows[-1]["input"] and '"Movie 44' not in rows[-1]["input"]


def test_factory_embeds_titles_once(monkeypatch):
    import engine.embed

    calls = []

    def fake(titles, base, tokenizer=None, cache_dir=None):
        calls.append(titles)
        return torch.eye(len(titles))

    monkeypatch.setattr(engine.embed, "title_embeddings", fake)
    sel = semantic_selector_factory(1, "b")({"1": "A", "2": "B"})
    assert calls == [["A", "B"]] and sel(["1", "2"], "2") == [1]


def test_data_prepare_alone_refuses_semantic_and_names_the_entry_point(tmp_path, capsys):
    # data/ never loads a model: the semantic build goes through engine.prepare
    write_raw(tmp_path / "raw")
    assert data_prepare_main(["movielens", "--raw-dir", str(tmp_path / "raw"), "--out",
                              str(tmp_path / "o"), "--history-select", "semantic"]) == 2
    assert "python -m engine.prepare" in capsys.readouterr().err
    assert not (tmp_path / "o" / "train.json").exists()


# --- collaborative retrieval (item-based CF over the training users' ratings) ---

def _r(user, item, rating):
    return Rating(user, item, rating, "100")


# Users A and B decide; O (the window's own user) rates i2 like t and i1 unlike it.
# Centred on each user's mean (A: 11/3, B: 3) the training vectors are, over (A, B):
#   i1 = (4/3, 1), i2 = (-8/3, -1), t = (4/3, 0)
# cos(i1, t) = (16/9) / (5/3 * 4/3) = 0.8 and cos(i2, t) < 0: i1 is kept. O (mean 13/5:
# i1 -1.6, i2 +2.4, t +2.4) would flip the choice to i2 if its column were read.
HAND = [_r("A", "i1", 5), _r("A", "i2", 1), _r("A", "t", 5),
        _r("B", "i1", 4), _r("B", "i2", 2), _r("B", "t", 3),
        _r("O", "i1", 1), _r("O", "i2", 5), _r("O", "t", 5), _r("O", "i3", 1), _r("O", "i4", 1)]


def test_collaborative_selector_by_hand_leaves_the_window_user_out():
    sel = CollaborativeSelector(HAND, {"A", "B", "O"}, keep=1)
    assert sel(["i1", "i2"], "t", "O") == [0]  # O's own ratings are not read for O's window
    assert sel(["i2", "i1"], "t", "O") == [1]
    assert sel(["i1", "i2"], "t", None) == [1]  # with O's column, i2 wins (see above)
    # only A and B as training users: O's window reads the same vectors either way
    assert CollaborativeSelector(HAND, {"A", "B"}, keep=1)(["i1", "i2"], "t", "O") == [0]


def test_collaborative_selector_equals_a_selector_without_the_user():
    """Leaving the window's user out = item vectors built without that user at all."""
    g = np.random.default_rng(0)
    users, items = [f"u{i}" for i in range(12)], [f"m{i}" for i in range(30)]
    ratings = [_r(u, m, int(g.integers(1, 6))) for u in users for m in items
               if g.random() < 0.5]
    full = CollaborativeSelector(ratings, users, keep=5)
    for u in users[:4]:
        without = CollaborativeSelector([r for r in ratings if r.user != u],
                                        [x for x in users if x != u], keep=5)
        for t in items[:6]:
            cands = [m for m in items if m != t][:20]
            assert full(cands, t, u) == without(cands, t, u)


def test_collaborative_selector_ties_and_errors():
    # x and y were rated by nobody else: similarity 0 for both, the newer kept
    ratings = [_r("A", "t", 4), _r("A", "i1", 2), _r("A", "i1b", 5), _r("O", "x", 3),
               _r("O", "y", 3), _r("O", "t", 5)]
    sel = CollaborativeSelector(ratings, {"A", "O"}, keep=1)
    assert sel(["x", "y"], "t", "O") == [1]
    with pytest.raises(ValueError, match="no collaborative vector for item 'q'"):
        sel(["x", "q"], "t", "O")
    with pytest.raises(ValueError, match="fewer than"):
        CollaborativeSelector(ratings, {"A", "O"}, keep=2)(["x"], "t", "O")
    with pytest.raises(ValueError, match="no users"):
        CollaborativeSelector(ratings, set(), keep=1)


def test_training_users_own_no_validation_or_test_window():
    """Owners recorded from the windows build_windows makes (the selector is told the user)."""
    g = np.random.default_rng(1)
    ratings = [Rating(f"u{u}", f"m{m}", int(g.integers(1, 6)), f"{100 + m}")
               for u in range(7) for m in range(int(g.integers(12, 30)))]
    titles = {r.item: r.item for r in ratings}
    cfg = MovieLensConfig(history_len=10, history_pool=10, max_windows=60)
    owners = []

    def record(candidates, target, user):
        owners.append(user)
        return list(range(len(candidates) - 10, len(candidates)))

    build_windows(ratings, titles, cfg, select=record)
    split = split_windows(owners[-60:], cfg)
    held = set(split["valid"]) | set(split["test"])
    assert held and training_users(ratings, cfg) == {r.user for r in ratings} - held


def test_collaborative_build_keeps_rows_and_reads_no_test_user(data_root, tmp_path):
    """Real MovieLens: targets, labels and splits are the recent build's; the test users'
    ratings are not read (changing them changes no train or validation row)."""
    raw = data_root / "raw" / "ml-100k"
    cfg = MovieLensConfig()
    cf, rec = build_movielens(raw, cfg, collaborative_selector_factory(cfg)), \
        build_movielens(raw, cfg)
    for split in ("train", "valid", "test"):
        assert [(s.target, s.label) for s in cf[split]] == \
            [(s.target, s.label) for s in rec[split]]
    assert sum(a != b for a, b in zip(cf["test"], rec["test"], strict=True)) > 500
    # flip the ratings (1 <-> 5, 2 <-> 4) of the users owning no training window, rebuild:
    # no training row changes (their windows were chosen without reading those users)
    owners = []

    def record(candidates, target, user):
        owners.append(user)
        return list(range(len(candidates) - 10, len(candidates)))

    ratings = read_ratings("u.data", (raw / "u.data").read_bytes())
    build_windows(ratings, read_items("u.item", (raw / "u.item").read_bytes()), cfg,
                  select=record)
    split = split_windows(owners[-cfg.max_windows:], cfg)
    held = set(split["valid"]) | set(split["test"])
    flip = held - set(split["train"])
    assert len(held) - len(flip) == 1 and held.isdisjoint(training_users(ratings, cfg))
    lines = (raw / "u.data").read_text().splitlines()
    flipped = ["\t".join([u, i, str(6 - int(r)), t]) if u in flip else line
               for line in lines for u, i, r, t in [line.split("\t")]]
    (tmp_path / "u.data").write_text("\n".join(flipped) + "\n")
    (tmp_path / "u.item").write_bytes((raw / "u.item").read_bytes())
    again = build_movielens(tmp_path, cfg, collaborative_selector_factory(cfg))
    assert again["train"] == cf["train"]
    assert again["test"] != cf["test"]  # the flip did reach the data


def test_cli_collaborative(tmp_path):
    """data.prepare builds it (no model). User 1 (45 ratings, likes even ids) owns only
    training windows; user 2 (30 ratings, same taste) owns the test ones, so 2's windows read
    1's vectors: one training user, similarity +1 for items 1 rated on the target's side of
    its mean. 2's last target (30, even) shows the 10 newest even items, all liked."""
    raw = tmp_path / "raw"
    write_raw(raw)
    (raw / "u.data").write_text("".join(
        f"{u}\t{i}\t{4 if i % 2 == 0 else 2}\t{t + i}\n"
        for u, n, t in ((1, 45, 100), (2, 30, 200)) for i in range(1, n + 1)))
    assert data_prepare_main(["movielens", "--raw-dir", str(raw), "--out", str(tmp_path / "o"),
                              "--history-select", "collaborative", "--max-windows", "0"]) == 0
    test = json.loads((tmp_path / "o" / "test.json").read_text())
    assert len(test) == 6  # 55 windows: 44 train (A's 35 first), 5 valid, 6 test (all B's)
    liked = ", ".join(f'"Movie {i} (1995)"' for i in range(10, 29, 2))
    assert f"User Preference: {liked}\n" in test[-1]["input"]
    assert "User Unpreference: \n" in test[-1]["input"]
