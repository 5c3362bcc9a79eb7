"""Side-by-side tables of evaluation results in the paper's main-table layout, as markdown, CSV and a plot.

Rows are runs (model / objective), columns the benchmarks grouped by domain, each domain followed by its
unweighted mean ("Avg."), values in percent.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from megatron_sft.evaluation.benchmarks import BENCHMARKS


def load_results(path: str | Path) -> dict:
    """results.json of an eval output directory (or the file itself)."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (run megatron-sft eval --out DIR first)")
    return json.loads(path.read_text())


def columns(runs: list[dict]) -> list[tuple[str, str, str]]:
    """(kind, key, header) per column: benchmarks in registry order within each domain, then the domain mean."""
    present = {name for run in runs for name in run["benchmarks"]}
    out: list[tuple[str, str, str]] = []
    domains: list[str] = []
    for bench in BENCHMARKS.values():
        if bench.name in present and bench.domain not in domains:
            domains.append(bench.domain)
    unknown = sorted(present - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"results name unknown benchmarks {unknown}")
    for domain in domains:
        names = [b.name for b in BENCHMARKS.values() if b.domain == domain and b.name in present]
        out += [("bench", n, BENCHMARKS[n].title) for n in names]
        if len(names) > 1:
            out.append(("domain", domain, f"{domain} Avg."))
    return out


def cell(run: dict, kind: str, key: str, metric: str) -> Optional[float]:
    if kind == "bench":
        metrics = run["benchmarks"].get(key)
        return None if metrics is None else metrics.get(metric)
    return run.get("domains", {}).get(key, {}).get(metric)


def markdown_table(runs: list[dict], labels: list[str], metric: str = "accuracy") -> str:
    cols = columns(runs)
    head = "| run | " + " | ".join(h for _, _, h in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    lines = [head, rule]
    for label, run in zip(labels, runs):
        values = [cell(run, kind, key, metric) for kind, key, _ in cols]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def csv_table(runs: list[dict], labels: list[str], metric: str = "accuracy") -> str:
    cols = columns(runs)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run"] + [key if kind == "bench" else f"{key}_avg" for kind, key, _ in cols])
    for label, run in zip(labels, runs):
        values = [cell(run, kind, key, metric) for kind, key, _ in cols]
        writer.writerow([label] + ["" if v is None else f"{100 * v:.2f}" for v in values])
    return buffer.getvalue()


def plot_runs(runs: list[dict], labels: list[str], path: Path, metric: str = "accuracy") -> None:
    """Grouped bars: one group per column of the table, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = columns(runs)
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cols) + 2), 4.2))
    for r, (label, run) in enumerate(zip(labels, runs)):
        values = [cell(run, kind, key, metric) for kind, key, _ in cols]
        xs = [c + (r - (len(runs) - 1) / 2) * width for c in range(len(cols))]
        ax.bar(xs, [0.0 if v is None else 100 * v for v in values], width, label=label)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([h for _, _, h in cols], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (%)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
