import json

import pytest

from data.fewshot import (
    Split,
    k_shot,
    k_shot_split,
    load_alpaca,
    load_domain,
    mix_domains,
    shuffled,
)
from data.prompts import RecSample
from data.records import DataError, load_records, write_records


def _rec(i: int, label: bool = True) -> dict:
    return RecSample([f"M{i} (1990)"], [], f"T{i} (1991)", label, "movie").to_record()


def _write(path, rows):
    path.write_text(json.dumps(rows, indent=4))
    return path


# --- loading and validation ---------------------------------------------------------------


def test_load_shared_domains(data_root):
    sizes = {(d, s): len(load_domain(d, s, data_root)) for d in ("movie", "book")
             for s in ("train", "valid", "test")}
    assert sizes == {
        ("movie", "train"): 8000, ("movie", "valid"): 1000, ("movie", "test"): 1000,
        ("book", "train"): 1427, ("book", "valid"): 1000, ("book", "test"): 2427,
    }
    test = load_domain("book", "test", data_root)
    assert sum(r["output"] == "Yes." for r in test.records) == 1054
    assert not test.synthetic and "SYNTHETIC" not in test.describe()


def test_load_alpaca(data_root):
    small = load_alpaca("alpaca_small", data_root)
    assert len(small) == 2000
    assert sum(r["input"] == "" for r in small.records) > 0  # both template kinds occur
    assert len(load_alpaca(str(data_root / "alpaca" / "alpaca_sample_pretty.json"))) == 200


def test_toy_domain_is_marked_synthetic():
    toy = load_domain("toy", "valid")
    assert toy.synthetic and "SYNTHETIC" in toy.describe()
    assert all(r["synthetic"] is True for r in toy.records)
    mixed = mix_domains([toy, Split("movie", "valid", [_rec(i) for i in range(5)], "x")], 3, 0)
    assert mixed.synthetic


def test_unknown_domain_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown domain"):
        load_domain("music", "test", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        load_domain("movie", "dev", tmp_path)
    with pytest.raises(FileNotFoundError, match="data.prepare"):
        load_domain("movie", "test", tmp_path)


def test_row_without_input_names_file_and_row(tmp_path):
    rows = [_rec(0), {"instruction": "x", "output": "Yes."}]
    path = _write(tmp_path / "a.json", rows)
    with pytest.raises(DataError, match=r"a\.json: row 1: missing field\(s\) \['input'\]"):
        load_records(path)


def test_row_without_output_names_file_and_row(tmp_path):
    path = _write(tmp_path / "a.json", [_rec(0), _rec(1), {"instruction": "x", "input": ""}])
    with pytest.raises(DataError, match=r"row 2: missing field\(s\) \['output'\]"):
        load_records(path, rec=False)


def test_rec_output_must_be_yes_or_no(tmp_path):
    bad = _rec(1)
    bad["output"] = "yes"
    path = _write(tmp_path / "a.json", [_rec(0), bad])
    with pytest.raises(DataError, match=r'a\.json: row 1: rec output must be "Yes." or "No."'):
        load_records(path)
    # Alpaca rows may answer anything.
    load_records(_write(tmp_path / "b.json", [{"instruction": "i", "input": "", "output": "x"}]))


def test_empty_history_is_an_error(tmp_path):
    empty = RecSample([], [], "T (1991)", True, "movie").to_record()
    path = _write(tmp_path / "a.json", [_rec(0), _rec(1), empty])
    with pytest.raises(DataError, match=r"row 2: empty history"):
        load_records(path)


def test_garbled_rec_input_is_an_error(tmp_path):
    bad = _rec(0)
    bad["input"] = bad["input"].replace("User Unpreference", "User Dislikes")
    with pytest.raises(DataError, match=r"row 0: not a TALLRec rec input"):
        load_records(_write(tmp_path / "a.json", [bad]), rec=True)


def test_wrong_encoding_names_file_and_line(tmp_path):
    path = tmp_path / "latin.json"
    text = json.dumps([_rec(0), _rec(1)], indent=4).replace("M1 (1990)", "Misérables")
    path.write_bytes(text.encode("latin-1"))
    line = text.splitlines().index(next(ln for ln in text.splitlines() if "Mis" in ln)) + 1
    with pytest.raises(DataError, match=rf"latin\.json: line {line}: not UTF-8"):
        load_records(path)


def test_not_json_or_not_a_list(tmp_path):
    (tmp_path / "a.json").write_text('[{"instruction": 1,')
    with pytest.raises(DataError, match=r"a\.json: line 1: invalid JSON"):
        load_records(tmp_path / "a.json")
    with pytest.raises(DataError, match="expected a JSON list"):
        load_records(_write(tmp_path / "b.json", {"instruction": "x"}))


def test_write_then_load_round_trips_non_ascii(tmp_path):
    rows = [RecSample(["Misérables, Les (1995)"], [], "T", False, "movie").to_record()]
    write_records(tmp_path / "o" / "x.json", rows)
    raw = (tmp_path / "o" / "x.json").read_bytes()
    assert b"Mis\\u00e9rables" in raw and not raw.endswith(b"\n")  # TALLRec's json.dump style
    assert load_records(tmp_path / "o" / "x.json") == rows


# --- K-shot sampling -------------------------------------------------------------------


@pytest.mark.parametrize("domain,k,seed", [("movie", 64, 0), ("movie", 256, 42),
                                             ("book", 16, 1)])
def test_k_shot_is_hf_datasets_shuffle_select(data_root, domain, k, seed):
    """TALLRec draws its K shots with `train.shuffle(seed=seed).select(range(K))`: HF
    datasets itself is the reference, on the real train split."""
    from datasets import Dataset  # test-only reference (requirements-test.txt)

    path = data_root / "tallrec" / domain / "train.json"
    ref = Dataset.from_list(json.loads(path.read_text()))
    expected = ref.shuffle(seed=seed).select(range(k)).to_list()
    pool = load_domain(domain, "train", data_root)
    assert k_shot(pool.records, k, seed) == expected
    assert k_shot_split(pool, k, seed).records == expected
    whole = ref.shuffle(seed=seed).to_list()
    assert shuffled(pool.records, seed) == whole == k_shot(pool.records, -1, seed)


def test_k_shot_is_seeded_prefix_of_shuffle():
    pool = list(range(10))
    assert k_shot(pool, 3, 0) == [4, 6, 2]
    assert k_shot(pool, 3, 0) == k_shot(pool, 3, 0)
    assert k_shot(pool, 5, 0)[:3] == k_shot(pool, 3, 0)  # more shots extend, not reshuffle
    assert k_shot(pool, 3, 1) != k_shot(pool, 3, 0)
    assert sorted(k_shot(pool, -1, 0)) == pool


def test_k_shot_on_real_pool_is_deterministic(data_root):
    pool = load_domain("book", "train", data_root)
    a, b = k_shot_split(pool, 64, 0), k_shot_split(pool, 64, 0)
    assert a.records == b.records and len(a) == 64
    assert len({json.dumps(r) for r in a.records}) == 64  # no row drawn twice


def test_k_larger_than_pool_is_an_error():
    with pytest.raises(ValueError, match="asked for 11 shots but the pool has only 10 rows"):
        k_shot(list(range(10)), 11, 0)
    with pytest.raises(ValueError, match="k must be"):
        k_shot(list(range(10)), 0, 0)


def test_mix_domains_takes_k_from_each_in_order():
    movie = Split("movie", "train", [_rec(i) for i in range(10)], "m")
    book = Split("book", "train", [{"id": i} for i in range(20)], "b")
    mixed = mix_domains([movie, book], 4, seed=0)
    assert len(mixed) == 8 and mixed.domain == "movie+book"
    assert mixed.records[:4] == k_shot(movie.records, 4, 0)
    assert mixed.records[4:] == k_shot(book.records, 4, 0)
    assert not mixed.synthetic
