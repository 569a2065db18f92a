#!/usr/bin/env python
"""Score a rec test set with a trained adapter (or the base model zero-shot) and report AUC.

P(Yes) comes from one forward pass: softmax over the "Yes"/"No" logits at the answer
position. Every flag is a field of engine.evaluation.EvalConfig; `--help` lists them.
"""

import os
import sys

from engine.evaluation import config_from_args
from fileio import describe


def main(argv=None) -> int:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks and writes
        sys.stdout = open(os.devnull, "w")
    dist = None
    try:
        cfg = config_from_args(argv)
        from engine.distributed import from_env  # heavy imports after the flags
        from engine.evaluation import evaluate, write_result
        from engine.scoring import summary_line

        dist = from_env(cfg.device)  # a single process unless torchrun started several
        result = evaluate(cfg, dist)
        if not dist.is_main:
            return 0
        out = write_result(cfg, result)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1
    finally:
        if dist is not None:
            dist.close()
    tag = " [SYNTHETIC toy data]" if result["synthetic_data"] else ""
    print(summary_line(result["name"], result) + tag + f"  ({result['seconds']:.0f}s) -> {out}")
    if result["auc"] is None:
        print(f"note: {result['auc_undefined']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
