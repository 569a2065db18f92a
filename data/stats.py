"""Token-length report for the TALLRec splits, given a tokenizer (`python -m engine.stats`
loads one and reports every split).

Lengths are of whole training sequences (bos + prompt + answer + eos) before any cutoff;
"over" rows are those that need history dropped (rec) or text cut (Alpaca) at --cutoff.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from data.collate import CutoffStats, TokenizeConfig, Tokenizer, encode_record


@dataclass
class LengthReport:
    name: str
    rows: int
    median: float
    p95: float
    max: int
    over: int  # rows longer than the cutoff
    cut: CutoffStats

    def line(self) -> str:
        return (
            f"{self.name:<22} rows {self.rows:>5}  median {self.median:>6.1f}  p95 {self.p95:>6.1f}"
            f"  max {self.max:>5}  over cutoff {self.over:>4}  "
            f"(history items dropped {self.cut.items_dropped}, "
            f"Alpaca cut {self.cut.input_truncated + self.cut.response_truncated})"
        )


def length_report(name: str, records: list[dict], tok: Tokenizer, cutoff: int) -> LengthReport:
    if not records:
        raise ValueError(f"{name}: no rows")
    # One pass without a cutoff measures; only rows that are over go through the real one.
    free = TokenizeConfig(cutoff_len=1 << 30)
    lengths = [len(encode_record(r, tok, free).input_ids) for r in records]
    cut = CutoffStats()
    capped = TokenizeConfig(cutoff_len=cutoff)
    over = [r for r, n in zip(records, lengths, strict=True) if n > cutoff]
    for r in over:
        encode_record(r, tok, capped, cut)
    q = statistics.quantiles(lengths, n=20) if len(lengths) > 1 else [lengths[0]] * 19
    return LengthReport(name, len(records), statistics.median(lengths), q[18], max(lengths),
                        len(over), cut)

