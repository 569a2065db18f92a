"""Tables and plots from the cached results: mean ± std over seeds.

summary.md  Table 2's layout (rows: methods, baselines first; columns: in-domain test AUC at
            each K for movie then book), the cross-domain table (Fig. 5's numbers) and every
            cell with its seed count
fig4_shots.png          AUC vs K (log2 axis) per variant and ID baseline, one panel per test
                        domain (Fig. 4)
fig5_cross_domain.png   grouped bars: train domain per K, one panel per test domain (Fig. 5)

std is the sample standard deviation over seeds (ddof=1), empty for a single seed. Results
on the synthetic toy domain say so in every title and heading.

Baseline rows (GRU4Rec, Caser, SASRec, ...) come from <out>/baselines/*.json and any file
given: baselines.run_baseline_grid's result dicts (a list, or under "results" as the
baselines CLI writes them), or plain {"method", "domain", "shots", "seed", "auc"} rows. The
no-training "share of liked history items" rule comes with them (`like_rate_test_auc`).

Runs on movie with retrieved histories are methods of their own ("<variant>|sem" by title
embedding, "<variant>|cf" by other users' ratings), and a table gives their paired difference
to recent histories: the same seed draws the same K windows in every build, so retrieved -
recent per seed isolates the history choice.

Every file is written whole or not at all (temporary file, then rename): a grid stopped at
any moment leaves the previous summary in place, never a half-written one.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from engine.experiments.grid import RETRIEVAL_TAGS
from fileio import atomic_write, make_dir

LABELS = {"zero-shot": "Zero-shot (base)", "it": "IT only (Alpaca-LoRA)", "rt": "RT only",
          "it+rt": "TALLRec (IT+RT)", "zero-shot|sem": "Zero-shot, semantic history",
          "rt|sem": "RT, semantic history (ReLLa)", "it+rt|sem": "IT+RT, semantic history (ReLLa)",
          "zero-shot|cf": "Zero-shot, collaborative history",
          "rt|cf": "RT, collaborative history", "it+rt|cf": "IT+RT, collaborative history"}
LIKE_RATE = "share of liked history items (no training)"
# one value per test domain, no K
FIXED = ("zero-shot", "it", "zero-shot|sem", "zero-shot|cf", LIKE_RATE)

DOMAIN_ORDER = ("movie", "book", "both", "toy")
SYNTHETIC_NOTE = "SYNTHETIC toy data - not a real benchmark"


def method_of(meta: dict) -> str:
    """A run's table row: its variant, tagged with its history retrieval if any."""
    history = meta.get("history")
    return meta["variant"] + (f"|{RETRIEVAL_TAGS[history]}" if history else "")


def collect(out: Path, baseline_files=()) -> tuple[list[dict], dict]:
    """-> (one row per finished evaluation or baseline result, {run folder name: status})."""
    rows, status = [], {}
    for path in sorted((out / "runs").glob("*/result.json")):
        r = json.loads(path.read_text())
        status[path.parent.name] = r["status"]
        if r["status"] != "ok" or r["kind"] != "eval" or r.get("auc") is None:
            continue
        m = r["meta"]
        rows.append({"method": method_of(m), "train_domain": m.get("train_domain"),
                     "eval_domain": m["eval_domain"], "shots": m.get("shots"),
                     "seed": m.get("seed"), "auc": r["auc"],
                     "synthetic": bool(r.get("synthetic_data"))})
    for path in [*sorted((out / "baselines").glob("*.json")), *map(Path, baseline_files)]:
        rows += baseline_rows(json.loads(path.read_text()))
    return rows, status


def baseline_rows(obj) -> list[dict]:
    """baselines.run_baseline_grid's results (one dict per model, domain and K with per-seed
    test AUCs), as a list or under "results", or plain {method, domain, shots, seed, auc}."""
    items = obj["results"] if isinstance(obj, dict) else obj
    rows, like_rate = [], {}
    for b in items:
        if b.get("like_rate_test_auc") is not None:  # the same rule on the same test set
            like_rate[b["domain"]] = b["like_rate_test_auc"]
        per_seed = b.get("per_seed") or [{"seed": b.get("seed"), "test_auc": b["auc"]}]
        for s in per_seed:
            rows.append({"method": b.get("model") or b["method"], "train_domain": b["domain"],
                         "eval_domain": b["domain"], "shots": b["shots"], "seed": s["seed"],
                         "auc": s["test_auc"], "synthetic": b["domain"] == "toy",
                         "baseline": True})
    for d, a in like_rate.items():
        rows.append({"method": LIKE_RATE, "train_domain": None, "eval_domain": d,
                     "shots": None, "seed": None, "auc": a, "synthetic": d == "toy",
                     "baseline": True})
    return rows


def aggregate(rows: list[dict]) -> dict:
    """(method, train domain, eval domain, shots) -> {mean, std, n} over seeds."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["method"], r["train_domain"], r["eval_domain"], r["shots"]].append(r["auc"])
    return {k: {"mean": float(np.mean(v)), "n": len(v),
                "std": float(np.std(v, ddof=1)) if len(v) > 1 else None}
            for k, v in groups.items()}


def cell(agg: dict, key) -> str:
    g = agg.get(key)
    if g is None:
        return "—"
    return f"{g['mean']:.4f}" + (f" ± {g['std']:.4f}" if g["std"] is not None else "") \
        + f" (n={g['n']})"


def planned_cells(runs) -> dict:
    """(method, train domain, eval domain, K) -> seeds planned, from a grid's eval runs."""
    cells = defaultdict(set)
    for r in runs:
        if r.kind == "eval":
            m = r.meta
            cells[method_of(m), m.get("train_domain"), m["eval_domain"], m.get("shots")].add(
                m.get("seed"))
    return {k: len(v) for k, v in cells.items()}


def retrieval_table(rows: list[dict], tag: str) -> str:
    """Retrieved (methods tagged `|tag`) minus recent histories on the movie test, paired by
    seed (same K rows)."""
    auc = {(r["method"], r["shots"], r["seed"]): r["auc"] for r in rows
           if r["eval_domain"] == "movie" and r["train_domain"] in (None, "movie")}
    cols = [None] + sorted({k for (m, k, _) in auc if m.endswith(f"|{tag}") and k is not None})
    lines = ["| variant | " + " | ".join("no training" if k is None else f"{k}-shot"
                                        for k in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for m in ("zero-shot", "rt", "it+rt"):
        cells = []
        for k in cols:
            d = [a - auc[m, k, s] for (mm, kk, s), a in auc.items()
                 if mm == f"{m}|{tag}" and kk == k and (m, k, s) in auc]
            std = f" ± {np.std(d, ddof=1):.4f}" if len(d) > 1 else ""
            cells.append(f"{np.mean(d):+.4f}{std} (n={len(d)})" if d else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(method: str, domain: str, shots) -> tuple:
    # zero-shot, IT and the like-rate rule do not depend on K (nor on a training domain)
    if method in FIXED:
        return (method, None, domain, None)
    return (method, domain, domain, shots)


def _ordered(values) -> list:
    return sorted(values, key=lambda d: (DOMAIN_ORDER.index(d) if d in DOMAIN_ORDER else 9, d))


def baseline_methods(rows: list[dict]) -> list[str]:
    """The baseline rows' methods, by name, the like-rate rule last."""
    return sorted({r["method"] for r in rows if r.get("baseline")},
                  key=lambda m: (m == LIKE_RATE, m))


def table2(rows: list[dict], agg: dict) -> str:
    """Methods x (in-domain test domain, K): TALLRec's Table 2."""
    domains = _ordered({r["eval_domain"] for r in rows})
    shots = sorted({r["shots"] for r in rows if r["shots"] is not None})
    baselines = baseline_methods(rows)
    methods = baselines + [m for m in LABELS if any(r["method"] == m for r in rows)]
    cols = [(d, k) for d in domains for k in shots] or [(d, None) for d in domains]
    head = "| method | " + " | ".join(f"{_dname(d, rows)} {k}-shot" if k else _dname(d, rows)
                                      for d, k in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for m in methods:
        lines.append(f"| {LABELS.get(m, m)} | "
                     + " | ".join(cell(agg, _key(m, d, k)) for d, k in cols) + " |")
    return "\n".join(lines)


def cross_table(rows: list[dict], agg: dict) -> str:
    """Rec-tuned variants: (variant, train domain) x (test domain, K): Fig. 5's numbers."""
    tuned = [r for r in rows if r["method"] in ("rt", "it+rt")]
    evals = _ordered({r["eval_domain"] for r in tuned})
    shots = sorted({r["shots"] for r in tuned})
    cols = [(d, k) for d in evals for k in shots]
    lines = ["| variant | trained on | " + " | ".join(f"{_dname(d, rows)} test {k}-shot"
                                                     for d, k in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for m in ("rt", "it+rt"):
        for t in _ordered({r["train_domain"] for r in tuned if r["method"] == m}):
            lines.append(f"| {LABELS[m]} | {t} | "
                         + " | ".join(cell(agg, (m, t, d, k)) for d, k in cols) + " |")
    return "\n".join(lines)


def _dname(domain: str, rows) -> str:
    return f"{domain} (SYNTHETIC)" if domain == "toy" else domain


def write_summary(out: Path | str, planned: int | list | None = None, title: str = "",
                  baseline_files=()) -> Path:
    """`planned`: the grid's runs (the status then counts table cells too) or their number."""
    out = Path(out)
    rows, status = collect(out, baseline_files)
    agg = aggregate(rows)
    synthetic = any(r["synthetic"] for r in rows)
    n_seeds = max((g["n"] for g in agg.values()), default=0)
    n_planned = len(planned) if isinstance(planned, list) else planned
    outside = []  # finished runs of other commands sharing the folder: not this plan's progress
    if isinstance(planned, list):
        names = {r.name for r in planned}
        outside = [n for n, s in status.items() if s == "ok" and n not in names]
        status = {n: s for n, s in status.items() if n in names}
    counts = Counter(status.values())
    done = counts["ok"]
    state = (f"{done} of {n_planned} runs finished" if n_planned else f"{done} runs finished") \
        + (f", {counts['failed']} failed" if counts["failed"] else "") \
        + (f" (and {len(outside)} finished outside this plan)" if outside else "")
    if isinstance(planned, list):
        cells = planned_cells(planned)
        full = sum(agg.get(k, {}).get("n", 0) >= n for k, n in cells.items())
        some = sum(0 < agg.get(k, {}).get("n", 0) < n for k, n in cells.items())
        state = (f"{full} of {len(cells)} planned cells done (all their seeds), {some} "
                 f"partly; " + state)
    partial = n_planned is not None and done < n_planned
    title = title or out.name
    md = [f"# {title}: TALLRec grid results", ""]
    if synthetic:
        md += [f"**{SYNTHETIC_NOTE}.** These numbers test the pipeline only.", ""]
    md += [f"Status: {'PARTIAL - ' if partial else ''}{state}. Test AUC, mean ± sample std "
           f"(ddof=1) over seeds, n = seeds in the cell (up to {n_seeds}; no ± with one); "
           f"— = not run (yet).", "", "## Table 2 layout: in-domain test AUC", "",
           table2(rows, agg), ""]
    if any(r["method"] in ("rt", "it+rt") for r in rows):
        md += ["## Cross-domain (Fig. 5): rec-tuned on one domain, tested on each", "",
               cross_table(rows, agg), ""]
    for history, tag in RETRIEVAL_TAGS.items():
        if any(r["method"].endswith(f"|{tag}") for r in rows):
            md += [f"## {history.capitalize()} (retrieved) minus recent histories, movie "
                   f"test, paired by seed", "", retrieval_table(rows, tag), ""]
    md += ["## All cells", "", "| method | trained on | tested on | K | AUC | seeds |",
           "|---|---|---|---|---|---|"]
    for k in sorted(agg, key=lambda k: (*(str(x) for x in k[:3]), k[3] or 0)):  # K as a number
        md.append(f"| {LABELS.get(k[0], k[0])} | {k[1] or '-'} | {_dname(k[2], rows)} | "
                  f"{k[3] or '-'} | {cell(agg, k)} | {agg[k]['n']} |")
    if rows:
        plot_shots(rows, agg, out / "fig4_shots.png", synthetic, title)
        plot_cross(rows, agg, out / "fig5_cross_domain.png", synthetic, title)
        md += [x for f, what in (("fig4_shots.png", "Fig. 4"), ("fig5_cross_domain.png", "Fig. 5"))
               if (out / f).is_file() for x in ("", f"![{what} layout]({f})")]
    path = out / "summary.md"
    make_dir(path.parent)
    atomic_write(path, "\n".join(md) + "\n")
    return path


# -- plots --------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Path, synthetic: bool, what: str, grid: str):
    # the grid's title names settings given over its preset (e.g. the loss on the answer only)
    title = what + (f"\n{grid}" if grid else "") + (f"\n{SYNTHETIC_NOTE}" if synthetic else "")
    fig.suptitle(title, color="red" if synthetic else "black")
    fig.tight_layout()
    make_dir(path.parent)
    # the temporary name hides the suffix from matplotlib: say the format
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix[1:]))


def shot_series(rows, agg, domain: str) -> list[tuple[str, bool, list]]:
    """What Fig. 4's panel for `domain` draws: (method, is_baseline, points), points [(K, agg
    cell)] or [(None, cell)] for a method without K (a horizontal line). Our variants first,
    then the ID baselines and the like-rate rule, as in TALLRec's figure."""
    shots = sorted({r["shots"] for r in rows if r["shots"] is not None})
    baselines = baseline_methods(rows)
    series = []
    for m in [*LABELS, *baselines]:
        if m in FIXED:
            pts = [(None, agg[_key(m, domain, None)])] if _key(m, domain, None) in agg else []
        else:
            pts = [(k, agg[_key(m, domain, k)]) for k in shots if _key(m, domain, k) in agg]
        if pts:
            series.append((m, m in baselines, pts))
    return series


def _color(method: str, baselines: list[str]) -> str:
    """One colour per method in every panel: ours C0-C6, ID baselines C7-C9 (by their place in
    `baselines`, the like-rate rule last), the rule black."""
    if method == LIKE_RATE:
        return "black"
    if method in LABELS:
        return f"C{list(LABELS).index(method)}"
    return f"C{7 + baselines.index(method) % 3}"


def plot_shots(rows, agg, path: Path, synthetic: bool, grid: str = ""):
    plt = _pyplot()
    # panels for test domains with in-domain results (zero-shot and IT count: not trained)
    domains = _ordered({r["eval_domain"] for r in rows if not r.get("baseline")
                        and r["train_domain"] in (None, r["eval_domain"])})
    shots = sorted({r["shots"] for r in rows if r["shots"] is not None})
    if not domains:
        return
    baselines = baseline_methods(rows)
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 5.5), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=True):
        for m, baseline, pts in shot_series(rows, agg, d):
            label = LABELS.get(m, m)
            style = dict(color=_color(m, baselines), alpha=0.6 if baseline else 1.0,
                         lw=1.0 if baseline else 1.8)
            if pts[0][0] is None:
                ax.axhline(pts[0][1]["mean"], ls=":" if baseline else "--", label=label, **style)
                continue
            ax.errorbar([k for k, _ in pts], [g["mean"] for _, g in pts],
                        yerr=[g["std"] or 0.0 for _, g in pts], capsize=3, label=label,
                        marker="s" if baseline else "o", ls="--" if baseline else "-", **style)
        if shots:
            ax.set_xscale("log", base=2)
            ax.set_xticks(shots, [str(k) for k in shots])
        ax.set_xlabel("training samples K (log scale)")
        ax.set_ylabel("test AUC")
        ax.set_title(f"trained and tested on {_dname(d, rows)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    _finish(fig, path, synthetic, "AUC vs number of training samples (TALLRec Fig. 4 layout)",
            grid)
    plt.close(fig)


def plot_cross(rows, agg, path: Path, synthetic: bool, grid: str = ""):
    plt = _pyplot()
    tuned = [r for r in rows if r["method"] in ("rt", "it+rt")]
    if not tuned:
        return
    variant = "it+rt" if any(r["method"] == "it+rt" for r in tuned) else "rt"
    evals = _ordered({r["eval_domain"] for r in tuned})
    trains = _ordered({r["train_domain"] for r in tuned})
    shots = sorted({r["shots"] for r in tuned})
    width = 0.8 / len(trains)
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 4), squeeze=False)
    for ax, d in zip(axes[0], evals, strict=True):
        x = np.arange(len(shots))
        for j, t in enumerate(trains):
            gs = [agg.get((variant, t, d, k)) for k in shots]
            ax.bar(x + (j - (len(trains) - 1) / 2) * width,
                   [g["mean"] if g else math.nan for g in gs], width,
                   yerr=[(g["std"] or 0.0) if g else 0.0 for g in gs], capsize=3,
                   label=f"trained on {t}")
        ax.set_xticks(x, [f"{k}-shot" for k in shots])
        ax.axhline(0.5, color="grey", lw=0.8)  # chance
        ax.set_ylabel("test AUC")
        ax.set_title(f"tested on {_dname(d, rows)}")
        ax.legend(fontsize=8)
    _finish(fig, path, synthetic, f"Cross-domain: {LABELS[variant]} (TALLRec Fig. 5 layout)",
            grid)
    plt.close(fig)
