"""TALLRec's experiment grid (Table 2, Fig. 4, Fig. 5) for any base: `python -m
engine.experiments --help`. grid.py expands the config into runs, runner.py runs them with a
hash-checked cache, eta.py estimates the time, summary.py writes the tables and plots."""

from engine.experiments.grid import PRESETS, VARIANTS, GridConfig, Run, grid_from_preset, plan_runs
from engine.experiments.runner import CacheConflict, run_grid
from engine.experiments.summary import aggregate, collect, write_summary

__all__ = ["PRESETS", "VARIANTS", "CacheConflict", "GridConfig", "Run", "aggregate", "collect",
           "grid_from_preset", "plan_runs", "run_grid", "write_summary"]
