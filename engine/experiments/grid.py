"""The experiment grid: a typed config, named presets, and the list of runs it expands to.

Variants (TALLRec Table 2 / Fig. 4):
  zero-shot  the base model scores the test set as it is
  it         stage 1 only: the Alpaca (instruction-tuned) adapter, evaluated directly
  rt         stage 2 only: rec-tuning on K shots, starting from the base
  it+rt      TALLRec: rec-tuning on K shots, starting from the `it` adapter
The `it` run is trained once per seed and shared by `it` and every `it+rt` run of that seed.
Every rec-tuned adapter is scored on every evaluation domain (Fig. 5: train on movie, book or
both, test on each).

Retrieved histories (`semantic_variants`, movie only): the same variants on the movie data
rebuilt with retrieved histories (data/history.py, after ReLLa; `retrieval` says how: by
title embedding, "semantic", or by other users' ratings, "collaborative"): same windows,
targets, labels and K-shot rows, only the 10 history items shown differ; scored on that
build's test.

A run is identified by its readable name (`rt-movie-k16-s0`) and cached under that name with
the hash of its full config: see runner.py.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from engine.config import PRESETS as TRAIN_PRESETS
from engine.config import TrainConfig
from model.config import DEFAULT_BASE
from paths import data_root as resolve_data_root

VARIANTS = ("zero-shot", "it", "rt", "it+rt")
# history retrieval of the semantic variants -> the tag of their run names and table rows
RETRIEVAL_TAGS = {"semantic": "sem", "collaborative": "cf"}
# ETA rates of the `cpu` preset until its own finished runs measure better ones (a new --out):
# what the committed `cpu` runs measured on the 2-core machine (SmolLM2-135M, bf16): the
# median of the IT runs (RT's median is ~545) and the 10th percentile of the movie tests
# (their median is ~2,190; book's ~4,390), so the ETA errs long.
TRAIN_TOK_S_CPU, EVAL_TOK_S_CPU, LOAD_S_CPU = 280.0, 1300.0, 10.0
TRAIN_DOMAINS = ("movie", "book", "both", "toy")
EVAL_DOMAINS = ("movie", "book", "toy")
# Keys of a TrainConfig that name where a run lives or how it logs, not what it computes.
# share_prefix is how a step is computed (the same loss and gradients; with LoRA dropout the
# rows share one mask on the prefix, the same in expectation), so runs made before it existed
# stay valid; each run's config.json says which way it ran.
NOT_HASHED = ("out", "resume", "overwrite", "log_every", "share_prefix")


@dataclass
class GridConfig:
    base: str | None = DEFAULT_BASE
    tokenizer: str | None = None  # default for random: bases: the shared LLaMA tokenizer
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    shots: list[int] = field(default_factory=lambda: [16, 64, 256])
    train_domains: list[str] = field(default_factory=lambda: ["movie"])
    eval_domains: list[str] = field(default_factory=lambda: ["movie", "book"])
    seeds: list[int] = field(default_factory=lambda: [0])
    it: dict = field(default_factory=dict)  # TrainConfig overrides on the it_preset
    rt: dict = field(default_factory=dict)  # TrainConfig overrides on the rt_preset
    it_preset: str = "it"  # engine.config.PRESETS entry stage 1 starts from
    rt_preset: str = "rt"
    # Order K values run in (default: ascending); a partial grid is most useful when the
    # K the paper discusses most comes first.
    shot_order: list[int] = field(default_factory=list)
    # Variants also run on movie with semantic (retrieved) histories; [] = none.
    semantic_variants: list[str] = field(default_factory=list)
    retrieval: str = "semantic"  # how they choose history items: a RETRIEVAL_TAGS key
    semantic_data: str | None = None  # built there on first use; default <out>/data/...
    history_pool: int = 50  # retrieval: candidates, the last N ratings before the target
    baseline_results: list[str] = field(default_factory=list)  # baselines CLI JSON files
    # Each rec-tuning run sees at least this many samples: epochs = ceil(budget / K), capped
    # by the rt epochs (0 = off: the rt epochs as given). Keeps small K from a 1-step run.
    sample_budget: int = 0
    eval_limit: int = -1  # test rows scored per domain, a fixed seed-0 sample (-1 = all)
    eval_batch_size: int = 16
    cutoff_len: int = 512
    device: str = "auto"
    precision: str = "auto"
    data_root: str | None = None
    # ETA: throughput used until finished runs give a measured one
    train_tokens_per_s: float = 40.0
    eval_tokens_per_s: float = 200.0
    load_seconds: float = 10.0  # loading the base once for a run
    out: str = "results/grid"

    def __post_init__(self):
        if not self.base:
            raise ValueError("--base is required for this preset (a LLaMA-7B Hugging Face or "
                             "Meta folder, or any base train.py accepts)")
        for name, allowed in (("variants", VARIANTS), ("train_domains", TRAIN_DOMAINS),
                              ("eval_domains", EVAL_DOMAINS)):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"--{name.replace('_', '-')} needs at least one value")
            bad = [v for v in values if v not in allowed]
            if bad:
                raise ValueError(f"unknown {name.replace('_', ' ')[:-1]} {bad[0]!r}; known: "
                                 f"{', '.join(allowed)}")
        domains = set(self.train_domains) | set(self.eval_domains)
        if "toy" in domains and domains != {"toy"}:
            raise ValueError("the synthetic toy domain cannot be mixed with movie/book: its "
                             "results would sit in the same tables as real data")
        if any(k < 1 for k in self.shots) or not self.shots:
            raise ValueError(f"--shots must be >= 1, got {self.shots}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        bad = [v for v in self.semantic_variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown semantic variant {bad[0]!r}; known: {', '.join(VARIANTS)}")
        if self.retrieval not in RETRIEVAL_TAGS:
            raise ValueError(f"unknown retrieval {self.retrieval!r}; known: "
                             f"{', '.join(RETRIEVAL_TAGS)}")
        if self.semantic_variants and "movie" not in self.eval_domains:
            raise ValueError("semantic histories are built for movie: add movie to "
                             "--eval-domains or drop --semantic-variants")
        for name in ("it_preset", "rt_preset"):
            stage = name[:2]
            if TRAIN_PRESETS.get(getattr(self, name), {}).get("stage") != stage:
                raise ValueError(f"{name} {getattr(self, name)!r} is not a {stage} preset of "
                                 f"engine.config.PRESETS ({', '.join(TRAIN_PRESETS)})")
        known = {f.name for f in fields(TrainConfig)}
        for stage in ("it", "rt"):
            bad = sorted(set(getattr(self, stage)) - known)
            if bad:
                raise ValueError(f"unknown {stage} setting(s) {bad}; known: TrainConfig fields")
        self.shots = sorted(set(self.shots))
        if sorted(set(self.shot_order)) not in ([], self.shots):
            raise ValueError(f"shot_order {self.shot_order} must list the shots {self.shots}")
        self.shot_order = list(dict.fromkeys(self.shot_order)) or list(self.shots)
        self.seeds = sorted(set(self.seeds))
        if self.tokenizer is None and self.base.startswith("random:"):
            llama = resolve_data_root(self.data_root) / "tokenizer" / "llama"
            self.tokenizer = str(llama / "tokenizer.model")

    def synthetic(self) -> bool:
        return "toy" in self.train_domains or "toy" in self.eval_domains

    def semantic_dir(self) -> Path:
        return Path(self.semantic_data or Path(self.out) / "data" / f"movie-{self.retrieval}")

    def semantic_spec(self) -> dict:
        """What determines the retrieved build (hashed into every run that reads it)."""
        spec = {"select": self.retrieval, "history_len": 10, "pool": self.history_pool}
        if self.retrieval == "semantic":  # the titles' embedding model
            spec.update(embed_base=self.base, embed_tokenizer=self.tokenizer)
        return {**spec, "folder": str(self.semantic_dir())}


# A `paper` run needs a GPU and LLaMA-7B weights; `cpu` is TALLRec's grid with a schedule
# that learns on 2 CPU cores (many hours; results/README.md gives the sizing); `cpu-small`
# a 40-minute cut that shows the mechanism, not learning; `tiny` drives the tests.
PRESETS: dict[str, dict] = {
    "paper": dict(base=None, shots=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                  train_domains=["movie", "book", "both"], eval_domains=["movie", "book"],
                  seeds=[0, 1, 2, 3, 4], device="cuda", train_tokens_per_s=3000.0,
                  eval_tokens_per_s=12000.0, load_seconds=60.0, out="results/paper"),
    "cpu": dict(
        base=DEFAULT_BASE, shots=[16, 64, 256], shot_order=[64, 256, 16],
        train_domains=["movie", "book"], eval_domains=["movie", "book"], seeds=[0, 1, 2],
        device="cpu", precision="bf16",
        eval_limit=-1,  # full test sets: movie 1,000 rows, book all 2,427
        it_preset="it-cpu", rt_preset="rt-cpu",  # rt-cpu stops early (patience 3)
        semantic_variants=["zero-shot", "rt", "it+rt"],
        baseline_results=["results/baselines_movie.json", "results/baselines_book.json"],
        # measured here, see results/README.md; finished runs replace them
        train_tokens_per_s=TRAIN_TOK_S_CPU, eval_tokens_per_s=EVAL_TOK_S_CPU,
        load_seconds=LOAD_S_CPU, out="results/cpu"),
    "cpu-small": dict(
        base=DEFAULT_BASE, shots=[16, 64, 256], train_domains=["movie"],
        eval_domains=["movie", "book"], seeds=[0], device="cpu", precision="fp32",
        sample_budget=64, eval_limit=100, out="results/cpu-small",
        # 64 Alpaca samples: the stage-1 mechanism, not a converged instruction tuning
        it=dict(batch_size=16, micro_batch_size=8, max_steps=4, warmup_steps=1, val_size=16,
                eval_every=4),
        # lr 3e-4 (TALLRec: 1e-4 over up to 200 epochs) because a run has 4-16 steps
        rt=dict(batch_size=16, micro_batch_size=8, lr=3e-4, warmup_steps=1, epochs=200,
                val_size=32, eval_every=4, patience=0)),
    "tiny": dict(
        base="random:tiny-32k", shots=[8, 16], train_domains=["toy"], eval_domains=["toy"],
        seeds=[0, 1], device="cpu", precision="fp32", eval_limit=32, cutoff_len=256,
        eval_batch_size=32, train_tokens_per_s=1000.0, eval_tokens_per_s=5000.0,
        load_seconds=0.3, out="results/tiny",
        it=dict(batch_size=8, micro_batch_size=8, max_steps=1, warmup_steps=1, val_size=8,
                eval_every=1, cutoff_len=128, eval_batch_size=32),
        rt=dict(batch_size=8, micro_batch_size=8, lr=3e-3, warmup_steps=1, epochs=1,
                val_size=16, eval_every=100, patience=0, eval_batch_size=32)),
}


def grid_from_preset(name: str, **over) -> GridConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    values = {**PRESETS[name], **{k: v for k, v in over.items() if v is not None}}
    for stage in ("it", "rt"):  # overrides merge into the preset's, not replace them
        values[stage] = {**PRESETS[name].get(stage, {}), **over.get(stage, {})}
    if over.get("shots") and not over.get("shot_order"):  # --shots keeps the preset's order
        order = [k for k in values.get("shot_order", []) if k in over["shots"]]
        values["shot_order"] = order + sorted(set(over["shots"]) - set(order))
    return GridConfig(**values)


# -- runs ---------------------------------------------------------------------------------

@dataclass
class Run:
    name: str  # folder name under <out>/runs/
    kind: str  # train | eval
    spec: dict  # everything that determines the result (hashed)
    meta: dict  # what the summary groups by: variant, train/eval domain, shots, seed
    needs: str | None = None  # the run whose adapter this one starts from / scores
    cfg: TrainConfig | None = None  # train runs; out and init_adapter filled in at run time

    @property
    def hash(self) -> str:
        return spec_hash(self.spec)


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def train_config(grid: GridConfig, stage: str, seed: int, domain: str = "movie",
                 shots: int = 64, semantic: bool = False) -> TrainConfig:
    preset = grid.it_preset if stage == "it" else grid.rt_preset
    values = {**TRAIN_PRESETS[preset], **getattr(grid, stage)}
    values.update(base=grid.base, tokenizer=grid.tokenizer, seed=seed, device=grid.device,
                  precision=grid.precision, data_root=grid.data_root)
    if stage == "rt":
        values.update(domain=domain, shots=shots)
        if grid.sample_budget > 0:
            values["epochs"] = min(values.get("epochs", 200),
                                   max(1, math.ceil(grid.sample_budget / shots)))
        if "cutoff_len" not in grid.rt:  # the prompts scored at test time get the same cutoff
            values["cutoff_len"] = grid.cutoff_len
        if semantic:  # same K-shot rows of the same windows, retrieved histories
            folder = grid.semantic_dir()
            values.update(data=str(folder / "train.json"), val_data=str(folder / "valid.json"))
    return TrainConfig(**values)


# TrainConfig fields added after grids were cached: left out of the hash at their "off"
# value, so those caches stay valid.
HASHED_WHEN_ON = {"warmup_ratio": 0.0, "eval_every_epochs": 0, "quant": "none",
                  "checkpoint_offload": False}


def _hashed(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items()
            if k not in NOT_HASHED and not (k in HASHED_WHEN_ON and v == HASHED_WHEN_ON[k])}


def plan_runs(grid: GridConfig) -> list[Run]:
    """All runs in execution order, every run after the run it needs. Results arrive in an
    order that makes a partial grid useful: zero-shot; then per training domain and K in
    `shot_order` (on movie: recent, then semantic histories, a paired comparison per K),
    every seed's rec-tuning runs, each with its in-domain test (the `it` run of a seed comes
    when first needed); cross-domain tests (Fig. 5) last."""
    runs: list[Run] = []
    by_name: dict[str, Run] = {}
    sem = grid.semantic_spec() if grid.semantic_variants else None
    tag = RETRIEVAL_TAGS[grid.retrieval]  # run names: rt-movie-sem-k64-s0, ...
    deferred: list[tuple] = []  # cross-domain evaluations

    def add(run: Run) -> Run:
        if run.needs is not None:  # a dependency's identity is part of this run's config
            run.spec["needs"] = {"name": run.needs, "hash": by_name[run.needs].hash}
        runs.append(run)
        by_name[run.name] = run
        return run

    def add_eval(source: str | None, meta: dict, d: str, semantic: bool = False):
        spec = {"kind": "eval", "base": grid.base, "tokenizer": grid.tokenizer,
                "domain": d, "split": "test", "limit": grid.eval_limit, "limit_seed": 0,
                "cutoff_len": grid.cutoff_len, "batch_size": grid.eval_batch_size,
                "device": grid.device, "precision": grid.precision,
                "data_root": grid.data_root}
        meta = {**meta, "eval_domain": d}
        if semantic:
            spec["history"], meta["history"] = sem, grid.retrieval
        name = f"eval-{source or 'zero-shot'}-on-{d}" + (f"-{tag}" if semantic else "")
        add(Run(name, "eval", spec, meta, needs=source))

    def ensure_it(seed: int) -> str:
        name = f"it-s{seed}"
        if name not in by_name:
            cfg = train_config(grid, "it", seed)
            add(Run(name, "train", {"kind": "train", "config": _hashed(cfg)},
                    {"variant": "it", "seed": seed}, cfg=cfg))
            meta = {"variant": "it", "seed": seed}
            for d in grid.eval_domains if "it" in grid.variants else []:
                add_eval(name, meta, d)
            if "it" in grid.semantic_variants:
                add_eval(name, meta, "movie", semantic=True)
        return name

    if "zero-shot" in grid.variants:
        for d in grid.eval_domains:
            add_eval(None, {"variant": "zero-shot"}, d)
    if "zero-shot" in grid.semantic_variants:
        add_eval(None, {"variant": "zero-shot"}, "movie", semantic=True)
    with_semantic = bool({"rt", "it+rt"} & set(grid.semantic_variants))
    for domain in grid.train_domains:
        for shots in grid.shot_order:
            for semantic in (False, True) if domain == "movie" and with_semantic else (False,):
                for seed in grid.seeds:
                    for variant in [v for v in ("rt", "it+rt")
                                    if v in (grid.semantic_variants if semantic
                                             else grid.variants)]:
                        needs = ensure_it(seed) if variant == "it+rt" else None
                        cfg = train_config(grid, "rt", seed, domain, shots, semantic)
                        data = domain + (f"-{tag}" if semantic else "")
                        name = f"{variant.replace('+', '')}-{data}-k{shots}-s{seed}"
                        meta = {"variant": variant, "train_domain": domain, "shots": shots,
                                "seed": seed, **({"history": grid.retrieval} if semantic else {})}
                        spec = {"kind": "train", "config": _hashed(cfg),
                                **({"history": sem} if semantic else {})}
                        add(Run(name, "train", spec, meta, needs=needs, cfg=cfg))
                        if semantic:  # its test is movie's semantic build only
                            add_eval(name, meta, "movie", semantic=True)
                            continue
                        for d in grid.eval_domains:
                            if d == domain or domain == "both":
                                add_eval(name, meta, d)
                            else:
                                deferred.append((name, meta, d))
    if "it" in grid.variants:  # an IT-only grid: no rec-tuning run pulled them in
        for seed in grid.seeds:
            ensure_it(seed)
    for name, meta, d in deferred:
        add_eval(name, meta, d)
    return runs
