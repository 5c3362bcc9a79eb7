"""The paper's sweeps as lists of (model, objective) runs, one Slurm array task each.

- ``alpha``: f_alpha(p) = (1 - p^alpha) / alpha for alpha in 0.1 .. 1 and 2 .. 10 (convexity ablation,
  on math with Qwen2.5-Math-1.5B and on figfont with Qwen2.5-7B);
- ``threshold``: (1-p) and -log p, kept only where p >= q or p <= q, q in 0.1 .. 0.9;
- ``percentile``: -p, -log p and log(1-p) on the top / bottom k% of a batch's tokens by p, k in 10 .. 90;
- ``scale``: Qwen2.5 3B / 7B / 14B x {NLL, -p} (instruction tuning in the paper);
- ``headline``: the paper's headline pair, NLL vs -p on one model (math: Qwen2.5-Math-1.5B), to reproduce
  one row of its main table (with ``sbatch sweep --as-reference``: the reference trainer's normalization).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from megatron_sft.objectives import canonical_spec
from megatron_sft.recipes.models import get_model


class SweepError(ValueError):
    """An unknown sweep or values it cannot use."""


@dataclass(frozen=True)
class SweepRun:
    model_key: str
    objective: str


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    default_dataset: str
    default_models: dict[str, str]  # dataset -> the model the paper swept it with
    default_values: tuple[float, ...]
    runs: Callable[[str, Sequence[float]], list[SweepRun]]  # (model key, values) -> runs


def _number(value: float) -> str:
    return f"{value:g}"


ALPHAS = tuple(round(0.1 * i, 1) for i in range(1, 10)) + tuple(float(a) for a in range(1, 11))
QUANTILES = tuple(round(0.1 * i, 1) for i in range(1, 10))
PERCENTILES = tuple(float(k) for k in range(10, 100, 10))
SCALE_MODELS = ("qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b")

SWEEPS: dict[str, Sweep] = {sweep.name: sweep for sweep in (
    Sweep("alpha", "f_alpha(p) = (1 - p^alpha)/alpha over alpha", "math",
          {"math": "qwen2.5-math-1.5b", "figfont": "qwen2.5-7b"}, ALPHAS,
          lambda model, values: [SweepRun(model, f"family:{_number(a)}") for a in values]),
    Sweep("threshold", "(1-p) and -log p kept where p >= q or p <= q", "math",
          {"math": "qwen2.5-math-1.5b", "figfont": "qwen2.5-7b"}, QUANTILES,
          lambda model, values: [SweepRun(model, f"{base}_{side}:{_number(q)}")
                                 for base in ("neg_p", "nll") for side in ("above", "below") for q in values]),
    Sweep("percentile", "-p, -log p, log(1-p) on the top / bottom k% of tokens by p", "math",
          {"math": "qwen2.5-math-1.5b", "figfont": "qwen2.5-7b"}, PERCENTILES,
          lambda model, values: [SweepRun(model, f"{base}_{side}:{_number(k)}")
                                 for base in ("neg_p", "nll", "log1mp") for side in ("top", "bottom") for k in values]),
    Sweep("headline", "NLL vs -p on one model: the paper's headline comparison", "math",
          {"math": "qwen2.5-math-1.5b", "medical": "qwen2.5-1.5b", "figfont": "qwen2.5-7b"}, (),
          lambda model, values: [SweepRun(model, objective) for objective in ("nll", "neg_p")]),
    Sweep("scale", "Qwen2.5 3B / 7B / 14B x {NLL, -p}", "instruction_tuning",
          {"instruction_tuning": SCALE_MODELS[0]}, (),
          lambda model, values: [SweepRun(m, objective) for m in SCALE_MODELS for objective in ("nll", "neg_p")]),
)}


def sweep_runs(name: str, dataset: str, model_key: Optional[str] = None,
               values: Optional[Sequence[float]] = None) -> list[SweepRun]:
    """The runs of sweep ``name`` on ``dataset``; every objective is checked against the registry."""
    if name not in SWEEPS:
        raise SweepError(f"unknown sweep {name!r}; known sweeps: {', '.join(SWEEPS)}")
    sweep = SWEEPS[name]
    if name == "headline" and values:
        raise SweepError("the headline sweep is NLL vs -p; it takes no --values")
    if name == "scale" and (model_key or values):
        raise SweepError("the scale sweep fixes its models (Qwen2.5 3B/7B/14B) and objectives; drop --model/--values")
    if model_key is None:
        model_key = sweep.default_models.get(dataset)
        if model_key is None:
            raise SweepError(f"the {name} sweep has no default model for dataset {dataset!r}; pass --model")
    runs = sweep.runs(get_model(model_key).key, tuple(values) if values else sweep.default_values)
    for run in runs:
        canonical_spec(run.objective)  # an out-of-range value fails here, naming the spec
    return runs
