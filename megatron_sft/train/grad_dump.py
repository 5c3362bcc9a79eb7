"""Debug hook: write the first training step's gradients, per HF parameter name, to a file.

Set ``MEGATRON_SFT_DUMP_GRADS=/path/grads.pt`` in the environment of every rank (``--nproc`` workers
inherit it). The first step a process runs then saves, from global rank 0, after megatron-core's
``finalize_model_grads`` (DP / SP / embedding all-reduces and the per-token scaling) and before the
optimizer (so before gradient clipping and weight decay)::

    {"grads": {hf_name: fp32 tensor},            # the full (TP-gathered, DP-reduced) main_grad
     "micro_batches": [[{tokens, sequence_ids, labels, loss_mask}, ...] per DP rank],
     "loss": float}                              # filled in by the caller

The tensors are the TP=1 megatron layout mapped to HF names with the converter's own mapping
(:func:`megatron_sft.convert.mapping.mcore_to_hf`), so a test compares them directly with the HF model's
``param.grad``. Why: the logged grad norm alone cannot say which parameter's gradient is wrong.
Every gradient is gathered to rank 0 in memory (as objects over the world group): a debugging aid for
small models, used by tests/test_train_reference.py.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

ENV = "MEGATRON_SFT_DUMP_GRADS"

# Transformer Engine fuses the norms into the following linear layer; the local spec keeps them apart
_TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def dump_path() -> str | None:
    """Where to write the first step's gradients (None: no dump)."""
    return os.environ.get(ENV) or None


def _reduced_grads(chunk, distributed_optimizer: bool) -> dict:
    """param -> its reduced main_grad. The distributed optimizer reduce-scatters the buffers, so each DP
    rank holds only its own shard reduced: the shards are all-gathered into a copy (the buffer is untouched)."""
    from megatron.core import parallel_state as ps

    grads: dict = {}
    for buffer in chunk.buffers:
        gathered = []
        for bucket in buffer.buckets:
            data = bucket.grad_data
            if distributed_optimizer and ps.get_data_parallel_world_size() > 1:
                size = ps.get_data_parallel_world_size()
                shard = data.view(size, -1)[ps.get_data_parallel_rank()].clone()
                data = torch.empty_like(data)
                dist.all_gather_into_tensor(data, shard, group=ps.get_data_parallel_group())
            gathered.append(data)
        for param, (start, end, bucket_id) in buffer.param_index_map.items():
            offset = buffer.buckets[bucket_id].offset
            grads[param] = gathered[bucket_id][start - offset:end - offset].view(param.shape)
    return grads


def _tp_full(name: str, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The TP=1 tensor from this rank's shard: vocab / column / row shards concatenated; gate and up of
    linear_fc1 are sharded separately ([gate_r; up_r] per rank), so they are regrouped as [gate; up]."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return grad.detach().float().clone()
    parts = [torch.empty_like(grad) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, grad.contiguous(), group=ps.get_tensor_model_parallel_group())
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):
        halves = [torch.chunk(part, 2, dim=0) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0).float()
    return torch.cat(parts, dim=dim).float()


def _global_name(module, name: str) -> str:
    """Local layer index (per pipeline stage / virtual chunk) -> the global one, TE norm names -> local."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(module.decoder.layers[int(parts[2])].layer_number - 1)
    name = ".".join(parts)
    for te, local in _TE_NAMES.items():
        name = name.replace(te, local)
    return name


def megatron_grads(model) -> dict[str, torch.Tensor]:
    """Full TP=1 gradients keyed by megatron's (global) names, on every rank of DP rank 0's model replica."""
    from megatron.core import parallel_state as ps

    distributed = bool(getattr(model.chunks[0], "ddp_config", None) and model.chunks[0].ddp_config.use_distributed_optimizer)
    local: dict[str, torch.Tensor] = {}
    for chunk in model.chunks:
        reduced = _reduced_grads(chunk, distributed)
        module = chunk.module
        for name, param in module.named_parameters():
            if name == "output_layer.weight" and getattr(param, "shared_embedding", False):
                continue  # the tied head's copy on the last stage: its grad is the embedding's (all-reduced)
            grad = reduced.get(param)
            if grad is not None:
                local[_global_name(module, name)] = _tp_full(name, param, grad)
    keep = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
    pieces: list = [None] * dist.get_world_size() if dist.is_initialized() else [local]
    if dist.is_initialized():
        dist.all_gather_object(pieces, local if keep else {})
    return {k: v for piece in pieces for k, v in piece.items()}


def dump_step_gradients(model, micro_batches: list[dict], path: str, **extra) -> None:
    """Write the step's gradients by HF name and every DP rank's micro-batches to ``path`` (rank 0)."""
    from megatron.core import parallel_state as ps

    from megatron_sft.convert.mapping import mcore_to_hf

    grads = megatron_grads(model)
    batches = [{k: v.cpu() for k, v in mb.items()} for mb in micro_batches]
    first = ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage(ignore_virtual=True)
    per_rank: list = [None] * dist.get_world_size() if dist.is_initialized() else [(0, batches)]
    if dist.is_initialized():
        dist.all_gather_object(per_rank, (ps.get_data_parallel_rank(), batches) if first else None)
    by_dp = dict(item for item in per_rank if item is not None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        hf = {name: tensor.clone() for name, tensor in mcore_to_hf(model.args, grads.__getitem__)}
        torch.save({"grads": hf, "micro_batches": [by_dp[r] for r in sorted(by_dp)], **extra}, path)
