"""Choose TP x PP x DP for a model on N nodes x G GPUs, from a memory estimate.

Per GPU, bf16 training with megatron-core's distributed optimizer holds
  - the bf16 weights and fp32 main gradients of its model shard: 6 bytes x P / (TP x PP),
  - its share of the fp32 master weights and two Adam moments: 12 bytes x P / (TP x PP x DP).
The plan keeps that within half of the GPU's memory (the rest is for activations and the
[tokens x vocab/TP] logits) and prefers, in order: no model parallelism, tensor parallelism inside a
node (it needs the NVLink bandwidth), then pipeline stages. TP must divide the attention and KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sft.recipes.models import ModelSpec

STATE_MEMORY_FRACTION = 0.5
WEIGHT_AND_GRAD_BYTES = 6
OPTIMIZER_BYTES = 12


class PlanError(ValueError):
    """The model does not fit the GPUs given, or the batch cannot be split over them."""


@dataclass(frozen=True)
class ParallelPlan:
    tensor: int
    pipeline: int
    data: int
    micro_batch_size: int
    state_gib_per_gpu: float
    reason: str
    recompute: str = "none"  # model.recompute chosen with the layout (memory-model plans)
    memory_table: str = ""  # the memory model's per-GPU terms and rejected alternatives (memory-model plans)
    expert: int = 1  # parallel.expert (a mixture of experts, from a memory model that plans expert parallelism)

    @property
    def sequence_parallel(self) -> bool:
        return self.tensor > 1


def state_bytes_per_gpu(parameters: int, tensor: int, pipeline: int, data: int) -> float:
    shard = parameters / (tensor * pipeline)
    return shard * WEIGHT_AND_GRAD_BYTES + shard * OPTIMIZER_BYTES / data


def plan_parallel(model: ModelSpec, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                  global_batch_size: int, micro_batch_size: int, seq: int | None = None) -> ParallelPlan:
    """The smallest model-parallel layout whose weights, gradients and optimizer state fit (see module doc);
    with ``seq`` (tokens per row) TP, PP, recompute and micro-batch from the full memory model instead."""
    if seq is not None:
        return plan_with_memory_model(model, nodes, gpus_per_node, gpu_memory_gib, global_batch_size, micro_batch_size, seq)
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"need at least one node and one GPU (got {nodes} nodes x {gpus_per_node} GPUs)")
    world = nodes * gpus_per_node
    budget = gpu_memory_gib * 2**30 * STATE_MEMORY_FRACTION
    tp_options = [tp for tp in (1, 2, 4, 8) if tp <= gpus_per_node and model.heads % tp == 0 and model.kv_heads % tp == 0]
    candidates = [(tp, 1) for tp in tp_options]
    candidates += [(tp_options[-1], pp) for pp in (2, 4, 8, 16) if model.layers % pp == 0]
    for tp, pp in candidates:
        if world % (tp * pp):
            continue
        dp = world // (tp * pp)
        need = state_bytes_per_gpu(model.parameters, tp, pp, dp)
        if need <= budget:
            micro = fit_micro_batch(global_batch_size, micro_batch_size, dp)
            reason = (f"{model.parameters / 1e9:.2f}B parameters: weights+grads+Adam state {need / 2**30:.1f} GiB per GPU "
                      f"at TP{tp} PP{pp} DP{dp} (budget {STATE_MEMORY_FRACTION:.0%} of {gpu_memory_gib:g} GiB)")
            return ParallelPlan(tp, pp, dp, micro, need / 2**30, reason)
    smallest = min(state_bytes_per_gpu(model.parameters, tp, pp, max(world // (tp * pp), 1)) for tp, pp in candidates)
    raise PlanError(f"{model.key} ({model.parameters / 1e9:.1f}B parameters) does not fit {nodes} node(s) x {gpus_per_node} "
                    f"GPUs of {gpu_memory_gib:g} GiB: at least {smallest / 2**30:.0f} GiB of state per GPU against a budget "
                    f"of {budget / 2**30:.0f} GiB; add nodes (--nodes) or set --tp/--pp yourself")


def plan_with_memory_model(model: ModelSpec, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                           global_batch_size: int, micro_batch_size: int, seq: int) -> ParallelPlan:
    """megatron_sft.memory.plan's choice (activations, logits, recompute, expert parallelism included) as a
    ParallelPlan."""
    from megatron_sft.memory.model import GIB, ModelShape
    from megatron_sft.memory.plan import MemoryPlanError, format_plan, plan_memory

    shape = ModelShape.from_spec(model)
    try:
        plan = plan_memory(shape, nodes, gpus_per_node, gpu_memory_gib, seq, global_batch_size, micro_batch_size)
    except MemoryPlanError as err:
        raise PlanError(f"{model.key}: {err}") from None
    lay = plan.layout
    static = sum(t.bytes for t in plan.chosen.terms if t.phase == "static") / GIB
    reason = (f"{model.parameters / 1e9:.2f}B parameters at {seq} tokens per row: predicted peak {plan.chosen.peak / GIB:.1f} "
              f"GiB per GPU at TP{lay.tensor} PP{lay.pipeline} DP{lay.data}{f' EP{lay.expert}' if lay.expert > 1 else ''}, micro-batch {lay.micro_batch}, recompute "
              f"{lay.recompute} (budget {plan.budget_bytes / GIB:.0f} GiB of {gpu_memory_gib:g})")
    return ParallelPlan(lay.tensor, lay.pipeline, lay.data, lay.micro_batch, static, reason, lay.recompute, format_plan(plan),
                        lay.expert)


def fit_micro_batch(global_batch_size: int, micro_batch_size: int, data_parallel: int) -> int:
    """The largest micro-batch <= the recipe's that splits the global batch evenly over the DP ranks."""
    if global_batch_size % data_parallel:
        raise PlanError(f"global batch {global_batch_size} cannot be split over {data_parallel} data-parallel ranks; "
                        "change the number of GPUs or train.global_batch_size")
    per_rank = global_batch_size // data_parallel
    return max(m for m in range(1, min(micro_batch_size, per_rank) + 1) if per_rank % m == 0)
