"""One evaluation path: `evaluate(EvalConfig) -> result`, used by evaluate.py and by the
experiment grid. It finds what `--ckpt` points at (a run folder, an adapter folder, or none),
loads the test rows and the base (+ adapter), reads P(Yes) in one forward pass per prompt and
returns the result JSON (metrics, per-row probabilities and labels, where they came from)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from engine.config import DEVICE_AUTO_HELP, DEVICES, PRECISION_AUTO_HELP, PRECISIONS, HelpFormatter
from fileio import atomic_write_text, find_dir, make_dir
from model.adapter import read_adapter_config
from model.config import DEFAULT_BASE
from model.quant import QUANT_MODES
from paths import DATA_ROOT_HELP

DOMAINS = ("movie", "book", "toy")
SPLITS = ("train", "valid", "test")


@dataclass
class EvalConfig:
    ckpt: str = "none"  # a train.py run folder, an adapter folder, or "none" (zero-shot)
    base: str | None = None  # default: the base named in the adapter, else DEFAULT_BASE
    tokenizer: str | None = None  # overrides the tokenizer found with the base
    domain: str | None = None  # default: the run's training domain, else movie
    split: str = "test"
    data: str | None = None  # a TALLRec-format JSON file scored instead of domain/split
    data_root: str | None = None  # default: $TALLREC_DATA, else ../shared/data
    limit: int = -1  # score N rows (-1 = all) ...
    limit_seed: int | None = None  # ... the first N, or a fixed sample drawn with this seed
    batch_size: int = 16
    cutoff_len: int = 512
    device: str = "auto"
    precision: str = "auto"
    quant: str | None = None  # frozen base storage; default: the run's --quant, else none
    out: str | None = None  # result JSON; default: beside the adapter (see `default_out`)
    progress: bool = True
    share_prefix: bool = True  # the prompts' common prefix runs once (engine/scoring.py)

    def __post_init__(self):
        if not self.ckpt:
            raise ValueError("--ckpt is empty: give a run folder, an adapter folder or 'none'")
        for name, value, allowed in (("domain", self.domain, DOMAINS),
                                     ("split", self.split, SPLITS),
                                     ("device", self.device, DEVICES),
                                     ("precision", self.precision, PRECISIONS),
                                     ("quant", self.quant, QUANT_MODES)):
            if value is not None and value not in allowed:
                raise ValueError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
        if self.limit == 0 or self.limit < -1:
            raise ValueError(f"--limit must be a positive row count or -1 (all), "
                             f"got {self.limit}")
        for name in ("batch_size", "cutoff_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, "
                                 f"got {getattr(self, name)}")
        if self.limit_seed is not None and self.limit_seed < 0:
            raise ValueError(f"--limit-seed must be >= 0, got {self.limit_seed}")
        if self.out:  # checked now, not after the scoring
            out = Path(self.out)
            if out.is_dir():
                raise IsADirectoryError(f"--out {out} is a folder; give a file name for the "
                                        f"result JSON")
            above = next((p for p in out.parents if p.exists()), Path("."))
            if not above.is_dir():
                raise NotADirectoryError(f"--out {out}: {above} is a file, not a folder")


HELP = {
    "ckpt": "run folder from train.py (uses its best adapter), an adapter folder "
            "(adapter_config.json), or 'none' for the base model zero-shot",
    "base": f"base model (default: the one named in the adapter, else {DEFAULT_BASE}); any "
            "train.py --base: a preset, random:<preset>, an HF or Meta folder, a .gguf file",
    "tokenizer": "tokenizer file/folder overriding the one found with the base",
    "domain": "test domain (default: the run's training domain, else movie); cross-domain: "
              "train on movie, --domain book; toy is synthetic",
    "split": "which split of --domain to score",
    "data": "TALLRec-format JSON file to score instead of --domain/--split",
    "data_root": DATA_ROOT_HELP,
    "limit": "score only N rows (-1 = all)",
    "limit_seed": "with --limit: a fixed random sample of N rows drawn with this seed "
                  "instead of the first N (the files list users in order)",
    "batch_size": "prompts per forward pass",
    "cutoff_len": "max prompt tokens; the oldest history items are dropped to fit",
    "device": DEVICE_AUTO_HELP,
    "precision": PRECISION_AUTO_HELP,
    "quant": "store the base's decoder Linear weights quantized (model/quant.py); default: "
             "the run's --quant, else none. An adapter trained on a quantized base scores on the "
             "full-precision one with --quant none, and the other way round",
    "out": "result JSON (default: eval_<domain>_<split>.json beside the adapter; zero-shot: "
           "runs/zero_shot/<base>_<domain>_<split>.json)",
    "progress": "show a progress bar",
    "share_prefix": "run the token prefix all prompts share (the instruction) through the "
                    "model once instead of once per prompt: the same probabilities up to "
                    "rounding, fewer tokens through the layers",
}
CHOICES = {"domain": DOMAINS, "split": SPLITS, "device": DEVICES, "precision": PRECISIONS,
           "quant": QUANT_MODES}
TYPES = {"limit": int, "limit_seed": int, "batch_size": int, "cutoff_len": int}


def build_parser() -> argparse.ArgumentParser:
    """One flag per EvalConfig field, with its default and allowed values."""
    p = argparse.ArgumentParser(
        prog="evaluate.py", formatter_class=HelpFormatter,
        description="Score a rec test split with a trained adapter (or the base model "
                    "zero-shot) and report its AUC.\nP(Yes) is read from one forward pass: "
                    "softmax over the Yes/No logits at the answer position.",
        epilog="examples:\n  python evaluate.py --ckpt runs/rt64                 # movie test"
               "\n  python evaluate.py --ckpt runs/rt64 --domain book   # cross-domain"
               "\n  python evaluate.py --ckpt none --domain movie       # base, zero-shot")
    defaults = EvalConfig()
    for f in fields(EvalConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if f.name == "ckpt":
            p.add_argument(flag, required=True, help=HELP[f.name])
        elif isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=HELP[f.name])
        else:
            p.add_argument(flag, type=TYPES.get(f.name, str), default=default,
                           choices=CHOICES.get(f.name), help=HELP[f.name])
    return p


def config_from_args(argv: list[str] | None = None) -> EvalConfig:
    from engine.config import parse_args  # reads `--limit -3` as a value, not a flag

    return EvalConfig(**vars(parse_args(build_parser(), argv)))


def resolve_checkpoint(ckpt: str):
    """-> (adapter folder or None, the run's config dict or None, LoRAConfig or None, base)."""
    if ckpt == "none":
        return None, None, None, None
    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt {path} not found (a run folder from train.py, an "
                                f"adapter folder, or 'none')")
    run_cfg = None
    if (path / "adapter_config.json").is_file():
        adapter = path
        cfg_file = path.parent / "config.json"
    else:
        adapter = find_dir(path / "best") or find_dir(path / "last")
        cfg_file = path / "config.json"
        if adapter is None:
            raise FileNotFoundError(f"--ckpt {path}: no adapter_config.json, and no best/ or "
                                    f"last/ checkpoint inside (did the run save one yet?)")
    if cfg_file.is_file():
        try:
            run_cfg = json.loads(cfg_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_file}: cannot read the run's settings ({e})") from None
        if not isinstance(run_cfg, dict):
            raise ValueError(f"{cfg_file}: not a train.py run configuration")
    lora_cfg, base = read_adapter_config(adapter)
    return adapter, run_cfg, lora_cfg, base


def eval_rows(cfg: EvalConfig, run_cfg: dict | None):
    """-> (records, where they came from, synthetic?, a short name such as movie_test)."""
    from data.fewshot import k_shot, load_domain
    from data.records import load_records

    if cfg.data:
        records, source, synthetic = load_records(cfg.data, rec=True), cfg.data, False
        name = Path(cfg.data).stem
    else:
        domain = cfg.domain or (run_cfg or {}).get("domain") or "movie"
        if domain == "both":
            domain = "movie"
        split = load_domain(domain, cfg.split, cfg.data_root)
        records, source, synthetic = split.records, split.describe(), split.synthetic
        name = f"{domain}_{cfg.split}"
    if 0 < cfg.limit < len(records):
        # a fixed sample (files list users in order, so the first rows are one kind of user)
        records = (records[:cfg.limit] if cfg.limit_seed is None
                   else k_shot(records, cfg.limit, cfg.limit_seed))
    return records, source, synthetic, name


def evaluate(cfg: EvalConfig, dist=None) -> dict:
    """Score the rows `cfg` names; -> the result JSON as a dict (nothing is written). Under
    torchrun (`dist`, engine.distributed.Dist) each rank scores its share of the rows and every
    rank gets them all back in order."""
    from engine.precision import emulated_bf16_warning, resolve_precision
    from engine.scoring import metrics, score_split
    from model import load_base, probe_base

    adapter_dir, run_cfg, lora_cfg, adapter_base = resolve_checkpoint(cfg.ckpt)
    base = cfg.base or adapter_base or DEFAULT_BASE
    records, source, synthetic, name = eval_rows(cfg, run_cfg)
    if not records:
        raise ValueError(f"nothing to score: {source} holds no rows")
    device, policy = resolve_precision(dist.device(cfg.device) if dist else cfg.device,
                                       cfg.precision)
    if warning := emulated_bf16_warning(device, policy):
        print(f"WARNING: --precision {policy.name}: {warning}", file=sys.stderr, flush=True)
    quant = cfg.quant or (run_cfg or {}).get("quant") or "none"
    # Every check that needs no weights comes before the (slow) load: headers, tokenizer.
    _, tok = probe_base(base, cfg.tokenizer, cfg.data_root)
    if tok is None:
        raise ValueError(f"base {base!r} has no tokenizer; pass --tokenizer")
    tok.answer_token_ids()  # scoring reads P(Yes) vs P(No)
    model, tok = load_base(base, dtype=policy.weight_dtype, device=device, lora=lora_cfg,
                           tokenizer=tok, data_root=cfg.data_root, quant=quant)
    if adapter_dir is not None:
        from model.adapter import load_adapter

        load_adapter(model, adapter_dir)
    print(f"scoring {source} with {'base ' + str(base) if adapter_dir is None else adapter_dir}"
          + (f" on a {quant} base" if quant != "none" else ""))
    t0 = time.time()
    probs, labels, cut, n_tokens = score_split(model, tok, records, cfg.batch_size,
                                               cfg.cutoff_len, policy, progress=cfg.progress,
                                               dist=dist, share_prefix=cfg.share_prefix)
    seconds = time.time() - t0
    return {**metrics(probs, labels), "name": name,
            "ckpt": str(adapter_dir) if adapter_dir else "none", "base": str(base), "quant": quant,
            "data": source, "synthetic_data": synthetic, "seconds": round(seconds, 2),
            "tokens": n_tokens, "tokens_per_s": round(n_tokens / max(seconds, 1e-9), 1),
            "history_dropped_rows": cut.history_dropped,
            "probs": [round(float(p), 6) for p in probs], "labels": labels.tolist()}


def write_result(cfg: EvalConfig, result: dict) -> Path:
    """Write the result JSON to `cfg.out`, else beside the adapter; -> its path."""
    out = Path(cfg.out) if cfg.out else default_out(result)
    make_dir(out.parent)
    atomic_write_text(out, json.dumps(result, indent=1))
    return out


def default_out(result: dict) -> Path:
    name = result["name"]
    if result["ckpt"] == "none":
        return Path("runs") / "zero_shot" / f"{Path(result['base']).stem}_{name}.json"
    adapter = Path(result["ckpt"])
    if adapter.name in ("best", "last"):
        return adapter.parent / f"eval_{name}.json"
    return adapter / f"eval_{name}.json"
