"""Domain splits, K-shot sampling and multi-domain mixing, as TALLRec's finetune_rec.py does.

TALLRec samples K shots with HF datasets: `train.shuffle(seed=seed).select(range(K))`.
`Dataset.shuffle(seed)` draws `np.random.default_rng(seed).permutation(len(ds))`; we use
the same generator call, so the same K rows come out without depending on `datasets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.records import load_records
from data.toy import ToyConfig, toy_records
from paths import data_root as resolve_data_root

REAL_DOMAINS = ("movie", "book")
SPLITS = ("train", "valid", "test")


@dataclass
class Split:
    domain: str
    split: str
    records: list[dict]
    source: str  # file path, or a description for generated data
    synthetic: bool = False  # True for the toy domain; downstream output should say so

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return self.records[i]

    def describe(self) -> str:
        tag = " [SYNTHETIC toy data, not a real benchmark]" if self.synthetic else ""
        return f"{self.domain}/{self.split}: {len(self)} rows from {self.source}{tag}"


def load_domain(
    name: str,
    split: str,
    data_root: Path | str | None = None,
    toy: ToyConfig | None = None,
) -> Split:
    """movie/book from <data_root>/tallrec/<name>/<split>.json; toy is generated."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    if name == "toy":
        cfg = toy or ToyConfig()
        return Split("toy", split, toy_records(split, cfg), f"data.toy (seed {cfg.seed})", True)
    if name not in REAL_DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {REAL_DOMAINS + ('toy',)}")
    path = resolve_data_root(data_root) / "tallrec" / name / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; point --data-root (or $TALLREC_DATA) at the shared data, "
            f"or build it with `python -m data.prepare`"
        )
    return Split(name, split, load_records(path, rec=True), str(path))


def load_alpaca(name: str = "alpaca_small", data_root: Path | str | None = None) -> Split:
    """Stage-1 instruction data: <data_root>/alpaca/<name>.json, or a path to a JSON file."""
    path = Path(name)
    if path.suffix != ".json":
        path = resolve_data_root(data_root) / "alpaca" / f"{name}.json"
    return Split("alpaca", "train", load_records(path, rec=False), str(path))


def shuffled(records: list, seed: int) -> list:
    """HF datasets' `shuffle(seed=seed)` order."""
    order = np.random.default_rng(seed).permutation(len(records))
    return [records[i] for i in order]


def k_shot(records: list, k: int, seed: int) -> list:
    """TALLRec's `shuffle(seed).select(range(k))`; k=-1 means the whole pool, shuffled."""
    if k == -1:
        return shuffled(records, seed)
    if k < 1:
        raise ValueError(f"k must be >= 1 (or -1 for all), got {k}")
    if k > len(records):
        raise ValueError(f"asked for {k} shots but the pool has only {len(records)} rows")
    return shuffled(records, seed)[:k]


def k_shot_split(split: Split, k: int, seed: int) -> Split:
    label = f"{split.source} ({k}-shot, seed {seed})"
    return Split(split.domain, split.split, k_shot(split.records, k, seed), label, split.synthetic)


def mix_domains(splits: list[Split], k: int, seed: int) -> Split:
    """Multi-domain training (finetune_multi_rec.py): K shots from each domain with the same
    seed, concatenated in the given order; the training sampler shuffles afterwards."""
    if not splits:
        raise ValueError("mix_domains needs at least one split")
    records: list[dict] = []
    for s in splits:
        records += k_shot(s.records, k, seed)
    name = "+".join(s.domain for s in splits)
    source = ", ".join(f"{s.domain}:{s.source}" for s in splits)
    return Split(name, splits[0].split, records, source, any(s.synthetic for s in splits))
