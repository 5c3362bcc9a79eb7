"""Model chunks, megatron-core DDP, distributed optimizer and LR schedule for a training run.

Everything parallel is megatron-core's own: ``GPTModel`` chunks per (virtual) pipeline stage,
``DistributedDataParallel`` with contiguous grad buffers, ``get_megatron_optimizer`` (Adam with decoupled
weight decay, optionally sharded over DP = ZeRO-1), ``OptimizerParamScheduler`` and
``finalize_model_grads`` (DP/SP/embedding grad all-reduces and per-token scaling).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_sft.fused_output_loss import install_fused_output_layer
from megatron_sft.model.args import ModelArgs
from megatron_sft.model.attention_backends import resolve_attention_backend
from megatron_sft.model.builder import build_gpt_model, build_transformer_config
from megatron_sft.model.fusions import resolve_fusions
from megatron_sft.model.checkpoint import MODEL_DIR, load_weights as load_checkpoint_weights, read_model_args
from megatron_sft.parallel import current_device
from megatron_sft.train.preflight import check_experts
from megatron_sft.config import Config, OptimConfig, ParallelConfig


@dataclass
class TrainingModel:
    args: ModelArgs
    chunks: list  # DDP-wrapped GPTModel per virtual pipeline stage (one without interleaving)
    optimizer: object
    scheduler: object
    config: object  # the TransformerConfig shared by the chunks
    loss_chunk_tokens: int = 0  # > 0: the fused output loss, with chunks of this many tokens
    distributed_optimizer: bool = True  # as built (see optimizer_sharding); checkpoints record it

    @property
    def modules(self) -> list:
        """The unwrapped GPTModel chunks (for state dicts)."""
        return [chunk.module for chunk in self.chunks]


def build_model_chunks(cfg: Config, load_weights: bool = True) -> tuple[ModelArgs, object, list]:
    """(model args, TransformerConfig, this rank's GPTModel chunks: one per virtual pipeline stage), with the
    checkpoint's weights loaded and the fused output layer installed when configured."""
    from megatron.core import parallel_state as ps

    args = read_model_args(cfg.model.checkpoint)
    par = cfg.parallel
    check_experts(args, cfg)
    tconfig = build_transformer_config(
        args,
        tensor_parallel=par.tensor,
        pipeline_parallel=par.pipeline,
        virtual_pipeline_parallel=par.virtual_pipeline,
        expert_parallel=par.expert,
        moe_aux_loss_coeff=moe_aux_loss_coeff(cfg, args),
        moe_capacity_factor=cfg.model.moe_capacity_factor,
        fusions=resolve_fusions(cfg.model, resolve_attention_backend(cfg.model.attention_backend)),
        sequence_parallel=par.sequence_parallel,
        recompute_granularity=None if cfg.model.recompute == "none" else cfg.model.recompute,
        # always: megatron-core tags tensor-parallel weights (tensor_model_parallel, partition_dim) only while
        # initialising them; without the tags the grad norm counts sharded weights on TP rank 0 only and
        # clipping goes wrong at TP > 1. The loaded weights replace the random ones.
        perform_initialization=True,
    )
    tconfig.calculate_per_token_loss = cfg.objective.normalization == "global"
    vp = par.virtual_pipeline
    modules = []
    for stage in range(vp or 1):
        vp_stage = stage if vp else None
        modules.append(build_gpt_model(
            args, tconfig,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp is None, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=vp is None, vp_stage=vp_stage),
            vp_stage=vp_stage, attention_backend=cfg.model.attention_backend,
        ))
    if load_weights:
        load_checkpoint_weights(modules, Path(cfg.model.checkpoint) / MODEL_DIR)
    if cfg.model.fused_output_loss:
        for module in modules:
            if module.post_process:
                install_fused_output_layer(module)
    return args, tconfig, modules


def moe_aux_loss_coeff(cfg: Config, args: ModelArgs) -> float:
    """The load-balancing loss weight: ``model.moe_aux_loss_coeff``, else the HF config's router_aux_loss_coef
    (0 for a dense model)."""
    if not args.is_moe:
        return 0.0
    return args.moe_aux_loss_coeff if cfg.model.moe_aux_loss_coeff is None else cfg.model.moe_aux_loss_coeff


@dataclass(frozen=True)
class OptimizerSharding:
    """How gradients and Adam's state are spread over the data-parallel replicas of a run."""
    distributed: bool  # megatron-core's distributed optimizer (ZeRO-1)
    overlap_grad_reduce: bool
    overlap_param_gather: bool


def data_parallel_replicas() -> int:
    """Ranks holding the same weights: DP (x CP), or the experts' own data-parallel group when larger."""
    from megatron.core import parallel_state as ps

    return max(ps.get_data_parallel_world_size(with_context_parallel=True), ps.get_expert_data_parallel_world_size())


def optimizer_sharding(par: ParallelConfig, replicas: int, saved_distributed: Optional[bool] = None) -> OptimizerSharding:
    """What ``parallel.*`` asks for, minus what one replica has no use for.

    With one data-parallel replica there is nothing to shard, reduce or gather, yet megatron-core's distributed
    optimizer still copies the whole gradient and weight buffers through one-rank collectives every step and
    holds the weights in its own buffer; the plain optimizer keeps the same state (Adam moments, fp32 main
    weights for bf16) with none of that (on the 2-core CPU training benchmark, 1.3-1.6x the tokens/s). The
    two write different optimizer-state formats, so a resumed run keeps the format of its checkpoint
    (``saved_distributed``) whatever its new layout; both optimizers work at any DP."""
    distributed = saved_distributed if saved_distributed is not None else par.distributed_optimizer and replicas > 1
    communicates = replicas > 1
    return OptimizerSharding(distributed=distributed, overlap_grad_reduce=par.overlap_grad_reduce and communicates,
                             overlap_param_gather=par.overlap_param_gather and distributed and communicates)


def wrap_in_ddp(tconfig, modules: list, par: ParallelConfig, sharding: OptimizerSharding) -> list:
    """megatron-core DDP around each chunk: contiguous fp32 grad buffers, replicas identical across DP; bucketed
    gradient reduction overlapped with the backward and weight all-gathers with the forward when configured."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=sharding.overlap_grad_reduce,
        overlap_param_gather=sharding.overlap_param_gather,
        bucket_size=par.bucket_size,
        use_distributed_optimizer=sharding.distributed,
        check_for_nan_in_grad=False,  # non-finite steps are handled by the trainer (skip or halt)
    )
    chunks = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=module, disable_bucketing=index > 0)
        for index, module in enumerate(modules)
    ]
    for chunk in chunks:
        chunk.broadcast_params()  # identical replicas across DP (they loaded the same weights anyway)
    return chunks


def build_optimizer(o: OptimConfig, tconfig, chunks: list, distributed_optimizer: bool):
    """megatron-core's Adam (decoupled weight decay, grad clipping; sharded over DP when distributed)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0],
            adam_beta2=o.betas[1], adam_eps=o.eps, clip_grad=o.clip_grad, bf16=tconfig.bf16,
            params_dtype=tconfig.params_dtype, use_distributed_optimizer=distributed_optimizer,
        ),
        chunks,
    )


def build_scheduler(o: OptimConfig, optimizer, total_steps: int):
    """Warmup then cosine/linear decay (or constant) over ``total_steps``: the schedule's whole length."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = o.warmup_steps if o.warmup_steps is not None else int(round(o.warmup_ratio * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr if o.schedule != "constant" else o.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=o.schedule,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )


def build_training_model(cfg: Config, total_steps: int, load_weights: bool = True,
                         saved_distributed_optimizer: Optional[bool] = None) -> TrainingModel:
    """This rank's chunks with the checkpoint's weights, in DDP, with optimizer and LR schedule; the
    TransformerConfig gets the hooks megatron-core's schedules call (grad finalisation, loss scale, no_sync).
    ``saved_distributed_optimizer``: the optimizer of the checkpoint a resumed run loads (its format)."""
    from megatron.core.distributed import finalize_model_grads

    args, tconfig, modules = build_model_chunks(cfg, load_weights)
    sharding = optimizer_sharding(cfg.parallel, data_parallel_replicas(), saved_distributed_optimizer)
    chunks = wrap_in_ddp(tconfig, modules, cfg.parallel, sharding)
    optimizer = build_optimizer(cfg.optim, tconfig, chunks, sharding.distributed)
    scheduler = build_scheduler(cfg.optim, optimizer, total_steps)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.grad_scale_func = optimizer.scale_loss
    tconfig.no_sync_func = [chunk.no_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].no_sync
    if sharding.overlap_grad_reduce:  # each chunk's reduction starts after its last micro-batch's backward
        tconfig.grad_sync_func = [chunk.start_grad_sync for chunk in chunks] if len(chunks) > 1 else chunks[0].start_grad_sync
    return TrainingModel(args=args, chunks=chunks, optimizer=optimizer, scheduler=scheduler, config=tconfig,
                         loss_chunk_tokens=cfg.model.loss_chunk_tokens if cfg.model.fused_output_loss else 0,
                         distributed_optimizer=sharding.distributed)


def gather_parameters(model: TrainingModel) -> None:
    """Complete the weights' all-gather that ``parallel.overlap_param_gather`` defers to the next forward, so
    that what is read now (a checkpoint, an export) is the updated weights on every rank. A no-op otherwise."""
    for chunk in model.chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def set_train_mode(model: TrainingModel, training: bool) -> None:
    for chunk in model.chunks:
        chunk.train(training)


def zero_grads(model: TrainingModel) -> None:
    for chunk in model.chunks:
        chunk.zero_grad_buffer()
    model.optimizer.zero_grad()


EXACT_CHECK_ELEMENTS = 1 << 24  # elements per slice of the exact check: a bounded temporary


def all_finite(values: torch.Tensor) -> bool:
    """Whether every element is finite, in one reduction pass with no temporary of the tensor's size.

    ``torch.isfinite(t).all()`` builds a bool and an ``abs`` copy of ``t``: for a gradient buffer that is
    three passes and, on a 7B model's fp32 gradients at TP=2, a 14 GB spike after every backward. A sum is
    finite unless an element is inf/NaN (they propagate) or finite elements overflowed it; only then are the
    elements checked exactly, a slice at a time, so a huge but finite gradient is never called non-finite."""
    if bool(torch.isfinite(values.sum(dtype=torch.float32))):
        return True
    flat = values.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + EXACT_CHECK_ELEMENTS]).all())
               for i in range(0, flat.numel(), EXACT_CHECK_ELEMENTS))


def grads_finite(model: TrainingModel) -> bool:
    """Whether every gradient on every rank is finite (one all-reduce of a flag over the world)."""
    import torch.distributed as dist

    finite = all(all_finite(buffer.grad_data) for chunk in model.chunks for buffer in chunk.buffers)
    flag = torch.tensor([1.0 if finite else 0.0], device=current_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)
