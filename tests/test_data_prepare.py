import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import data.prepare as prepare
from data.prepare import FetchError, fetch_movielens, main

FIXTURE = Path(__file__).parent / "fixtures" / "bookcrossing"
ROOT = Path(__file__).resolve().parent.parent


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def ml_zip(data_root, tmp_path):
    """A locally built stand-in for ml-100k.zip (same layout, different bytes)."""
    path = tmp_path / "src" / "ml-100k.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("u.data", "u.item"):
            zf.write(data_root / "raw" / "ml-100k" / name, f"ml-100k/{name}")
    return path


def test_help_lists_options():
    out = subprocess.run([sys.executable, "-m", "data.prepare", "movielens", "--help"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--raw-dir", "--out", "--history-len", "--max-windows", "--like-threshold"):
        assert flag in out
    out = subprocess.run([sys.executable, "-m", "data.prepare", "bookcrossing", "--help"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for flag in ("--seed", "--min-ratings", "--history-len", "--like-threshold",
                 "--explicit-only"):
        assert flag in out


def test_movielens_cli_writes_released_files(data_root, tmp_path):
    assert main(["movielens", "--raw-dir", str(data_root / "raw" / "ml-100k"),
                 "--out", str(tmp_path)]) == 0
    assert _md5(tmp_path / "valid.json") == "dc77b292ea6a9b209ea47db560c2c284"
    assert _md5(tmp_path / "test.json") == "c9307ab4af8aab3cf39286f95584062b"
    assert len(json.loads((tmp_path / "train.json").read_text())) == 8000


def test_movielens_cli_options(ml_zip, tmp_path):
    out = tmp_path / "out"
    assert main(["movielens", "--raw-dir", str(ml_zip), "--out", str(out),
                 "--history-len", "5", "--max-windows", "100"]) == 0
    rows = [json.loads((out / f"{s}.json").read_text()) for s in ("train", "valid", "test")]
    assert [len(r) for r in rows] == [80, 10, 10]
    first = rows[2][0]["input"]
    assert first.count('", "') + first.count(': "') == 5  # 5 quoted history items


def test_fetch_checks_md5_and_keeps_good_file(ml_zip, tmp_path):
    dest = tmp_path / "cache"
    got = fetch_movielens(dest, url=ml_zip.as_uri(), md5=_md5(ml_zip))
    assert got == dest / "ml-100k.zip" and _md5(got) == _md5(ml_zip)
    # A second call reuses the verified file (the source is gone now).
    ml_zip.unlink()
    assert fetch_movielens(dest, url=ml_zip.as_uri(), md5=_md5(got)) == got


def test_fetch_rejects_wrong_md5_and_keeps_nothing(ml_zip, tmp_path):
    dest = tmp_path / "cache"
    with pytest.raises(FetchError, match="expected 0e33842e24a9c977be4e0107933c0723; not kept"):
        fetch_movielens(dest, url=ml_zip.as_uri())
    assert list(dest.iterdir()) == []


def test_fetch_rejects_corrupt_cached_file(tmp_path):
    (tmp_path / "ml-100k.zip").write_bytes(b"junk")
    with pytest.raises(FetchError, match="delete it and retry"):
        fetch_movielens(tmp_path)


def test_offline_prints_what_to_download_and_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TALLREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prepare, "ML100K_URL", (tmp_path / "nowhere.zip").as_uri())
    assert main(["movielens", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "nowhere.zip" in err
    assert f"put it at {tmp_path / 'cache' / 'ml-100k.zip'}" in err
    assert "0e33842e24a9c977be4e0107933c0723" in err
    assert not (tmp_path / "out").exists()


def test_movielens_cli_downloads_into_cache(ml_zip, tmp_path, monkeypatch):
    monkeypatch.setenv("TALLREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prepare, "ML100K_URL", ml_zip.as_uri())
    monkeypatch.setattr(prepare, "ML100K_MD5", _md5(ml_zip))
    assert main(["movielens", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "cache" / "ml-100k.zip").is_file()
    assert _md5(tmp_path / "out" / "test.json") == "c9307ab4af8aab3cf39286f95584062b"


def test_bookcrossing_cli(tmp_path, capsys):
    assert main(["bookcrossing", "--raw-dir", str(FIXTURE), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 malformed skipped" in out and "10 kept" in out
    sizes = [len(json.loads((tmp_path / f"{s}.json").read_text()))
             for s in ("train", "valid", "test")]
    assert sizes == [8, 1, 1]


def test_bookcrossing_cli_missing_dir_is_an_error(tmp_path, capsys):
    assert main(["bookcrossing", "--raw-dir", str(tmp_path), "--out", str(tmp_path)]) == 1
    assert "BX-Book-Ratings.csv not found" in capsys.readouterr().err


def test_toy_cli_is_marked_synthetic(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path)]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    rows = json.loads((tmp_path / "test.json").read_text())
    assert len(rows) == 300 and all(r["synthetic"] is True for r in rows)
