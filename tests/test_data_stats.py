from data.stats import length_report
from engine.stats import main
from tests.test_data_collate import CharTok, rec


def test_length_report_by_hand():
    # CharTok: one token per character. The rows are 428, 436 and 468 tokens long (bos +
    # 421/429/461 characters + eos); each '"LongerTitle", ' dropped frees 15 tokens.
    records = [rec(["A"], []), rec(["A", "B"], ["C"]), rec(["LongerTitle"] * 3, [])]
    report = length_report("x", records, CharTok(), cutoff=440)
    assert (report.rows, report.median, report.max, report.over) == (3, 436, 468, 1)
    assert (report.cut.history_dropped, report.cut.items_dropped) == (1, 2)  # 468-30 <= 440


def test_cli_reports_every_split(data_root, capsys):
    tok = data_root / "tokenizer" / "llama" / "tokenizer.model"
    assert main(["--tokenizer", str(tok), "--data-root", str(data_root), "--domains",
                 "book,toy"]) == 0
    out = capsys.readouterr().out
    for name in ("book/train", "book/valid", "book/test", "toy/train [synthetic]"):
        assert name in out
    assert "movie/" not in out
    book_test = next(ln for ln in out.splitlines() if ln.startswith("book/test"))
    assert "max   607" in book_test and "over cutoff    1" in book_test
