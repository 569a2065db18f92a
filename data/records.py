"""Reading and writing TALLRec / Alpaca JSON files ({instruction, input, output} lists).

TALLRec's released files are accepted as they are. Every rejection names the file and the
row, so a bad row in a 10,000-row file can be found.
"""

from __future__ import annotations

import json
from pathlib import Path

from data.prompts import NO, YES, is_rec_record, parse_rec_record
from fileio import atomic_write, make_dir

REQUIRED = ("instruction", "input", "output")


class DataError(ValueError):
    """A data file or row that cannot be used; the message names file and row."""


def write_records(path: Path | str, records: list[dict]) -> None:
    # TALLRec writes json.dump(list, f, indent=4): ASCII escapes, no trailing newline;
    # matching it makes our MovieLens build byte-identical to the released files.
    path = Path(path)
    make_dir(path.parent)
    atomic_write(path, json.dumps(records, indent=4))


def read_json_list(path: Path | str) -> list:
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: not UTF-8 ({e.reason}); JSON files must be UTF-8 "
            f"(TALLRec's files are ASCII with \\u escapes)"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def validate_record(record, where: str, rec: bool | None = None) -> None:
    """rec=True: must be a TALLRec rec row; False: any Alpaca row; None: rec if it looks so."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
    bad = [k for k in REQUIRED if not isinstance(record[k], str)]
    if bad:
        raise DataError(f"{where}: field(s) {bad} must be strings")
    if rec is None:
        rec = is_rec_record(record)
    if not rec:
        return
    if record["output"] not in (YES, NO):
        raise DataError(f'{where}: rec output must be "Yes." or "No.", got {record["output"]!r}')
    try:
        sample = parse_rec_record(record)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if sample.history_len == 0:
        raise DataError(f"{where}: empty history (no preference and no unpreference items)")


def load_records(path: Path | str, rec: bool | None = None) -> list[dict]:
    """A validated list of records; rec as in validate_record."""
    path = Path(path)
    records = read_json_list(path)
    for i, record in enumerate(records):
        validate_record(record, f"{path}: row {i}", rec)
    return records
