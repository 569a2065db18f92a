#!/usr/bin/env python
"""Score a rec test set with a trained adapter (or the base model zero-shot) and report AUC.

P(Yes) comes from one forward pass: softmax over the "Yes"/"No" logits at the answer
position. `python evaluate.py --help` lists every flag.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from model.config import DEFAULT_BASE
from paths import DATA_ROOT_HELP


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", required=True,
                   help="run folder from train.py (uses its best adapter), an adapter folder "
                        "(adapter_config.json), or 'none' for the base model zero-shot")
    p.add_argument("--base", help="base model (default: the one named in the adapter, "
                                  f"else {DEFAULT_BASE})")
    p.add_argument("--tokenizer", help="tokenizer overriding the one found with the base")
    p.add_argument("--domain", choices=["movie", "book", "toy"],
                   help="test domain (default: the run's training domain, else movie); "
                        "cross-domain: train on movie, --domain book")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"])
    p.add_argument("--data", help="TALLRec-format JSON to score instead of --domain/--split")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.add_argument("--limit", type=int, default=-1,
                   help="score only the first N rows (-1 = all)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass")
    p.add_argument("--cutoff-len", type=int, default=512,
                   help="max prompt tokens; the oldest history items are dropped to fit")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--out", help="result JSON (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args) -> int:
    from data.fewshot import load_domain
    from data.records import load_records
    from engine.evaluation import resolve_checkpoint
    from engine.precision import resolve_precision
    from engine.scoring import metrics, score, summary_line
    from model import load_base
    from model.adapter import load_adapter

    adapter_dir, run_cfg, lora_cfg, adapter_base = resolve_checkpoint(args.ckpt)
    base = args.base or adapter_base or DEFAULT_BASE
    if args.data:
        records, source, synthetic = load_records(args.data, rec=True), args.data, False
        name = Path(args.data).stem
    else:
        domain = args.domain or (run_cfg or {}).get("domain") or "movie"
        if domain == "both":
            domain = "movie"
        split = load_domain(domain, args.split, args.data_root)
        records, source, synthetic = split.records, split.describe(), split.synthetic
        name = f"{domain}_{args.split}"
    if args.limit > 0:
        records = records[:args.limit]
    device, policy = resolve_precision(args.device, args.precision)
    model, tok = load_base(base, dtype=policy.weight_dtype, device=device, lora=lora_cfg,
                           tokenizer=args.tokenizer, data_root=args.data_root)
    if tok is None:
        raise ValueError(f"base {base!r} has no tokenizer; pass --tokenizer")
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    print(f"scoring {source} with {'base ' + str(base) if adapter_dir is None else adapter_dir}")
    t0 = time.time()
    probs, labels, cut, n_tokens = score(model, tok, records, args.batch_size, args.cutoff_len,
                                         policy.compute_dtype, progress=not args.no_progress)
    seconds = time.time() - t0
    m = metrics(probs, labels)
    result = {**m, "ckpt": str(adapter_dir) if adapter_dir else "none", "base": str(base),
              "data": source, "synthetic_data": synthetic, "seconds": round(seconds, 2),
              "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
              "history_dropped_rows": cut.history_dropped,
              "probs": [round(float(p), 6) for p in probs], "labels": labels.tolist()}
    if args.out:
        out = Path(args.out)
    elif adapter_dir is not None:
        out = adapter_dir.parent / f"eval_{name}.json" if adapter_dir.name in ("best", "last") \
            else adapter_dir / f"eval_{name}.json"
    else:
        out = Path("runs") / "zero_shot" / f"{Path(str(base)).stem}_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    tag = " [SYNTHETIC toy data]" if synthetic else ""
    print(summary_line(name, m) + tag + f"  ({seconds:.0f}s) -> {out}")
    if m["auc"] is None:
        print(f"note: {m['auc_undefined']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
