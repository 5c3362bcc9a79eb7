"""Training curves from ``OUTPUT/metrics.jsonl`` as one PNG, several runs overlaid (no TensorBoard needed).

The trainer writes one JSON object per step (``train/logger.py``): ``step``, ``loss``, ``mean_p``, ``lr``,
``grad_norm`` and, on evaluation steps, ``eval/loss`` and ``eval/mean_p``. A skipped (non-finite) step logs
NaN or null, which is left out of the plot rather than failing it; a file that is missing, empty or not
JSON lines is refused in one line naming the file (and the line), since a plot of the wrong file misleads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# (panel title, train key, eval key or None, log-scale y)
PANELS = (
    ("loss", "loss", "eval/loss", False),
    ("mean token p", "mean_p", "eval/mean_p", False),
    ("learning rate", "lr", None, False),
    ("grad norm", "grad_norm", None, True),
)


class CurvesError(ValueError):
    """metrics.jsonl that cannot be plotted; the message names the file."""


@dataclass
class RunCurves:
    label: str
    path: Path  # the metrics.jsonl read
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # key -> (steps, values)

    @property
    def steps(self) -> int:
        return max((s[-1] for s, _ in self.series.values() if s), default=0)

    def last(self, key: str) -> Optional[float]:
        steps_values = self.series.get(key)
        return steps_values[1][-1] if steps_values and steps_values[1] else None


def metrics_path(run: str | Path) -> Path:
    """A run's metrics.jsonl: ``run`` is the run's output_dir or the file itself."""
    path = Path(run)
    return path if path.suffix == ".jsonl" or path.is_file() else path / "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The step records of one metrics.jsonl; refuses a missing/empty file and malformed lines by FILE:LINE."""
    if not path.is_file():
        hint = " (is it a training run's output_dir?)" if path.name == "metrics.jsonl" else ""
        raise CurvesError(f"{path}: no such file{hint}")
    records = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CurvesError(f"{path}:{number}: not a JSON line ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise CurvesError(f"{path}:{number}: not a step record (a JSON object with an integer \"step\")")
            records.append(record)
    if not records:
        raise CurvesError(f"{path}: no steps logged yet")
    return records


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_run(run: str | Path, label: Optional[str] = None) -> RunCurves:
    """Every plotted series of one run (the last record wins when a step appears twice)."""
    path = metrics_path(run)
    by_step = {r["step"]: r for r in read_metrics(path)}
    curves = RunCurves(label or (path.parent.name if path.name == "metrics.jsonl" else path.stem), path)
    keys = [key for _, train_key, eval_key, _ in PANELS for key in (train_key, eval_key) if key]
    for key in keys:
        points = [(step, float(r[key])) for step, r in sorted(by_step.items()) if _finite(r.get(key))]
        if points:
            curves.series[key] = ([s for s, _ in points], [v for _, v in points])
    if "loss" not in curves.series:
        raise CurvesError(f"{path}: no finite loss in any step record")
    return curves


def default_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's directory name, or the paths as given where two names collide (runs/a/run, runs/b/run)."""
    paths = [metrics_path(r) for r in runs]
    names = [p.parent.name if p.name == "metrics.jsonl" else p.stem for p in paths]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


def plot_curves(runs: Sequence[RunCurves], out: Path, title: str = "") -> Path:
    """A 2 x 2 PNG (loss, mean p, lr, grad norm against step); eval points dashed in the run's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, train_key, eval_key, log_y) in zip(axes.flat, PANELS):
        for i, run in enumerate(runs):
            colour = colours[i % len(colours)]
            if train_key in run.series:
                ax.plot(*run.series[train_key], color=colour, linewidth=1.2, label=run.label)
            if eval_key and eval_key in run.series:
                ax.plot(*run.series[eval_key], color=colour, linestyle="--", marker="o", markersize=3,
                        label=f"{run.label} (eval)")
        if log_y and any(v > 0 for run in runs for v in run.series.get(train_key, ([], []))[1]):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(title or "training curves (metrics.jsonl)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summary_line(run: RunCurves) -> str:
    """One console line per run: steps, first and last loss, last mean p and eval loss."""
    loss = run.series["loss"][1]
    parts = [f"{run.label}: {run.steps} steps", f"loss {loss[0]:.4f} -> {loss[-1]:.4f}"]
    for key, name in (("mean_p", "mean p"), ("eval/loss", "eval loss"), ("eval/mean_p", "eval mean p")):
        value = run.last(key)
        if value is not None:
            parts.append(f"last {name} {value:.4f}")
    return " | ".join(parts)
