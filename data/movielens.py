"""MovieLens-100K -> TALLRec movie samples, reproducing TALLRec's preprocess_movie.py.

The construction, as in TALLRec's released valid/test files (tests check them byte for byte):
- ratings are grouped by user in order of first appearance in u.data;
- each user's ratings are sorted by the timestamp *string* (a stable sort: ties keep file
  order; all ML-100K timestamps have 9 digits, so this equals a numeric sort there);
- every position i >= history_len is one window: the previous history_len ratings are the
  history (rating > 3 -> preference, else unpreference), rating i is the target;
- windows are listed user by user, the last `max_windows` are kept and split 80/10/10 in
  order (int() of 0.8 n and 0.9 n as cut points).

A `select` function (data/history.py: retrieved histories after ReLLa) changes only which
history items a window shows: it picks history_len of the last `history_pool` ratings before
the target, and is told the window's user. Windows, targets, labels and splits stay those of
the recent-history build, so the builds pair up row by row.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from data.prompts import RecSample


@dataclass(frozen=True)
class MovieLensConfig:
    history_len: int = 10
    max_windows: int | None = 10_000  # None keeps every window
    like_threshold: int = 3  # label = rating > like_threshold
    split: tuple[float, float] = (0.8, 0.9)  # cut points of train | valid | test
    history_pool: int = 50  # candidates a `select` function chooses from (recent: unused)

    def __post_init__(self) -> None:
        if self.history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {self.history_len}")
        if self.history_pool < self.history_len:
            raise ValueError(f"history_pool ({self.history_pool}) must be >= history_len "
                             f"({self.history_len})")
        if self.max_windows is not None and self.max_windows < 1:
            raise ValueError(f"max_windows must be >= 1 or None, got {self.max_windows}")
        lo, hi = self.split
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"split cut points must satisfy 0 <= a <= b <= 1, got {self.split}")


@dataclass(frozen=True)
class Rating:
    user: str
    item: str
    rating: int
    timestamp: str  # kept as text: TALLRec sorts it as a string


class RawFiles:
    """u.data / u.item from a folder or from ml-100k.zip (read in place, not extracted)."""

    def __init__(self, source: Path | str):
        self.source = Path(source)
        if not self.source.exists():
            raise FileNotFoundError(f"MovieLens source not found: {self.source}")

    def read(self, name: str) -> tuple[str, bytes]:
        if self.source.is_dir():
            for path in (self.source / name, self.source / "ml-100k" / name):
                if path.is_file():
                    return str(path), path.read_bytes()
            raise FileNotFoundError(f"{name} not found in {self.source} (nor in ml-100k/)")
        with zipfile.ZipFile(self.source) as zf:
            members = [n for n in zf.namelist() if n == name or n.endswith("/" + name)]
            if not members:
                raise FileNotFoundError(f"{name} not found inside {self.source}")
            return f"{self.source}!{members[0]}", zf.read(members[0])


def _lines(label: str, raw: bytes, encoding: str) -> Iterator[tuple[int, str]]:
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{label}:{line}: not valid {encoding}: {e.reason}") from None
    for n, line in enumerate(io.StringIO(text, newline="\n"), start=1):
        line = line.rstrip("\n").rstrip("\r")
        if line:
            yield n, line


def read_items(label: str, raw: bytes) -> dict[str, str]:
    # u.item is latin-1 (e.g. "Misérables, Les (1995)"); TALLRec reads it as ISO-8859-1.
    titles: dict[str, str] = {}
    for n, line in _lines(label, raw, "latin-1"):
        fields = line.split("|")
        if len(fields) < 2 or not fields[0].strip().isdigit():
            raise ValueError(f"{label}:{n}: malformed item line: {line[:80]!r}")
        if fields[0] in titles:
            raise ValueError(f"{label}:{n}: duplicate item id {fields[0]}")
        titles[fields[0]] = fields[1]
    return titles


GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")  # u.genre's order


def read_genres(label: str, raw: bytes) -> dict[str, frozenset[str]]:
    """item id -> its genres, from u.item's 19 trailing 0/1 flags (ml-100k's README)."""
    genres: dict[str, frozenset[str]] = {}
    for n, line in _lines(label, raw, "latin-1"):
        fields = line.split("|")
        flags = fields[-len(GENRES):]
        if len(fields) < 5 + len(GENRES) or any(f not in ("0", "1") for f in flags):
            raise ValueError(f"{label}:{n}: want {len(GENRES)} genre flags (0/1) at the end of "
                             f"the item line: {line[:80]!r}")
        genres[fields[0]] = frozenset(g for g, f in zip(GENRES, flags, strict=True) if f == "1")
    return genres


def read_ratings(label: str, raw: bytes) -> list[Rating]:
    ratings = []
    for n, line in _lines(label, raw, "ascii"):
        fields = line.split("\t")
        if len(fields) != 4 or not all(f.strip().isdigit() for f in fields):
            raise ValueError(
                f"{label}:{n}: malformed rating line (want user<TAB>item<TAB>rating<TAB>"
                f"timestamp): {line[:80]!r}"
            )
        user, item, rating, ts = fields
        ratings.append(Rating(user, item, int(rating), ts))
    return ratings


# (candidate item ids, oldest first; target item id; the window's user) -> positions of the
# items to show
HistorySelect = Callable[[list[str], str, str], list[int]]


def build_windows(
    ratings: list[Rating], titles: dict[str, str], cfg: MovieLensConfig, label: str = "u.data",
    select: HistorySelect | None = None,
) -> list[RecSample]:
    by_user: dict[str, list[Rating]] = {}  # dicts keep first-appearance order
    for n, r in enumerate(ratings, start=1):
        if r.item not in titles:
            raise ValueError(f"{label}: rating {n} (user {r.user}) names unknown item id {r.item}")
        by_user.setdefault(r.user, []).append(r)

    h = cfg.history_len
    windows: list[RecSample] = []
    for rows in by_user.values():
        rows = sorted(rows, key=lambda r: r.timestamp)
        liked = [r.rating > cfg.like_threshold for r in rows]
        for i in range(h, len(rows)):
            hist = range(i - h, i)
            if select is not None:
                pool = list(range(max(0, i - cfg.history_pool), i))
                chosen = select([rows[j].item for j in pool], rows[i].item, rows[i].user)
                if len(set(chosen)) != h or not all(0 <= k < len(pool) for k in chosen):
                    raise ValueError(f"history selector returned {chosen!r}: want {h} distinct "
                                     f"positions among {len(pool)} candidates")
                hist = [pool[k] for k in sorted(chosen)]  # shown oldest first, as recent ones
            windows.append(
                RecSample(
                    preferences=[titles[rows[j].item] for j in hist if liked[j]],
                    unpreferences=[titles[rows[j].item] for j in hist if not liked[j]],
                    target=titles[rows[i].item],
                    label=liked[i],
                    domain="movie",
                )
            )
    if cfg.max_windows is not None:
        windows = windows[-cfg.max_windows :]
    return windows


def split_windows(windows: list, cfg: MovieLensConfig) -> dict[str, list]:
    n = len(windows)
    a, b = int(n * cfg.split[0]), int(n * cfg.split[1])
    return {"train": windows[:a], "valid": windows[a:b], "test": windows[b:]}


def training_users(ratings: list[Rating], cfg: MovieLensConfig) -> set[str]:
    """Users owning no validation or test window (the windows build_windows makes)."""
    by_user: dict[str, int] = {}
    for r in ratings:
        by_user[r.user] = by_user.get(r.user, 0) + 1
    owners = [u for u, n in by_user.items() for _ in range(cfg.history_len, n)]
    if cfg.max_windows is not None:
        owners = owners[-cfg.max_windows :]
    split = split_windows(owners, cfg)
    return set(by_user) - set(split["valid"]) - set(split["test"])


def collaborative_selector_factory(cfg: MovieLensConfig):
    """For `build_movielens(make_select=...)`: item vectors from the training users' ratings
    (data/history.py, CollaborativeSelector)."""
    from data.history import CollaborativeSelector

    def make(titles: dict[str, str], ratings: list[Rating]) -> CollaborativeSelector:
        return CollaborativeSelector(ratings, training_users(ratings, cfg), cfg.history_len)

    return make


def build_movielens(
    source: Path | str, cfg: MovieLensConfig | None = None,
    make_select: Callable[[dict[str, str], list[Rating]], HistorySelect] | None = None,
) -> dict[str, list[RecSample]]:
    """train/valid/test RecSamples from an ml-100k folder or zip. `make_select`, given the
    item titles (id -> title) and the ratings, returns the history selector (None: the
    recent history)."""
    cfg = cfg or MovieLensConfig()
    raw = RawFiles(source)
    titles = read_items(*raw.read("u.item"))
    data_label, data_bytes = raw.read("u.data")
    ratings = read_ratings(data_label, data_bytes)
    select = make_select(titles, ratings) if make_select is not None else None
    return split_windows(build_windows(ratings, titles, cfg, data_label, select), cfg)
