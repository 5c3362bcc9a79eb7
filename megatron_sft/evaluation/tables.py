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
    check_judges(runs)
    for domain in domains:
        names = [b.name for b in BENCHMARKS.values() if b.domain == domain and b.name in present]
        out += [("bench", n, BENCHMARKS[n].title) for n in names]
        if len(names) > 1:
            out.append(("domain", domain, f"{domain} Avg."))
    return out


def judged_by(runs: list[dict]) -> dict[str, dict[tuple, list[str]]]:
    """Judged benchmark (alpacaeval) -> (judge, verdict mode, prompt, reference) -> the runs judged that way."""
    out: dict[str, dict[tuple, list[str]]] = {}
    for index, run in enumerate(runs):
        for name, metrics in run["benchmarks"].items():
            if "judge" in metrics:
                key = (metrics["judge"], metrics.get("judge_verdict"), metrics.get("judge_template"),
                       metrics.get("baseline"))
                out.setdefault(name, {}).setdefault(key, []).append(str(run.get("label") or f"run {index + 1}"))
    return out


def check_judges(runs: list[dict]) -> None:
    """Win rates from different judges are different measurements: refused side by side, naming the judges."""
    for name, judges in judged_by(runs).items():
        if len(judges) > 1:
            listing = "; ".join(f"{', '.join(labels)}: {judge} ({verdict}) against {baseline}"
                                for (judge, verdict, _, baseline), labels in judges.items())
            raise ValueError(f"{name} was judged by different judges or against different references ({listing}); "
                             "their win rates are not comparable: judge every run alike (eval --regrade)")


def judge_notes(runs: list[dict]) -> str:
    """A line under the table per judged benchmark: who judged, against which reference."""
    lines = []
    for name, judges in judged_by(runs).items():
        judge, verdict, _, baseline = next(iter(judges))
        lines.append(f"{name}: AlpacaEval 2 against {baseline}, judged by {judge} ({verdict}); accuracy = the "
                     "length-controlled win rate, --metric win_rate = the raw one")
    return "".join(f"\n{line}\n" for line in lines)


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
    return "\n".join(lines) + "\n" + judge_notes(runs)


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


def default_label(model: str | Path) -> str:
    """A run's row name when --label is not given: the run directory for an export (RUN_DIR/hf, every export's
    name, so rows would all read "hf"), else the model directory's name."""
    path = Path(model).resolve()
    return path.parent.name if path.name == "hf" and path.parent.name else path.name


def row_labels(runs: list[dict], paths: list[str]) -> list[str]:
    """Default row names for compare: each run's label (re-derived for results whose label was the old
    default, an export's "hf"); names that repeat get their eval directory's name added."""
    labels = []
    for run, path in zip(runs, paths):
        given = (run.get("config") or {}).get("label")
        labels.append(given or (default_label(run["model"]) if run.get("model") else run.get("label") or Path(path).name))
    repeated = {label for label in labels if labels.count(label) > 1}
    folders = [Path(path).resolve().parent if Path(path).suffix == ".json" else Path(path).resolve() for path in paths]
    return [f"{label} ({folder.name})" if label in repeated else label for label, folder in zip(labels, folders)]
