"""Accuracy as avg@n and pass@k over n samples per item, and means over a domain.

The paper reports accuracy averaged over sampled runs: avg@n is the mean correctness of all n samples of all
items (the expected accuracy of one sampled run). pass@k is the unbiased estimator of Chen et al. (2021),
1 - C(n-c, k) / C(n, k) per item, averaged over items, for every k <= n.
"""

from __future__ import annotations

from math import comb
from statistics import mean
from typing import Iterable, Sequence


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn from n (``correct`` of them right) is right."""
    if not 0 <= correct <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= correct <= n and 1 <= k <= n, got n={n} correct={correct} k={k}")
    if n - correct < k:
        return 1.0
    return 1.0 - comb(n - correct, k) / comb(n, k)


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def benchmark_metrics(scores: Sequence[Sequence[float]], ks: Iterable[int] | None = None) -> dict[str, float]:
    """Metrics of one benchmark from per-item lists of per-sample scores (1.0 right, 0.0 wrong).

    Every item must have the same number of samples n; a fractional score (partial credit) counts in avg@n
    as it is and as right only when it is 1.0 in pass@k."""
    if not scores:
        raise ValueError("no graded items")
    n = len(scores[0])
    if n == 0 or any(len(s) != n for s in scores):
        raise ValueError("every item needs the same number of samples (n >= 1)")
    metrics: dict[str, float] = {"items": float(len(scores)), "samples": float(n)}
    metrics[f"avg@{n}"] = mean(mean(s) for s in scores)
    for k in sorted(set(ks or default_ks(n))):
        if 1 <= k <= n:
            metrics[f"pass@{k}"] = mean(pass_at_k(n, sum(1 for x in s if x >= 1.0), k) for s in scores)
    return metrics


def domain_means(per_benchmark: dict[str, dict[str, float]], domains: dict[str, str], key: str) -> dict[str, float]:
    """Unweighted mean of ``key`` over the benchmarks of each domain (the paper's "Avg." column)."""
    grouped: dict[str, list[float]] = {}
    for name, metrics in per_benchmark.items():
        if key in metrics:
            grouped.setdefault(domains[name], []).append(metrics[key])
    return {domain: mean(values) for domain, values in grouped.items()}
