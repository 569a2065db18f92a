"""Build TALLRec-format train/valid/test.json from raw data.

    python -m data.prepare movielens [--raw-dir DIR_OR_ZIP] --out DIR
    python -m engine.prepare movielens --history-select semantic [--history-pool 50] --out DIR
    python -m data.prepare movielens --history-select collaborative [--history-pool 50] --out DIR
    python -m data.prepare bookcrossing --raw-dir DIR --out DIR
    python -m data.prepare toy --out DIR

Without --raw-dir, movielens uses ml-100k.zip from the cache, downloading it from GroupLens
(md5-checked) when missing; offline, it says what to download and where to put it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.error
import urllib.request
from pathlib import Path

from data.bookcrossing import BookCrossingConfig, build_bookcrossing
from data.history import HISTORY_SELECT
from data.movielens import MovieLensConfig, build_movielens, collaborative_selector_factory
from data.records import write_records
from data.toy import ToyConfig, toy_records
from fileio import WriteError, atomic_write, describe, make_dir
from paths import cache_dir

ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_MD5 = "0e33842e24a9c977be4e0107933c0723"


class FetchError(RuntimeError):
    pass


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_movielens(
    dest_dir: Path | None = None, url: str | None = None, md5: str | None = None,
    timeout: float = 30,
) -> Path:
    """Path of a checksum-verified ml-100k.zip in dest_dir (default: the cache)."""
    url, md5 = url or ML100K_URL, md5 or ML100K_MD5
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_dir()
    make_dir(dest_dir)
    target = dest_dir / "ml-100k.zip"
    if target.is_file():
        got = md5sum(target)
        if got != md5:
            raise FetchError(f"{target} has md5 {got}, expected {md5}: delete it and retry")
        return target
    hint = (f"Download it by hand and put it at {target}\n"
            f"(or pass --raw-dir pointing at the zip or its unpacked ml-100k/ folder); "
            f"expected md5 {md5}.")

    def download(tmp: Path):
        # Network errors are FetchErrors; an error writing `tmp` stays an OSError, which
        # atomic_write reports as a write failure. Either way nothing is kept.
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as e:
            raise FetchError(f"could not download {url} ({e}).\n{hint}") from None
        with resp, open(tmp, "wb") as f:
            while True:
                try:
                    chunk = resp.read(1 << 20)
                except OSError as e:
                    raise FetchError(f"could not download {url} ({e}).\n{hint}") from None
                if not chunk:
                    break
                f.write(chunk)
        got = md5sum(tmp)
        if got != md5:
            raise FetchError(f"downloaded {url} has md5 {got}, expected {md5}; not kept")

    atomic_write(target, download)
    return target


def check_out(out: Path) -> None:
    """Refuse an --out that cannot become a folder before the (slow) build starts."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder; choose another --out")
    above = next((p for p in out.parents if p.exists()), Path("."))
    if not above.is_dir():
        raise NotADirectoryError(f"--out {out}: {above} is a file, not a folder")


def _write_splits(out: Path, splits: dict[str, list[dict]]) -> None:
    make_dir(out)
    for name, records in splits.items():
        write_records(out / f"{name}.json", records)
        print(f"wrote {out / f'{name}.json'}: {len(records)} rows, "
              f"{sum(r['output'] == 'Yes.' for r in records)} Yes.")


def cmd_movielens(args: argparse.Namespace) -> int:
    try:
        source = Path(args.raw_dir) if args.raw_dir else fetch_movielens()
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = MovieLensConfig(
        history_len=args.history_len,
        max_windows=args.max_windows or None,
        like_threshold=args.like_threshold,
        history_pool=args.history_pool,
    )
    make_select = None
    if args.history_select == "semantic":
        if args.make_semantic is None:  # data/ never loads a model (see engine/prepare.py)
            print("error: --history-select semantic embeds titles with a base model: run it as "
                  "python -m engine.prepare movielens --history-select semantic ...",
                  file=sys.stderr)
            return 2
        make_select = args.make_semantic(cfg.history_len, args.embed_base, args.embed_tokenizer)
    elif args.history_select == "collaborative":
        make_select = collaborative_selector_factory(cfg)
    splits = build_movielens(source, cfg, make_select)
    _write_splits(Path(args.out), {k: [s.to_record() for s in v] for k, v in splits.items()})
    return 0


def cmd_bookcrossing(args: argparse.Namespace) -> int:
    cfg = BookCrossingConfig(
        seed=args.seed,
        min_ratings=args.min_ratings,
        history_len=args.history_len,
        like_threshold=args.like_threshold,
        explicit_only=args.explicit_only,
    )
    splits, report = build_bookcrossing(args.raw_dir, cfg)
    print(report.summary())
    _write_splits(Path(args.out), {k: [s.to_record() for s in v] for k, v in splits.items()})
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    cfg = ToyConfig(seed=args.seed)
    print("toy: SYNTHETIC data, not a benchmark")
    _write_splits(Path(args.out), {s: toy_records(s, cfg) for s in ("train", "valid", "test")})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="dataset", required=True)

    ml = sub.add_parser("movielens", help="MovieLens-100K, as TALLRec's preprocess_movie.py")
    ml.add_argument("--raw-dir", help="ml-100k folder or ml-100k.zip (default: download)")
    ml.add_argument("--out", required=True, help="folder for train/valid/test.json")
    ml.add_argument("--history-len", type=int, default=10, help="history items per window")
    ml.add_argument("--max-windows", type=int, default=10_000,
                    help="keep the last N windows (0: all)")
    ml.add_argument("--like-threshold", type=int, default=3, help="label = rating > this")
    ml.add_argument("--history-select", choices=HISTORY_SELECT, default="recent",
                    help="recent: the history-len ratings before the target (TALLRec); "
                         "semantic: the history-len of the last --history-pool ratings whose "
                         "title embeddings are most similar to the target's (after ReLLa); "
                         "collaborative: the same with item vectors of the training users' "
                         "ratings (item-based collaborative filtering, no model)")
    ml.add_argument("--history-pool", type=int, default=50,
                    help="semantic/collaborative: candidates, the last N ratings before the "
                         "target")
    ml.add_argument("--embed-base",
                    help="semantic: base model whose mean-pooled hidden states embed titles "
                         "(default: the default base; cached in the tallrec cache)")
    ml.add_argument("--embed-tokenizer", help="semantic: tokenizer overriding the base's")
    ml.set_defaults(func=cmd_movielens)

    bx = sub.add_parser("bookcrossing", help="BookCrossing, as TALLRec's preprocess_book.py")
    bx.add_argument("--raw-dir", required=True,
                    help="folder with BX-Book-Ratings.csv and BX-Books.csv")
    bx.add_argument("--out", required=True, help="folder for train/valid/test.json")
    bx.add_argument("--seed", type=int, default=0, help="user split and sampling seed")
    bx.add_argument("--min-ratings", type=int, default=4, help="keep users with >= N ratings")
    bx.add_argument("--history-len", type=int, default=10, help="history items per user")
    bx.add_argument("--like-threshold", type=int, default=5, help="label = rating > this")
    bx.add_argument("--explicit-only", action="store_true",
                    help="drop implicit (0) ratings (TALLRec keeps them as No.)")
    bx.set_defaults(func=cmd_bookcrossing)

    toy = sub.add_parser("toy", help="the synthetic toy domain (not real data)")
    toy.add_argument("--out", required=True, help="folder for train/valid/test.json")
    toy.add_argument("--seed", type=int, default=0, help="generator seed")
    toy.set_defaults(func=cmd_toy)
    return p


def main(argv: list[str] | None = None, make_semantic=None) -> int:
    """make_semantic: the title-embedding selector factory (engine.embed's), given by
    `python -m engine.prepare`; without it `--history-select semantic` is refused."""
    args = build_parser().parse_args(argv)
    args.make_semantic = make_semantic
    try:
        check_out(Path(args.out))
        return args.func(args)
    except WriteError as e:
        # Every split is written atomically: the one that failed kept its previous contents.
        print(f"error: {e}; files already in {args.out} were kept as they were (each is "
              f"replaced whole or not at all); fix that and run the same command again",
              file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
