"""Token-length report for the TALLRec splits: how long the prompts are under a tokenizer and
how many rows a --cutoff-len would cut.

    python -m engine.stats --tokenizer ../shared/data/tokenizer/llama/tokenizer.model

Lengths are of whole training sequences (bos + prompt + answer + eos) before any cutoff;
"over" rows are those that need history dropped (rec) or text cut (Alpaca) at --cutoff.
"""

from __future__ import annotations

import argparse
import sys

from data.fewshot import REAL_DOMAINS, SPLITS, load_domain
from data.records import load_records
from data.stats import length_report
from model.tokenizer import load_tokenizer
from paths import DATA_ROOT_HELP, data_root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.stats", description=__doc__.split("\n")[0])
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
