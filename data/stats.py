"""Token-length report for the TALLRec splits.

    python -m data.stats --tokenizer ../shared/data/tokenizer/llama/tokenizer.model

Lengths are of whole training sequences (bos + prompt + answer + eos) before any cutoff;
"over" rows are those that need history dropped (rec) or text cut (Alpaca) at --cutoff.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

from data.collate import CutoffStats, TokenizeConfig, Tokenizer, encode_record
from data.fewshot import REAL_DOMAINS, SPLITS, load_domain
from data.records import load_records
from model.tokenizer import load_tokenizer
from paths import DATA_ROOT_HELP, data_root


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.stats", description=__doc__.split("\n")[0])
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.model / tokenizer.json / .gguf, or a folder with one")
    p.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--cutoff", type=int, default=512, help="cutoff_len to check against")
    p.add_argument("--domains", default="movie,book,toy", help="comma-separated domains")
    p.add_argument("--alpaca", action="store_true", help="also report alpaca/alpaca_small.json")
    args = p.parse_args(argv)
    tok = load_tokenizer(args.tokenizer)
    root = data_root(args.data_root)
    print(f"tokenizer {args.tokenizer} (vocab {tok.vocab_size}), cutoff {args.cutoff}")
    domains = args.domains.split(",")
    unknown = set(domains) - set(REAL_DOMAINS) - {"toy"}
    if unknown:
        p.error(f"unknown domain(s) {sorted(unknown)}")
    for domain in (d for d in REAL_DOMAINS if d in domains):
        for split in SPLITS:
            try:
                records = load_domain(domain, split, root).records
            except FileNotFoundError as e:
                print(f"{domain}/{split}: skipped ({e})", file=sys.stderr)
                continue
            print(length_report(f"{domain}/{split}", records, tok, args.cutoff).line())
    if "toy" in domains:
        print(length_report("toy/train [synthetic]", load_domain("toy", "train").records, tok,
                            args.cutoff).line())
    if args.alpaca:
        records = load_records(root / "alpaca" / "alpaca_small.json", rec=False)
        print(length_report("alpaca_small", records, tok, args.cutoff).line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
