"""The continuum's results: per-seed cells aggregated to a mean and 95% t-interval per task x objective, the
markdown table, the JSON and the plot (the X over alpha for a `family:<alpha>` sweep, bars otherwise).

Kept apart from the runner so the table and plot can be rebuilt (and tested) from a JSON without training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_sft.continuum_stats import Interval, format_interval, mean_interval

INTERVAL_NOTE = "mean ± 95% t-interval over seeds (t_0.975,n-1 · s/√n; n/a: one seed, no interval)"


@dataclass
class ContinuumCell:
    task: str
    objective: str
    base_mean_p: float  # probe on the task's SFT data
    exact_match: float  # held-out, after SFT
    token_accuracy: float
    held_out_mean_p: float
    base_exact_match: float
    base_token_accuracy: float
    steps: int
    last_loss: float
    seed: int = 0


@dataclass
class CellSummary:
    task: str
    objective: str
    n: int
    seeds: list[int]
    exact_match: Interval
    token_accuracy: Interval
    held_out_mean_p: Interval
    base_mean_p: Interval
    base_exact_match: Interval


def summarize(cells: list[ContinuumCell]) -> list[CellSummary]:
    """One summary per task x objective (in run order) over the seeds that have finished."""
    groups: dict[tuple[str, str], list[ContinuumCell]] = {}
    for cell in cells:
        groups.setdefault((cell.task, cell.objective), []).append(cell)
    return [CellSummary(task, objective, len(group), [c.seed for c in group],
                        *(mean_interval([getattr(c, metric) for c in group]) for metric in
                          ("exact_match", "token_accuracy", "held_out_mean_p", "base_mean_p", "base_exact_match")))
            for (task, objective), group in groups.items()]


def family_alpha(objective: str) -> float | None:
    """alpha of a ``family:<alpha>`` spec (the sweep's x axis), None for any other objective."""
    if not objective.startswith("family:"):
        return None
    try:
        return float(objective.split(":", 1)[1])
    except ValueError:
        return None


def continuum_table(cells: list[ContinuumCell]) -> str:
    """Markdown: a row per task, a column per objective, each cell "EM / token accuracy" as mean ± interval; the
    best mean EM (then token accuracy) per task in bold; a cell with fewer seeds than its row says so."""
    summaries = summarize(cells)
    objectives = list(dict.fromkeys(s.objective for s in summaries))
    tasks = list(dict.fromkeys(s.task for s in summaries))
    lines = [f"| task ({INTERVAL_NOTE}) | seeds | base mean p | base EM | "
             + " | ".join(f"{o}: EM / token acc" for o in objectives) + " |",
             "|---|---|---|---|" + "---|" * len(objectives)]
    for task in tasks:
        row = {s.objective: s for s in summaries if s.task == task}
        first, n = next(iter(row.values())), max(s.n for s in row.values())
        best = max(row, key=lambda o: (row[o].exact_match.mean, row[o].token_accuracy.mean))
        lines.append(f"| {task} | {n} | {format_interval(first.base_mean_p, percent=False)} | "
                     f"{format_interval(first.base_exact_match)} | " + " | ".join(
                         "not run yet" if o not in row else _table_cell(row[o], o == best, n) for o in objectives) + " |")
    return "\n".join(lines)


def _table_cell(summary: CellSummary, best: bool, row_n: int) -> str:
    text = f"{format_interval(summary.exact_match)} / {format_interval(summary.token_accuracy)}"
    text = f"**{text}**" if best else text
    return text if summary.n == row_n else f"{text} (n={summary.n})"


def results_json(cells: list[ContinuumCell], settings: dict[str, Any]) -> str:
    """Settings, the per-seed cells and their summaries: enough to rebuild the table and the plot."""
    return json.dumps({"settings": settings, "interval": INTERVAL_NOTE, "cells": [asdict(c) for c in cells],
                       "summary": [asdict(s) for s in summarize(cells)]}, indent=2) + "\n"


def write_results(out: Path, cells: list[ContinuumCell], settings: dict[str, Any] | None = None) -> str:
    """OUT/continuum.json and OUT/continuum.md from the cells so far, atomically (an interrupted run keeps the
    table of the runs that finished, and a reader never sees half a file); returns the table."""
    table = continuum_table(cells)
    for name, text in (("continuum.json", results_json(cells, settings or {})), ("continuum.md", table + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    return table


def load_cells(path: Path) -> list[ContinuumCell]:
    """The per-seed cells of a continuum.json (the current layout or the older bare list)."""
    data = json.loads(Path(path).read_text())
    return [ContinuumCell(**c) for c in (data["cells"] if isinstance(data, dict) else data)]


def plot_continuum(cells: list[ContinuumCell], path: Path) -> None:
    """The X plot when at least two ``family:<alpha>`` objectives ran, otherwise bars per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarize(cells)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    sweep = len({family_alpha(s.objective) for s in summaries} - {None}) >= 2
    for ax, metric, label in ((axes[0], "exact_match", "held-out exact match"),
                              (axes[1], "token_accuracy", "held-out token accuracy")):
        (_plot_alpha_sweep if sweep else _plot_bars)(ax, summaries, metric)
        ax.set_ylabel(label)
    n = max(s.n for s in summaries)
    axes[0].legend(fontsize=8)
    fig.suptitle("Capability continuum in miniature: held-out accuracy after SFT"
                 + (" vs alpha of f_alpha = (1 - p^alpha)/alpha" if sweep else ", by objective")
                 + f"\n{n} seed{'s' if n > 1 else ''}; " + ("shaded / bars: 95% t-interval" if n > 1 else "one seed: no interval"),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_alpha_sweep(ax: Any, summaries: list[CellSummary], metric: str) -> None:
    """One line per task over log alpha with its interval shaded; NLL (alpha -> 0) as a point with error bar
    left of the smallest alpha plus a dashed horizontal reference; -p (alpha = 1) marked by a vertical line."""
    alphas = sorted({a for s in summaries if (a := family_alpha(s.objective)) is not None})
    nll_x = alphas[0] / 4
    for i, task in enumerate(dict.fromkeys(s.task for s in summaries)):
        color = f"C{i}"
        points = sorted((family_alpha(s.objective), getattr(s, metric)) for s in summaries
                        if s.task == task and family_alpha(s.objective) is not None)
        xs, ivs = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, [iv.mean for iv in ivs], "o-", color=color, label=task)
        ax.fill_between(xs, [iv.low for iv in ivs], [iv.high for iv in ivs], color=color, alpha=0.2, linewidth=0)
        nll = next((getattr(s, metric) for s in summaries if s.task == task and s.objective == "nll"), None)
        if nll is not None:
            ax.errorbar([nll_x], [nll.mean], yerr=[[nll.mean - nll.low], [nll.high - nll.mean]], fmt="s",
                        color=color, capsize=4, markersize=7, label=f"NLL (alpha -> 0), {task.split()[0]}")
            ax.axhline(nll.mean, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
    if 1.0 in alphas:
        ax.axvline(1.0, color="gray", linestyle=":", linewidth=1)
        ax.annotate("-p (alpha = 1)", (1.0, 0.02), xycoords=("data", "axes fraction"), ha="left", va="bottom",
                    fontsize=8, color="gray", xytext=(3, 0), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xticks([nll_x] + alphas)
    ax.set_xticklabels(["NLL"] + [f"{a:g}" for a in alphas])
    ax.minorticks_off()
    ax.set_xlabel("alpha (log scale; NLL is the alpha -> 0 limit)")
    ax.set_ylim(0, 1)


def _plot_bars(ax: Any, summaries: list[CellSummary], metric: str) -> None:
    """Grouped bars per task, one per objective, with the interval as an error bar where there is one."""
    objectives = list(dict.fromkeys(s.objective for s in summaries))
    tasks = list(dict.fromkeys(s.task for s in summaries))
    width = 0.8 / len(objectives)
    for i, objective in enumerate(objectives):
        ivs = [next((getattr(s, metric) for s in summaries if s.task == t and s.objective == objective), None)
               for t in tasks]
        xs = [x + i * width for x, iv in zip(range(len(tasks)), ivs) if iv is not None]
        ivs = [iv for iv in ivs if iv is not None]
        ax.bar(xs, [iv.mean for iv in ivs], width, label=objective,
               yerr=[[iv.mean - iv.low for iv in ivs], [iv.high - iv.mean for iv in ivs]], capsize=3)
    ax.set_xticks([x + width * (len(objectives) - 1) / 2 for x in range(len(tasks))])
    base_p = {s.task: s.base_mean_p.mean for s in summaries}
    ax.set_xticklabels([f"{t}\nbase mean p {base_p[t]:.2f}" for t in tasks], fontsize=8)
    ax.set_ylim(0, 1)
