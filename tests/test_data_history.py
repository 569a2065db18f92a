"""Retrieved (semantic) histories: the selection on a hand-built embedding, the rows it keeps
identical to the recent build, and the CLI."""

import json
import math

import pytest
import torch

from data.history import SemanticSelector
from data.movielens import MovieLensConfig, build_movielens
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
    test = build_movielens(tmp_path, cfg, lambda titles: SemanticSelector(fake_vectors(), 10))
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
                           lambda titles: SemanticSelector(fake_vectors(), 10))["test"][-1]
    shown = sorted(int(t.split()[1]) for t in last.preferences + last.unpreferences)
    assert shown == [25, 26, 27, 28, 29, 30, 31, 32, 33, 38]


def test_same_windows_labels_and_splits_as_recent(data_root):
    """Real MovieLens with random embeddings: every row keeps its target and label; the rows
    whose pool is exactly the last 10 ratings are byte-identical to the recent build."""
    raw = data_root / "raw" / "ml-100k"
    g = torch.Generator().manual_seed(0)

    def make(titles):
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
        return lambda titles: SemanticSelector(fake_vectors(), keep)

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
