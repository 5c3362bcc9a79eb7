"""``megatron-sft plan``: the per-GPU memory of a training run and the layout that fits (megatron_sft/memory/plan.py)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "plan", help="per-GPU memory terms and the TP/PP/recompute/micro-batch layout that fits",
        description="Predict the per-GPU peak memory of a training run term by term (weights, fp32 grads, "
        "distributed-optimizer state, activations per layer with recompute, attention scores, pipeline schedule, "
        "logits/loss buffers) and choose TP, PP, recompute and micro-batch together: no recompute where it fits, "
        "then the least model parallelism. From a model key (--model, --seq) or from a training config "
        "(its model checkpoint's model_args.json, data.max_length, train.global_batch_size/micro_batch_size).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="training config YAML (optional)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of the config")
    parser.add_argument("--model", help="model key (megatron-sft sbatch --help lists them), e.g. qwen2.5-14b")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    parser.add_argument("--seq", type=int, help="tokens per row (packed rows: data.max_length; default 4096 or the config's)")
    parser.add_argument("--global-batch", type=int, help="rows per optimizer step (default 256 or the config's)")
    parser.add_argument("--micro-batch", type=int, help="largest micro-batch to consider (default 1 or the config's)")
    parser.add_argument("--unfused-loss", action="store_true", help="plan for model.fused_output_loss=false")
    parser.add_argument("--alternatives", type=int, default=8, help="rejected layouts to show (default 8)")
    parser.set_defaults(run=run)


def _registry_shape(key: str):
    """The memory model's shape of a registry model (mixtures of experts included)."""
    from megatron_sft.memory.model import ModelShape
    from megatron_sft.recipes.models import get_model

    return ModelShape.from_spec(get_model(key))


def _shape_and_settings(args: argparse.Namespace):
    """(ModelShape, seq, global batch, micro-batch, base Layout) from the flags and, when given, the config."""
    from megatron_sft.memory.model import Layout, ModelShape

    seq, global_batch, micro, base = 4096, 256, 1, Layout(fused_output_loss=not args.unfused_loss)
    shape = _registry_shape(args.model) if args.model else None
    if args.config:
        from megatron_sft.config import load_config
        from megatron_sft.model.args import ModelArgs

        config = load_config(args.config, list(args.overrides))
        seq, global_batch, micro = config.data.max_length, config.train.global_batch_size, config.train.micro_batch_size
        base = Layout(fused_output_loss=config.model.fused_output_loss, loss_chunk_tokens=config.model.loss_chunk_tokens,
                      distributed_optimizer=config.parallel.distributed_optimizer)
        if shape is None:
            args_file = Path(config.model.checkpoint) / "model_args.json"
            if not args_file.is_file():
                raise ValueError(f"model.checkpoint: {args_file} not found; pass --model KEY to plan without the checkpoint")
            shape = ModelShape.from_args(ModelArgs.load(args_file))
    if shape is None:
        raise ValueError("give --model KEY or a training config")
    return shape, args.seq or seq, args.global_batch or global_batch, args.micro_batch or micro, base


def run(args: argparse.Namespace) -> int:
    from megatron_sft.config import ConfigError
    from megatron_sft.memory.plan import MemoryPlanError, format_plan, plan_memory
    from megatron_sft.recipes.models import UnknownModelError

    try:
        shape, seq, global_batch, micro, base = _shape_and_settings(args)
        plan = plan_memory(shape, args.nodes, args.gpus_per_node, args.gpu_memory, seq, global_batch, micro, base)
    except (ConfigError, UnknownModelError, MemoryPlanError, ValueError) as err:
        print(f"megatron-sft plan: error: {err}")
        return 2
    print(f"{shape.layers} layers, hidden {shape.hidden}, {seq} tokens per row, global batch {global_batch}, on "
          f"{args.nodes} x {args.gpus_per_node} GPUs of {args.gpu_memory:g} GiB (bf16, Transformer Engine)")
    print(format_plan(plan, args.alternatives))
    lay = plan.layout
    print(f"\nset: parallel.tensor={lay.tensor} parallel.pipeline={lay.pipeline} "
          f"parallel.sequence_parallel={str(lay.sequence_parallel).lower()} train.micro_batch_size={lay.micro_batch} "
          f"model.recompute={lay.recompute}" + (f" parallel.expert={lay.expert}" if lay.expert > 1 else ""))
    return 0
