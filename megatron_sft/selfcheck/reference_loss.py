"""Independent single-process references: autograd through log_softmax over the full vocabulary."""

from __future__ import annotations

import math

import torch

EPS = 1e-6  # same clamp of 1 - p as the objectives module documents


def reference_value(name: str, arg: float | None, logp: torch.Tensor) -> torch.Tensor:
    p = logp.exp()
    if name == "nll":
        return -logp
    if name == "neg_p":
        return 1 - p
    if name == "family":
        return (1 - p**arg) / arg
    if name == "log1mp":
        return torch.log(torch.clamp(1 - p, min=EPS))
    if name == "dft":
        return -p.detach() * logp
    if name == "focal":
        return -((1 - p) ** arg) * logp
    if name == "mix":
        return (1 - arg) * (-logp) + arg * (1 - p)
    raise KeyError(name)


def reference_selection(kind: str, x: float, p: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if kind == "none":
        return valid
    if kind == "above":
        return valid & (p >= x)
    if kind == "below":
        return valid & (p <= x)
    values = torch.sort(p[valid], descending=(kind == "top")).values
    if values.numel() == 0:
        return valid
    m = min(values.numel(), max(1, math.ceil(x / 100 * values.numel())))
    cutoff = values[m - 1]
    return valid & ((p >= cutoff) if kind == "top" else (p <= cutoff))


def parse_reference(spec: str) -> tuple[str, float | None, str, float]:
    """Readable spec -> (base, arg, selection kind, threshold); written apart from the parser under test."""
    name, _, arg = spec.partition(":")
    for kind in ("above", "below", "top", "bottom"):
        if name.endswith("_" + kind):
            return name[: -len(kind) - 1], None, kind, float(arg)
    if name == "focal":
        return "focal", float(arg or 2), "none", 0.0
    return name, (float(arg) if arg else None), "none", 0.0


def reference_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    spec: str,
    reduction: str = "token_mean",
    denominator: str = "selected",
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad wrt logits, p) for full [s, b, V] logits on one process."""
    x = logits.detach().double().clone().requires_grad_(True)  # float64: the exact answer
    used = x[..., :vocab_size] if vocab_size is not None else x
    logp_all = torch.log_softmax(used, dim=-1)
    logp = logp_all.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    base, arg, kind, thr = parse_reference(spec)
    p = logp.detach().exp()
    selected = reference_selection(kind, thr, p, valid)
    per_token = torch.where(selected, reference_value(base, arg, logp), torch.zeros_like(logp))
    counted = selected if denominator == "selected" else valid
    if reduction == "token_mean":
        loss = per_token.sum() / max(int(counted.sum()), 1)
    else:  # one sequence per column
        total, n_seq = per_token.new_zeros(()), 0
        for col in range(per_token.size(1)):
            n = int(counted[:, col].sum())
            if n:
                total = total + per_token[:, col].sum() / n
                n_seq += 1
        loss = total / max(n_seq, 1)
    loss.backward()
    return loss.detach(), x.grad, p
