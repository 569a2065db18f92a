from pathlib import Path

import pytest

from data.bookcrossing import BookCrossingConfig, build_bookcrossing
from data.prompts import parse_rec_record
from data.records import validate_record

FIXTURE = Path(__file__).parent / "fixtures" / "bookcrossing"


def _fixture_ratings() -> dict[str, dict[str, int]]:
    # Valid ratings of known books per user (ISBN -> rating), read off the fixture CSV.
    out: dict[str, dict[str, int]] = {}
    for line in (FIXTURE / "BX-Book-Ratings.csv").read_text().splitlines()[1:]:
        f = [x.strip('"') for x in line.split(";")]
        if len(f) == 3 and f[2].isdigit() and f[1].startswith("00000000"):
            out.setdefault(f[0], {})[f[1]] = int(f[2])
    return out


TITLES = {
    "0000000001": '"The Bean Trees" written by Barbara Kingsolver',
    "0000000002": '"Sula" written by Toni Morrison',
    "0000000003": '"Love; Loss and Other Semicolons" written by Ann Author',
    "0000000004": '"Cien años de soledad" written by Gabriel García Márquez',
    "0000000005": '"Sick Puppy" written by Carl Hiaasen',
    "0000000006": '"The Firm" written by John Grisham',
    "0000000007": "\"Dirk Gently's Holistic Detective Agency\" written by Douglas Adams",
    "0000000008": '"Interview with the Vampire" written by Anne Rice',
    "0000000009": '"Pigs in Heaven" written by Barbara Kingsolver',
    "0000000010": '"The Anodyne Necklace" written by Martha Grimes',
    "0000000011": '"Sula" written by Toni Morrison',
    "0000000012": '"Les Misérables" written by Victor Hugo',
}


@pytest.fixture(scope="module")
def built():
    return build_bookcrossing(FIXTURE, BookCrossingConfig(seed=0))


def test_dirty_rows_are_skipped_and_counted(built):
    _, report = built
    assert report.book_rows == 15
    # Line 8: the backslash-quote row; line 12: one field too many.
    assert report.malformed_book_rows == [8, 12]
    assert report.duplicate_isbn_rows == 1  # line 16 repeats ISBN 0000000002
    assert report.rating_rows == 66
    assert report.malformed_rating_rows == [65, 66]  # missing field; rating "x"
    # 9999999999 is in no book row; 078946697X only in the skipped dirty row.
    assert report.unknown_isbn_ratings == 2
    assert (report.users_total, report.users_too_few, report.users_kept) == (11, 1, 10)
    assert "2 malformed skipped" in report.summary()


def test_split_8_1_1_by_user(built):
    splits, _ = built
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "valid": 1, "test": 1}


def test_samples_match_the_raw_ratings(built):
    # Every kept user has <= 8 joined ratings, so history = all their other ratings: each
    # sample must be exactly one user's ratings, liked = rating > 5.
    splits, _ = built
    users = {
        u: sorted((TITLES[i], v > 5) for i, v in r.items())
        for u, r in _fixture_ratings().items() if len(r) >= 4
    }
    assert len(users) == 10
    matched = []
    for sample in (s for v in splits.values() for s in v):
        validate_record(sample.to_record(), "fixture", rec=True)
        assert parse_rec_record(sample.to_record()) == sample
        got = sorted([(t, True) for t in sample.preferences]
                     + [(t, False) for t in sample.unpreferences]
                     + [(sample.target, sample.label)])
        matched += [u for u, want in users.items() if want == got]
    assert sorted(matched) == sorted(users)  # one sample per user, none invented or lost


def test_latin1_and_quoted_semicolon_survive(built):
    splits, _ = built
    text = " ".join(s.to_record()["input"] for v in splits.values() for s in v)
    assert "Gabriel García Márquez" in text
    assert '"Love; Loss and Other Semicolons" written by Ann Author' in text
    assert "X-Men" not in text and "Extra Field" not in text


def test_deterministic_given_seed():
    a, _ = build_bookcrossing(FIXTURE, BookCrossingConfig(seed=0))
    b, _ = build_bookcrossing(FIXTURE, BookCrossingConfig(seed=0))
    c, _ = build_bookcrossing(FIXTURE, BookCrossingConfig(seed=1))
    assert a == b
    assert a != c


def test_history_len_and_min_ratings_options():
    splits, report = build_bookcrossing(FIXTURE, BookCrossingConfig(history_len=2, min_ratings=7))
    samples = [s for v in splits.values() for s in v]
    assert all(s.history_len == 2 for s in samples)
    # Users with >= 7 joined ratings: 1001 (8), 1006 (8), 1008 (7), 1009 (7).
    assert report.users_kept == 4 and len(samples) == 4


def test_explicit_only_counts_implicit_ratings():
    zeros = sum(1 for r in _fixture_ratings().values() for v in r.values() if v == 0)
    _, report = build_bookcrossing(FIXTURE, BookCrossingConfig(explicit_only=True))
    assert report.implicit_ratings_dropped == zeros > 0


def test_missing_files_and_bad_header(tmp_path):
    with pytest.raises(FileNotFoundError, match="BX-Book-Ratings.csv"):
        build_bookcrossing(tmp_path)
    (tmp_path / "BX-Book-Ratings.csv").write_text('"User";"ISBN";"Book-Rating"\n')
    (tmp_path / "BX-Books.csv").write_bytes((FIXTURE / "BX-Books.csv").read_bytes())
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['User-ID'\]"):
        build_bookcrossing(tmp_path)
