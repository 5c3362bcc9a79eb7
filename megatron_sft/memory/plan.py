"""Choose TP, PP, recompute and micro-batch together from the per-GPU memory model.

Order of preference (first that fits wins): no recomputation, then selective, then full (recomputation costs
~1/3 more compute for full); within one recompute mode the least model parallelism (TP inside a node first,
it needs NVLink, then pipeline stages); for a mixture of experts, at each TP x PP the least expert parallelism
(EP dividing the experts and the DP ranks: it shards the experts, not the tokens); within one layout the largest
micro-batch up to the requested one that splits the global batch over the DP ranks. A layout fits when its peak (memory.model.estimate) is
within the GPU's memory less ``HEADROOM`` (CUDA context, NCCL buffers, allocator fragmentation).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from megatron_sft.memory.model import GIB, Estimate, Layout, MemoryModelError, ModelShape, estimate, format_estimate

HEADROOM = 0.10
RECOMPUTE_ORDER = ("none", "selective", "full")


class MemoryPlanError(ValueError):
    """No layout fits (the message says what was closest and what to change)."""


@dataclass
class MemoryPlan:
    chosen: Estimate
    budget_bytes: float
    rejected: list[tuple[Estimate, str]] = field(default_factory=list)  # (estimate, why not chosen)

    @property
    def layout(self) -> Layout:
        return self.chosen.layout


def _micro_batches(global_batch: int, dp: int, requested: int) -> list[int]:
    """Micro-batches <= ``requested`` that divide the per-rank batch, largest first."""
    per_rank = global_batch // dp
    return [m for m in range(min(requested, per_rank), 0, -1) if per_rank % m == 0]


def candidate_layouts(m: ModelShape, nodes: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """(TP, PP) pairs in order of preference: TP 1, 2, 4, 8 inside a node dividing the heads and KV heads, then
    pipeline stages (dividing the layers) at each TP."""
    world = nodes * gpus_per_node
    tps = [tp for tp in (1, 2, 4, 8) if tp <= gpus_per_node and m.heads % tp == 0 and m.kv_heads % tp == 0]
    pairs = [(tp, pp) for pp in (1, 2, 4, 8, 16) for tp in tps if m.layers % pp == 0 and world % (tp * pp) == 0]
    return sorted(pairs, key=lambda p: (p[0] * p[1], p[1]))


def expert_parallel_sizes(m: ModelShape, dp: int) -> list[int]:
    """EP sizes to try, smallest first: 1 for a dense model, else the powers of two dividing the experts and DP."""
    if not m.is_moe:
        return [1]
    return [ep for ep in (1, 2, 4, 8, 16, 32, 64, 128) if m.num_experts % ep == 0 and dp % ep == 0]


def plan_memory(m: ModelShape, nodes: int, gpus_per_node: int, gpu_memory_gib: float, seq: int, global_batch: int,
                micro_batch: int = 1, base: Optional[Layout] = None) -> MemoryPlan:
    """The preferred layout that fits (module doc); every other evaluated layout comes back as rejected."""
    if nodes < 1 or gpus_per_node < 1:
        raise MemoryPlanError(f"--nodes {nodes} / --gpus-per-node {gpus_per_node}: need at least one of each")
    base = base or Layout()
    budget = gpu_memory_gib * GIB * (1 - HEADROOM)
    world = nodes * gpus_per_node
    chosen, rejected, best = None, [], None
    for recompute in RECOMPUTE_ORDER:
        for tp, pp in candidate_layouts(m, nodes, gpus_per_node):
            dp = world // (tp * pp)
            micros = _micro_batches(global_batch, dp, micro_batch) if global_batch % dp == 0 else []
            for ep, micro in [(ep, micro) for ep in expert_parallel_sizes(m, dp) for micro in micros]:
                lay = replace(base, tensor=tp, pipeline=pp, data=dp, expert=ep, sequence_parallel=tp > 1, seq=seq,
                              micro_batch=micro, num_microbatches=global_batch // (micro * dp), recompute=recompute)
                try:
                    est = estimate(m, lay)
                except MemoryModelError:
                    continue
                best = est if best is None or est.peak < best.peak else best
                if chosen is None and est.fits(budget):
                    chosen = est
                elif micro == micros[0] or est.fits(budget):
                    why = "does not fit" if not est.fits(budget) else "fits, but a preferred layout fits too"
                    rejected.append((est, why))
    if chosen is None:
        closest = f"; closest: {best.layout.name()} at {best.peak / GIB:.1f} GiB" if best else ""
        raise MemoryPlanError(f"no layout fits {nodes} node(s) x {gpus_per_node} GPUs of {gpu_memory_gib:g} GiB at "
                              f"{seq} tokens per row (budget {budget / GIB:.1f} GiB per GPU{closest}); add nodes "
                              "(--nodes), shorten data.max_length or set --tp/--pp yourself")
    return MemoryPlan(chosen, budget, rejected)


def format_plan(plan: MemoryPlan, alternatives: int = 8) -> str:
    """The chosen layout's terms, then the rejected alternatives (the most relevant first)."""
    lay = plan.layout
    lines = [f"chosen: {lay.name()} (peak {plan.chosen.peak / GIB:.1f} GiB of a {plan.budget_bytes / GIB:.1f} GiB budget, "
             f"{HEADROOM:.0%} of the GPU kept free)", "", format_estimate(plan.chosen), "", "alternatives:",
             f"{'layout':52s} {'peak GiB':>9s}  verdict"]
    shown = sorted(plan.rejected, key=lambda r: (r[1] != "does not fit", r[0].layout.tensor * r[0].layout.pipeline))
    for est, why in shown[:alternatives]:
        lines.append(f"{est.layout.name():52s} {est.peak / GIB:9.1f}  {why}")
    if len(shown) > alternatives:
        lines.append(f"... {len(shown) - alternatives} more")
    return "\n".join(lines)
