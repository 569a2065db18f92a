"""BookCrossing (BX-Book-Ratings.csv + BX-Books.csv) -> TALLRec book samples.

Follows TALLRec's preprocess_book.py: ratings joined to books on ISBN (inner join), users
with more than 3 joined ratings, users split 8:1:1, per user one random target and up to
10 random other rated books as history, label = rating > 5 (BookCrossing's implicit
rating 0 therefore counts as "No.", as in TALLRec). TALLRec's user shuffle was unseeded;
here every random choice derives from `seed`, so a build is reproducible.

The CSVs are ';'-separated, '"'-quoted latin-1. BX-Books.csv has known dirty rows (a
backslash before a quote, `\\";`, shifts the columns; pandas drops them with
error_bad_lines=False). We skip such rows too, and count them: BuildReport says how many
rows of each kind were dropped, and why.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass, field
from pathlib import Path

from data.prompts import RecSample, book_item

RATINGS_FILE = "BX-Book-Ratings.csv"
BOOKS_FILE = "BX-Books.csv"


@dataclass(frozen=True)
class BookCrossingConfig:
    seed: int = 0
    min_ratings: int = 4  # TALLRec keeps users with > 3 joined ratings
    history_len: int = 10
    like_threshold: int = 5  # label = rating > like_threshold
    explicit_only: bool = False  # drop implicit (0) ratings; TALLRec keeps them
    split: tuple[float, float] = (0.8, 0.9)  # cut points over the shuffled users

    def __post_init__(self) -> None:
        if self.min_ratings < 2:
            raise ValueError("min_ratings must be >= 2 (one target plus history)")
        if self.history_len < 1:
            raise ValueError("history_len must be >= 1")
        lo, hi = self.split
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"split cut points must satisfy 0 <= a <= b <= 1, got {self.split}")


@dataclass
class BuildReport:
    book_rows: int = 0
    malformed_book_rows: list[int] = field(default_factory=list)  # line numbers
    duplicate_isbn_rows: int = 0  # later rows for an ISBN already seen (first one wins)
    rating_rows: int = 0
    malformed_rating_rows: list[int] = field(default_factory=list)
    unknown_isbn_ratings: int = 0  # not in BX-Books.csv: dropped by the inner join
    implicit_ratings_dropped: int = 0  # only with explicit_only
    users_total: int = 0
    users_too_few: int = 0  # fewer than min_ratings
    users_kept: int = 0

    def summary(self) -> str:
        return (
            f"books: {self.book_rows} rows, {len(self.malformed_book_rows)} malformed skipped, "
            f"{self.duplicate_isbn_rows} duplicate ISBNs skipped; ratings: {self.rating_rows} "
            f"rows, {len(self.malformed_rating_rows)} malformed skipped, "
            f"{self.unknown_isbn_ratings} with unknown ISBN dropped, "
            f"{self.implicit_ratings_dropped} implicit dropped; users: {self.users_total}, "
            f"{self.users_too_few} with too few ratings dropped, {self.users_kept} kept"
        )


@dataclass(frozen=True)
class Book:
    title: str
    author: str


def _rows(path: Path) -> tuple[list[str], list[tuple[int, list[str] | None]]]:
    """Header and (line number, fields or None when unparseable) for every data row."""
    text = path.read_bytes().decode("latin-1")  # every byte decodes: cannot fail
    header: list[str] | None = None
    out: list[tuple[int, list[str] | None]] = []
    for n, line in enumerate(io.StringIO(text, newline=""), start=1):
        if not line.strip():
            continue
        try:
            fields = next(csv.reader([line], delimiter=";", quotechar='"', strict=True))
        except csv.Error:
            fields = None
        if header is None:
            if fields is None:
                raise ValueError(f"{path}:{n}: unreadable header")
            header = fields
        else:
            out.append((n, fields))
    if header is None:
        raise ValueError(f"{path}: empty file")
    return header, out


def _need(path: Path, header: list[str], names: tuple[str, ...]) -> list[int]:
    missing = [c for c in names if c not in header]
    if missing:
        raise ValueError(f"{path}: header lacks column(s) {missing}; got {header}")
    return [header.index(c) for c in names]


def read_books(path: Path, report: BuildReport) -> dict[str, Book]:
    header, rows = _rows(path)
    i_isbn, i_title, i_author, i_year = _need(
        path, header, ("ISBN", "Book-Title", "Book-Author", "Year-Of-Publication")
    )
    books: dict[str, Book] = {}
    for n, fields in rows:
        report.book_rows += 1
        # The dirty rows: wrong field count, a field left ending in the stray backslash,
        # or columns shifted so the year is not a number.
        if (
            fields is None
            or len(fields) != len(header)
            or any(f.endswith("\\") for f in fields)
            or not fields[i_year].strip().isdigit()
        ):
            report.malformed_book_rows.append(n)
            continue
        isbn = fields[i_isbn]
        if isbn in books:
            report.duplicate_isbn_rows += 1
            continue
        books[isbn] = Book(fields[i_title], fields[i_author])
    return books


def read_ratings(
    path: Path, books: dict[str, Book], cfg: BookCrossingConfig, report: BuildReport
) -> dict[str, list[tuple[str, int]]]:
    header, rows = _rows(path)
    i_user, i_isbn, i_rating = _need(path, header, ("User-ID", "ISBN", "Book-Rating"))
    by_user: dict[str, list[tuple[str, int]]] = {}
    for n, fields in rows:
        report.rating_rows += 1
        if fields is None or len(fields) != len(header) or not fields[i_rating].isdigit():
            report.malformed_rating_rows.append(n)
            continue
        isbn, rating = fields[i_isbn], int(fields[i_rating])
        if isbn not in books:
            report.unknown_isbn_ratings += 1
            continue
        if cfg.explicit_only and rating == 0:
            report.implicit_ratings_dropped += 1
            continue
        by_user.setdefault(fields[i_user], []).append((isbn, rating))
    return by_user


def _user_sample(
    user: str, ratings: list[tuple[str, int]], books: dict[str, Book], cfg: BookCrossingConfig
) -> RecSample:
    # A per-user stream (str seeds hash deterministically), so one user's sample does not
    # depend on which other users are in the file.
    rng = random.Random(f"{cfg.seed}:{user}")
    items = list(ratings)
    rng.shuffle(items)
    *rest, (target, target_rating) = items
    history = rest[: cfg.history_len]

    def show(isbn: str) -> str:
        return book_item(books[isbn].title, books[isbn].author)

    return RecSample(
        preferences=[show(i) for i, r in history if r > cfg.like_threshold],
        unpreferences=[show(i) for i, r in history if r <= cfg.like_threshold],
        target=show(target),
        label=target_rating > cfg.like_threshold,
        domain="book",
    )


def build_bookcrossing(
    raw_dir: Path | str, cfg: BookCrossingConfig | None = None
) -> tuple[dict[str, list[RecSample]], BuildReport]:
    cfg = cfg or BookCrossingConfig()
    raw_dir = Path(raw_dir)
    for name in (RATINGS_FILE, BOOKS_FILE):
        if not (raw_dir / name).is_file():
            raise FileNotFoundError(f"{raw_dir / name} not found (BookCrossing raw CSVs)")
    report = BuildReport()
    books = read_books(raw_dir / BOOKS_FILE, report)
    by_user = read_ratings(raw_dir / RATINGS_FILE, books, cfg, report)
    report.users_total = len(by_user)
    users = [u for u, rs in by_user.items() if len(rs) >= cfg.min_ratings]
    report.users_too_few = report.users_total - len(users)
    report.users_kept = len(users)
    random.Random(cfg.seed).shuffle(users)
    a, b = int(len(users) * cfg.split[0]), int(len(users) * cfg.split[1])
    parts = {"train": users[:a], "valid": users[a:b], "test": users[b:]}
    splits = {
        name: [_user_sample(u, by_user[u], books, cfg) for u in group]
        for name, group in parts.items()
    }
    return splits, report
