"""The plan's time estimate: tokens each run processes, divided by a throughput.

Tokens per row come from the base's own tokenizer on a sample of each pool. A training run
processes min(epochs * n, max_steps * step size) samples forward and backward, plus a forward
pass over the validation rows at each validation; an eval run one forward pass over its test
rows. Throughputs are measured from the runs already finished in this out folder, else taken
from the grid config (preset values measured on the machine the preset was sized for).
Early stopping can only make runs shorter: the estimate is an upper bound for the steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from data.collate import TokenizeConfig, encode_all
from data.fewshot import k_shot, load_alpaca, load_domain
from engine.experiments.grid import GridConfig, Run

SAMPLE_ROWS = 64  # rows tokenized per pool for the mean length


def fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def plan_tokenizer(grid: GridConfig):
    """The base's tokenizer without loading its weights (None: estimate from characters)."""
    from model.checkpoint import base_tokenizer
    from model.tokenizer import load_tokenizer

    if grid.tokenizer:
        return load_tokenizer(grid.tokenizer)
    return base_tokenizer(grid.base, grid.data_root)


def planned_steps(n: int, batch_size: int, epochs: int, max_steps: int) -> tuple[int, int]:
    """-> (optimizer steps a run of n rows plans, steps per epoch)."""
    per_epoch = math.ceil(n / min(batch_size, n))
    steps = per_epoch * epochs
    return (min(steps, max_steps) if max_steps > 0 else steps), per_epoch


class Estimator:
    def __init__(self, grid: GridConfig):
        self.grid = grid
        self.tok = plan_tokenizer(grid)
        self.train_rate, self.eval_rate = grid.train_tokens_per_s, grid.eval_tokens_per_s
        self.stage_rates: dict[str, float] = {}  # stage -> median of its finished runs
        self.source = "configured"
        self.rt_share: list[float] = []  # finished rec-tuning runs: steps run / steps planned
        self._len: dict = {}
        self._pools: dict = {}

    def pool(self, domain: str, split: str) -> list[dict]:
        if (domain, split) not in self._pools:
            self._pools[domain, split] = load_domain(domain, split, self.grid.data_root).records
        return self._pools[domain, split]

    def alpaca(self) -> list[dict]:
        if "alpaca" not in self._pools:
            name = self.grid.it.get("data") or "alpaca_small"
            self._pools["alpaca"] = load_alpaca(name, self.grid.data_root).records
        return self._pools["alpaca"]

    def check_pools(self):
        for d in self.grid.train_domains:
            for part in (["movie", "book"] if d == "both" else [d]):
                n = len(self.pool(part, "train"))
                too_big = [k for k in self.grid.shots if k > n]
                if too_big:
                    raise ValueError(f"--shots {too_big[0]} is larger than the {part} training "
                                     f"pool ({n} rows); the largest K for --train-domains {d} "
                                     f"is {n}")

    def row_tokens(self, key: str, cutoff: int) -> float:
        """Mean tokens per training row of a domain (or 'alpaca') at this cutoff."""
        if (key, cutoff) not in self._len:
            rows = self.alpaca() if key == "alpaca" else self.pool(key, "train")
            rows = k_shot(rows, min(SAMPLE_ROWS, len(rows)), 0)
            if self.tok is None:  # ~4 characters per token for English BPE
                n = [min(cutoff, sum(len(r[k]) for k in ("instruction", "input", "output")) / 4)
                     for r in rows]
            else:
                n = [len(e.input_ids) for e in
                     encode_all(rows, self.tok, TokenizeConfig(cutoff_len=cutoff))[0]]
            self._len[key, cutoff] = float(np.mean(n))
        return self._len[key, cutoff]

    def measure_from_cache(self, folders: list[Path]):
        """Rates from the finished runs: one per training stage (IT, at its own cutoff and with
        no prefix shared between rows, trains fewer tokens/s than RT), the median of all for a
        stage with none finished yet."""
        train, evals, by_stage = [], [], {}
        for f in folders:
            path = f / "result.json"
            if not path.is_file():
                continue
            r = json.loads(path.read_text())
            spec = (json.loads((f / "spec.json").read_text()).get("spec", {})
                    if (f / "spec.json").is_file() else {})
            cfg = spec.get("config", {})
            if r.get("status") == "ok" and r.get("train_tokens_per_s"):
                train.append(r["train_tokens_per_s"])
                by_stage.setdefault(cfg.get("stage"), []).append(r["train_tokens_per_s"])
            if r.get("status") == "ok" and r.get("steps") and cfg.get("stage") == "rt":
                n = cfg["shots"] * (2 if cfg["domain"] == "both" else 1)
                planned, _ = planned_steps(n, cfg["batch_size"], cfg["epochs"],
                                           cfg.get("max_steps", -1))
                self.rt_share.append(min(1.0, r["steps"] / planned))
            if r.get("status") == "ok" and r.get("kind") == "eval" and r.get("tokens_per_s"):
                evals.append(r["tokens_per_s"])
        if train:
            self.train_rate = float(np.median(train))
            self.stage_rates = {k: float(np.median(v)) for k, v in by_stage.items() if k}
        if evals:
            self.eval_rate = float(np.median(evals))
        if train or evals:
            self.source = f"measured on {len(train)} train / {len(evals)} eval finished runs"

    def tokens(self, run: Run) -> tuple[float, float]:
        """-> (tokens trained on, tokens only scored) for one run."""
        if run.kind == "eval":
            d = run.spec["domain"]
            n = len(self.pool(d, "test"))
            rows = n if run.spec["limit"] < 1 else min(n, run.spec["limit"])
            return 0.0, rows * self.row_tokens(d, run.spec["cutoff_len"])
        cfg = run.cfg
        if cfg.stage == "it":
            per_row = self.row_tokens("alpaca", cfg.cutoff_len)
            total = len(self.alpaca())
            n_val = min(max(cfg.val_size, 0), total // 5)
            n = total - n_val
        else:
            parts = ["movie", "book"] if cfg.domain == "both" else [cfg.domain]
            per_row = float(np.mean([self.row_tokens(p, cfg.cutoff_len) for p in parts]))
            n = cfg.shots * len(parts)
            valid = sum(len(self.pool(p, "valid")) for p in parts)
            n_val = min(cfg.val_size, valid) if cfg.val_size > 0 else valid
        per_step = min(cfg.batch_size, n)
        steps, per_epoch = planned_steps(n, cfg.batch_size, cfg.epochs, cfg.max_steps)
        samples = min(steps * per_step, n * cfg.epochs)
        validations = math.ceil(steps / cfg.resolved_eval_every(per_epoch)) if n_val else 0
        return samples * per_row, validations * n_val * per_row

    def seconds(self, run: Run, share: float = 1.0) -> float:
        """Upper bound (every planned step); `share` scales a rec-tuning run's steps and
        validations, as early stopping does."""
        trained, scored = self.tokens(run)
        if run.kind != "train" or run.cfg.stage != "rt":
            share = 1.0
        rate = self.stage_rates.get(run.cfg.stage, self.train_rate) if run.kind == "train" \
            else self.train_rate
        return (trained / rate + scored / self.eval_rate) * share + self.grid.load_seconds

    def plan_table(self, runs: list[Run], status: dict, seconds: dict) -> str:
        # cum.: time until this run is done, counting the runs still to run before it (the
        # grid runs in this order, so a partial grid's results can be read off this column)
        lines = [f"{'run':40} {'status':7} {'train tok':>10} {'scored tok':>10} {'est.':>8} "
                 f"{'cum.':>8}"]
        cum = 0.0
        for r in runs:
            t, s = self.tokens(r)
            cum += seconds[r.name] if status[r.name] != "done" else 0.0
            lines.append(f"{r.name:40} {status[r.name]:7} {t:10.0f} {s:10.0f} "
                         f"{fmt_s(seconds[r.name]):>8} {fmt_s(cum):>8}")
        todo = [r for r in runs if status[r.name] != "done"]
        eta = sum(seconds[r.name] for r in todo)
        train = " / ".join(f"{v:.0f} {k}" for k, v in sorted(self.stage_rates.items())) \
            if self.stage_rates else f"{self.train_rate:.0f}"
        lines.append(f"{len(runs)} runs, {len(runs) - len(todo)} cached, {len(todo)} to run; "
                     f"ETA {fmt_s(eta)} at {train} train / {self.eval_rate:.0f} "
                     f"scoring tokens/s ({self.source}); early stopping can only shorten it")
        if self.rt_share:
            share = float(np.median(self.rt_share))
            expected = sum(self.seconds(r, share) for r in todo)
            lines.append(f"expected ETA {fmt_s(expected)} if rec-tuning runs stop early as the "
                         f"{len(self.rt_share)} finished ones did (median "
                         f"{100 * share:.0f}% of their planned steps)")
        if self.tok is None:
            lines.append("(token counts estimated from characters: no tokenizer for this base)")
        return "\n".join(lines)
