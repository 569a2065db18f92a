#!/usr/bin/env python
"""LoRA-tune a LLaMA model: `--stage it` (Alpaca instruction tuning) or `--stage rt`
(TALLRec few-shot rec-tuning). `python train.py --help` lists every flag."""

import json
import os
import sys

from engine.config import config_from_args
from fileio import describe


def main(argv=None) -> int:
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for the run
        sys.stdout = open(os.devnull, "w")
    try:
        cfg = config_from_args(argv)
    except (ValueError, OSError) as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    print(cfg.header())
    from engine.train import Stopped, train  # heavy imports once the arguments are fine

    try:
        result = train(cfg)
    except Stopped as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except (ValueError, OSError, RuntimeError) as e:
        # User and OS errors are one line; a bug (any other exception) keeps its traceback.
        print(f"error: {describe(e)}", file=sys.stderr)
        return 1
    print("result: " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
