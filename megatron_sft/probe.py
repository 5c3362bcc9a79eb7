"""Capability probe: how likely the base model already finds the training targets (the paper's diagnostic).

The base model runs forward only, at any TP/PP, over a random sample of the training rows formatted exactly
as the trainer formats them. Every response token's probability p is collected and summarised: mean p
(the paper's model-capability measure), the histogram of p, the fractions below 0.1 and above 0.9, and the
mean p by position within the response. The mean places the data on the capability continuum:

- model-strong (MS), mean p >= 0.65: prior-leaning objectives (-p, p^alpha with alpha >= 1, thresholds
  that drop low-p tokens) beat NLL; the paper's math setting (mean p ~0.8, up to +16 points);
- model-weak (MW), mean p < 0.25: NLL wins; the paper's figfont puzzles (mean p ~0.01);
- model-intermediate (MI) in between: neither dominates (medical, mean p ~0.5).

The boundaries are ours: midway between the paper's measured settings (0.01, 0.5, 0.8).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_sft.capability import MS_FROM, MW_BELOW, RULES, advise  # noqa: F401  (MS_FROM/MW_BELOW: re-exported)

HISTOGRAM_BINS = 20
POSITION_BINS = 24


@dataclass
class ProbeReport:
    checkpoint: str
    data: list[str]
    rows: int
    tokens: int
    mean_p: float
    median_p: float
    fraction_below_0_1: float
    fraction_above_0_9: float
    histogram_edges: list[float]
    histogram_counts: list[int]
    position_edges: list[int]  # response-token positions [edge_i, edge_i+1)
    position_mean_p: list[Optional[float]]
    position_tokens: list[int]
    sequence_mean_p_quartiles: list[float]
    region: str
    recommended_objective: str
    reasoning: str
    rule: str = "midpoint"  # the capability rule the recommendation follows (capability.RULES)
    other_rules: list[str] = field(default_factory=list)  # what the other rules say, one line each

    def summary(self) -> str:
        return "\n".join([
            f"capability probe of {self.checkpoint} on {self.rows} rows ({self.tokens} response tokens) of "
            f"{', '.join(self.data)}",
            f"  mean p {self.mean_p:.4f} | median p {self.median_p:.4f} | p < 0.1: {self.fraction_below_0_1:.1%} | "
            f"p > 0.9: {self.fraction_above_0_9:.1%}",
            "  per-sequence mean p quartiles: " + " / ".join(f"{q:.3f}" for q in self.sequence_mean_p_quartiles),
            "  mean p by response position: " + ", ".join(
                f"[{a},{b}) {p:.3f}" for a, b, p in zip(self.position_edges, self.position_edges[1:], self.position_mean_p)
                if p is not None)[:400],
            f"  region: {self.region}; recommended objective: {self.recommended_objective}",
            f"  why: {self.reasoning}",
            *(f"  {line}" for line in self.other_rules),
        ])


def recommend(mean_p: float, rule: str = "midpoint") -> tuple[str, str, str]:
    """(region, objective spec, reasoning) for a base model's mean token p under a rule of capability.py."""
    advice = advise(mean_p, rule)
    return advice.label, advice.objective, advice.reasoning


def other_rules(mean_p: float, rule: str) -> list[str]:
    """What each other capability rule says about the same mean p (the paper's rule beside ours)."""
    return [f"{name} rule ({RULES[name].text}): {advise(mean_p, name).label} -> {advise(mean_p, name).objective}"
            for name in RULES if name != rule]


def _positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Index of every response token among the response tokens of its row (0, 1, ...)."""
    return loss_mask.long().cumsum(-1) - 1


def collect_token_p(model, micro_batches: list[dict], vocab_size: int) -> list[torch.Tensor]:
    """Forward only through megatron-core's schedule; on the last pipeline stage, per micro-batch a
    [3, n] tensor of (p, response position, row index) for every response token. Empty elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sft.loss import vocab_parallel_objective_loss
    from megatron_sft.objectives import parse_objective
    from megatron_sft.parallel import current_device
    from megatron_sft.model.attention import attention_inputs

    device = current_device()
    nll = parse_objective("nll")
    collected: list[torch.Tensor] = []
    row_offset = [0]

    def forward_step(data_iterator, chunk):
        batch = {k: v.to(device) for k, v in next(data_iterator).items()}
        rows, first_row = batch["tokens"].shape[0], row_offset[0]
        batch, attention_mask, packed = attention_inputs(batch, False)
        output = chunk(batch["tokens"], batch["position_ids"], attention_mask, packed_seq_params=packed)

        def loss_func(logits: torch.Tensor):
            out = vocab_parallel_objective_loss(logits, batch["labels"], nll, batch["loss_mask"], vocab_size=vocab_size)
            positions = _positions(batch["loss_mask"])
            row_ids = torch.arange(rows, device=device).unsqueeze(1).expand_as(positions) + first_row
            collected.append(torch.stack([out.p[out.valid].double(), positions[out.valid].double(),
                                          row_ids[out.valid].double()]))
            return logits.sum() * 0.0, {}

        row_offset[0] += rows
        return output, loss_func

    rows, length = micro_batches[0]["tokens"].shape
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
                                    num_microbatches=len(micro_batches), seq_length=length, micro_batch_size=rows,
                                    forward_only=True)
    return collected


def summarise(values: torch.Tensor, checkpoint: str, data: list[str], rule: str = "midpoint") -> ProbeReport:
    """The report from a [3, n] tensor of (p, response position, row id) over the whole sample."""
    p, positions, row_ids = values[0], values[1].long(), values[2].long()
    n = p.numel()
    if n == 0:
        raise ValueError("the probe sample has no response tokens; check data.prompt_key / data.response_key")
    edges = torch.linspace(0, 1, HISTOGRAM_BINS + 1, dtype=torch.float64)
    counts = torch.histc(p, bins=HISTOGRAM_BINS, min=0.0, max=1.0)
    top = max(int(torch.quantile(positions.double(), 0.99)) + 1, 1)
    width = max(1, math.ceil(top / POSITION_BINS))
    position_edges = list(range(0, top + width, width))
    position_mean, position_tokens = [], []
    for a, b in zip(position_edges, position_edges[1:]):
        inside = (positions >= a) & (positions < b)
        position_tokens.append(int(inside.sum()))
        position_mean.append(float(p[inside].mean()) if inside.any() else None)
    sequence_means = torch.zeros(int(row_ids.max()) + 1, dtype=torch.float64).index_add_(0, row_ids, p)
    sequence_counts = torch.zeros_like(sequence_means).index_add_(0, row_ids, torch.ones_like(p))
    sequence_means = sequence_means[sequence_counts > 0] / sequence_counts[sequence_counts > 0]
    quartiles = torch.quantile(sequence_means, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    mean_p = float(p.mean())
    region, objective, reasoning = recommend(mean_p, rule)
    return ProbeReport(
        checkpoint=checkpoint, data=data, rows=int(sequence_means.numel()), tokens=n, mean_p=mean_p,
        median_p=float(p.median()), fraction_below_0_1=float((p < 0.1).double().mean()),
        fraction_above_0_9=float((p > 0.9).double().mean()), histogram_edges=[round(e, 4) for e in edges.tolist()],
        histogram_counts=[int(c) for c in counts.tolist()], position_edges=position_edges,
        position_mean_p=position_mean, position_tokens=position_tokens, sequence_mean_p_quartiles=quartiles,
        region=region, recommended_objective=objective, reasoning=reasoning, rule=rule,
        other_rules=other_rules(mean_p, rule),
    )


def plot_report(report: ProbeReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    edges = report.histogram_edges
    total = max(sum(report.histogram_counts), 1)
    left.bar(edges[:-1], [c / total for c in report.histogram_counts], width=edges[1] - edges[0], align="edge",
             edgecolor="white")
    left.axvline(report.mean_p, color="black", linestyle="--", label=f"mean p {report.mean_p:.3f}")
    for x, name in ((MW_BELOW, "MW | MI"), (MS_FROM, "MI | MS")):
        left.axvline(x, color="grey", linewidth=0.8)
        left.text(x, left.get_ylim()[1] * 0.95, name, rotation=90, va="top", ha="right", fontsize=8, color="grey")
    left.set_xlabel("p of the target token (base model)")
    left.set_ylabel("fraction of response tokens")
    left.set_title(f"{report.region}: recommended {report.recommended_objective}")
    left.legend()
    centres = [(a + b) / 2 for a, b in zip(report.position_edges, report.position_edges[1:])]
    points = [(c, v) for c, v in zip(centres, report.position_mean_p) if v is not None]
    right.plot([c for c, _ in points], [v for _, v in points], marker="o")
    right.set_ylim(0, 1)
    right.set_xlabel("position within the response (tokens)")
    right.set_ylabel("mean p")
    right.set_title("mean p by response position")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_probe(cfg, samples: int, micro_batch_size: int, out: Optional[Path], seed: int = 0,
              rule: str = "midpoint") -> ProbeReport:
    """One rank's part of the probe (every rank of the job calls it); rank 0 writes OUT/probe.{json,png}."""
    from megatron.core import parallel_state as ps

    from megatron_sft.data.batches import batch_shape, data_parallel_share, load_rows
    from megatron_sft.library_warnings import quiet_library_warnings
    from megatron_sft.model.checkpoint import load_model, load_tokenizer, pad_token_id
    from megatron_sft.parallel import current_device, init_distributed, init_model_parallel

    quiet_library_warnings()
    rank, _ = init_distributed()
    par = cfg.parallel
    init_model_parallel(par.tensor, par.pipeline, None, seed=cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.checkpoint)
    data_cfg = cfg.data
    data_cfg.packing = False  # one sequence per row: positions and per-sequence means stay per example
    rows = load_rows(cfg.data.train, data_cfg, tokenizer).rows
    chosen = sorted(random.Random(seed).sample(range(len(rows)), min(samples, len(rows))))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    indices, real = data_parallel_share(len(chosen), dp, dp_rank, micro_batch_size)  # the rest fill the last micro-batch
    mine = [rows[chosen[i]] for i in indices]
    first_row = dp_rank * len(indices)
    shape = batch_shape(cfg, micro_batch_size, pad_token_id(tokenizer))
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # as the trainer runs it
    model, args = load_model(cfg.model.checkpoint, params_dtype=dtype)
    model.to(current_device())
    collected = collect_token_p(model, shape.micro_batches(mine), args.vocab_size)
    local = torch.cat(collected, dim=1) if collected else torch.zeros(3, 0, dtype=torch.float64)
    local = local[:, local[2] < real]  # drop the filler rows
    local[2] += first_row
    keep = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    gathered = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(gathered, local.cpu() if keep else None)
    values = torch.cat([g for g in gathered if g is not None], dim=1)
    report = summarise(values, str(cfg.model.checkpoint), list(cfg.data.train), rule)
    if rank == 0 and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        plot_report(report, out / "probe.png")
    return report


def probe_worker(config_dict: dict, samples: int, micro_batch: int, out: str, seed: int, rule: str = "midpoint") -> dict:
    """One rank's probe from a plain config dict (picklable, for spawned local workers)."""
    from megatron_sft.config import config_from_dict

    return asdict(run_probe(config_from_dict(config_dict), samples, micro_batch, Path(out), seed, rule))
