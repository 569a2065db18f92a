import hashlib
import json
import zipfile

import pytest

from data.movielens import MovieLensConfig, build_movielens, read_genres
from data.records import write_records


@pytest.fixture(scope="module")
def built(data_root):
    return build_movielens(data_root / "raw" / "ml-100k")


def test_split_sizes_and_positives(built):
    # Counts from the shared README: 8000/1000/1000 rows, 4457/658/528 positives.
    assert {k: len(v) for k, v in built.items()} == {"train": 8000, "valid": 1000, "test": 1000}
    assert {k: sum(s.label for s in v) for k, v in built.items()} == {
        "train": 4457, "valid": 658, "test": 528,
    }


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_reproduces_tallrec_files(built, data_root, split):
    ref = json.loads((data_root / "tallrec" / "movie" / f"{split}.json").read_text())
    assert [s.to_record() for s in built[split]] == ref


@pytest.mark.parametrize("split, md5", [("valid", "dc77b292ea6a9b209ea47db560c2c284"),
                                        ("test", "c9307ab4af8aab3cf39286f95584062b")])
def test_written_file_is_byte_identical_to_release(built, tmp_path, split, md5):
    path = tmp_path / f"{split}.json"
    write_records(path, [s.to_record() for s in built[split]])
    assert hashlib.md5(path.read_bytes()).hexdigest() == md5


def test_zip_source_gives_the_same(built, data_root, tmp_path):
    zpath = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for name in ("u.data", "u.item"):
            zf.write(data_root / "raw" / "ml-100k" / name, f"ml-100k/{name}")
    from_zip = build_movielens(zpath)
    assert [s.to_record() for s in from_zip["test"]] == [s.to_record() for s in built["test"]]


def _write_raw(folder, items, ratings):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.item").write_bytes("\n".join(items).encode("latin-1") + b"\n")
    (folder / "u.data").write_text("\n".join(ratings) + "\n")


ITEMS = [f"{i}|Movie {i} (199{i})|01-Jan-1995||http://x|0" for i in range(1, 6)]
ITEMS[2] = "3|Misérables, Les (1995)|01-Jan-1995||http://x|0"  # latin-1 byte 0xE9


def test_windows_by_hand(tmp_path):
    # User 7 rates items 1..5; timestamps as strings sort "100" < "20" < "300" < "40" < "5":
    # order is items 1, 2, 3, 4, 5 by *string*, not 5, 2, 4, 1, 3 as numbers would give.
    ratings = ["7\t2\t4\t20", "7\t1\t5\t100", "7\t4\t1\t40", "7\t3\t2\t300", "7\t5\t4\t5"]
    _write_raw(tmp_path, ITEMS, ratings)
    cfg = MovieLensConfig(history_len=2, max_windows=None, split=(0.0, 0.0))
    test = build_movielens(tmp_path, cfg)["test"]
    got = [(s.preferences, s.unpreferences, s.target, s.label) for s in test]
    assert got == [
        (["Movie 1 (1991)", "Movie 2 (1992)"], [], "Misérables, Les (1995)", False),
        (["Movie 2 (1992)"], ["Misérables, Les (1995)"], "Movie 4 (1994)", False),
        ([], ["Misérables, Les (1995)", "Movie 4 (1994)"], "Movie 5 (1995)", True),
    ]


def test_max_windows_keeps_the_last(tmp_path):
    ratings = [f"1\t{i}\t5\t10{i}" for i in range(1, 6)] + [f"2\t{i}\t1\t20{i}" for i in (1, 2, 3)]
    _write_raw(tmp_path, ITEMS, ratings)
    cfg = MovieLensConfig(history_len=2, max_windows=2, split=(0.5, 0.5))
    out = build_movielens(tmp_path, cfg)
    # user 1 gives windows -> items 3, 4, 5 (liked); user 2 gives -> item 3 (disliked).
    # The last 2 are user 1's item-5 window and user 2's window.
    assert [s.target for s in out["train"]] == ["Movie 5 (1995)"]
    assert out["valid"] == []
    assert [(s.target, s.label) for s in out["test"]] == [("Misérables, Les (1995)", False)]


def test_unknown_item_id_is_an_error(tmp_path):
    _write_raw(tmp_path, ITEMS, ["1\t1\t5\t1", "1\t99\t5\t2"])
    with pytest.raises(ValueError, match=r"u\.data.*rating 2 .*unknown item id 99"):
        build_movielens(tmp_path)


def test_malformed_rating_line_names_file_and_line(tmp_path):
    _write_raw(tmp_path, ITEMS, ["1\t1\t5\t1", "1\t2\tfive\t2"])
    with pytest.raises(ValueError, match=r"u\.data:2: malformed rating line"):
        build_movielens(tmp_path)


def test_malformed_item_line_names_file_and_line(tmp_path):
    _write_raw(tmp_path, ITEMS + ["no pipes here"], ["1\t1\t5\t1"])
    with pytest.raises(ValueError, match=r"u\.item:6: malformed item line"):
        build_movielens(tmp_path)


def test_ratings_in_wrong_encoding_name_file_and_line(tmp_path):
    _write_raw(tmp_path, ITEMS, ["1\t1\t5\t1"])
    (tmp_path / "u.data").write_bytes(b"1\t1\t5\t1\n1\t2\t5\t\xe92\n")
    with pytest.raises(ValueError, match=r"u\.data:2: not valid ascii"):
        build_movielens(tmp_path)


def test_missing_source_and_bad_config(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_movielens(tmp_path / "nope")
    with pytest.raises(ValueError):
        MovieLensConfig(history_len=0)


def test_read_genres_by_hand(data_root):
    raw = (data_root / "raw" / "ml-100k" / "u.item").read_bytes()
    genres = read_genres("u.item", raw)
    assert len(genres) == 1682
    # u.item lines 1 and 2: Toy Story is flagged Animation, Children's, Comedy; GoldenEye
    # Action, Adventure, Thriller (read off the 0/1 columns against u.genre)
    assert genres["1"] == {"Animation", "Children's", "Comedy"}
    assert genres["2"] == {"Action", "Adventure", "Thriller"}


def test_read_genres_malformed_line_names_file_and_line():
    good = "1|Movie (1995)|01-Jan-1995||http://x|" + "|".join("0" * 18 + "1")
    assert read_genres("u.item", good.encode())["1"] == {"Western"}
    with pytest.raises(ValueError, match=r"u\.item:2: want 19 genre flags"):
        read_genres("u.item", (good + "\n2|Short|01-Jan-1995||http://x|0|1\n").encode())
