"""Output layer and f(p) objective fused, chunk by chunk: the [tokens, V/tp] logits are never whole.

The unfused path keeps one fp32 [tokens, V/tp] buffer from forward to backward (plus the output layer's own
logits), the largest activation of an SFT step on a 150k vocabulary. Here the logits of ``chunk_tokens``
tokens at a time are computed from the hidden states and this rank's weight shard, reduced to per-token
statistics (max, log-sum-exp, log p, log(1 - p)) by the same steps and TP all-reduces as
:mod:`megatron_sft.loss`, and dropped. Only tokens that count are computed: invalid tokens (prompt, padding,
``ignore_index``) in forward, and in backward only tokens with a non-zero gradient (not deselected by a
threshold/percentile).

Forward: pass 1 over the chunks gives every token's p; then the objective's selection (a percentile needs
all of them, and the data-parallel group's), its value and weight w(p) = -f'(p) p. Backward recomputes each
chunk's logits and applies ``grad_logits = g * w * (softmax - onehot)`` (the target entry from the exact
1 - p, as in the unfused loss) with the upstream gradient g of each token as it arrives, so any per-token
reduction (token mean, sequence mean, ...) is exact; grad_h = grad_logits @ W, grad_W += grad_logits^T h.
Recomputing costs one more matmul per chunk than keeping the logits: the price of never holding them.

The weight gradient goes straight into megatron-core DDP's fp32 ``main_grad`` buffer when the weight has one
(megatron-core's gradient-accumulation-fusion contract, see :func:`_weight_grad_for_autograd`), so no
[V/tp, h] gradient is allocated; without DDP it is accumulated in fp32 and returned. Peak extra memory: one
chunk's fp32 [chunk, V/tp] and its copy in the input dtype. The caller gathers the sequence-parallel hidden
states (or marks them for the TP all-reduce of their gradient) exactly as megatron-core's ColumnParallelLinear
would: :func:`output_layer_input`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_sft.loss import (
    _DEFAULT, LossOutput, _group_rank_and_size, exp_and_target_statistics, local_targets, logit_gradient_,
    padding_start, resolve_objective_and_groups, valid_target_mask,
)
from megatron_sft.objectives import Objective

Tensor = torch.Tensor
DEFAULT_CHUNK_TOKENS = 512


def _chunk_logits(hidden: Tensor, weight: Tensor, pad_from: Optional[int]) -> Tensor:
    """fp32 logits of this chunk on this rank's vocabulary shard, padded columns at -inf. Computed in the input
    dtype then upcast, as the unfused output layer + loss would see them."""
    logits = torch.matmul(hidden, weight.t()).float()
    if pad_from is not None:
        logits[:, pad_from:] = float("-inf")
    return logits


class _FusedOutputObjectiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, valid: Tensor, objective: Objective,  # type: ignore[override]
                vocab_size: Optional[int], tp_group: Optional[dist.ProcessGroup],
                select_group: Optional[dist.ProcessGroup], chunk_tokens: int, weight_gets_other_gradient: bool):
        tp_rank, _ = _group_rank_and_size(tp_group)
        partition = weight.size(0)
        start = tp_rank * partition
        pad_from = padding_start(vocab_size, start, partition)
        rows = valid.nonzero().squeeze(-1)  # same on every TP rank (labels are replicated): same chunks
        n = target.numel()
        logp = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        log1mp = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        shift = torch.zeros(n, dtype=torch.float32, device=hidden.device)  # max + log-sum-exp, for the softmax
        with torch.no_grad():
            for begin in range(0, rows.numel(), chunk_tokens):
                idx = rows[begin:begin + chunk_tokens]
                local, inside = local_targets(target[idx], start, partition)
                logits = _chunk_logits(hidden[idx], weight, pad_from)
                logits_max, sum_exp, logp[idx], log1mp[idx] = exp_and_target_statistics(logits, local, inside,
                                                                                         tp_group)
                shift[idx] = logits_max + torch.log(sum_exp)
                del logits
        p = logp.exp()
        selected = objective.select(p, valid, select_group)
        zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
        loss = torch.where(selected, objective.value(logp, log1mp), zero)
        token_weight = torch.where(selected, objective.weight(logp, log1mp), zero)
        ctx.save_for_backward(hidden, weight, target, token_weight, shift, log1mp.exp())
        ctx.settings = (start, partition, pad_from, tp_group, chunk_tokens, weight_gets_other_gradient)
        ctx.mark_non_differentiable(p, selected)
        return loss, p, selected

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_p: Tensor, _grad_selected: Tensor):  # type: ignore[override]
        hidden, weight, target, token_weight, shift, one_minus_p = ctx.saved_tensors
        start, partition, pad_from, tp_group, chunk_tokens, weight_gets_other_gradient = ctx.settings
        scale = token_weight * grad_loss.float()
        grad_hidden = torch.zeros_like(hidden)
        main_grad = getattr(weight, "main_grad", None)  # megatron-core DDP's gradient buffer for this weight
        grad_weight = main_grad if main_grad is not None else torch.zeros(weight.shape, dtype=torch.float32,
                                                                          device=weight.device)
        rows = (scale != 0).nonzero().squeeze(-1)  # tokens without gradient cost nothing
        for begin in range(0, rows.numel(), chunk_tokens):
            idx = rows[begin:begin + chunk_tokens]
            local, inside = local_targets(target[idx], start, partition)
            softmax = _chunk_logits(hidden[idx], weight, pad_from).sub_(shift[idx].unsqueeze(-1)).exp_()
            grad = logit_gradient_(softmax, local, inside, scale[idx], one_minus_p[idx])
            low = grad.to(hidden.dtype)  # what the unfused output layer's backward gets (no copy in fp32)
            h = hidden[idx]
            grad_hidden[idx] = torch.matmul(low, weight)
            _accumulate_weight_grad(grad_weight, grad, low, h)
            del softmax, grad, low  # the next chunk must not allocate while this one is alive
        if main_grad is None:
            weight_grad_out = grad_weight.to(weight.dtype)
        else:
            weight_grad_out = _weight_grad_for_autograd(weight, weight_gets_other_gradient)
        return grad_hidden, weight_grad_out, None, None, None, None, None, None, None, None


def _weight_grad_for_autograd(weight: Tensor, gets_other_gradient: bool) -> Optional[Tensor]:
    """What autograd receives for a weight whose gradient is already in its DDP ``main_grad``.

    megatron-core DDP adds ``param.grad`` into ``main_grad`` in a hook that runs when autograd accumulates the
    parameter's gradient, unless ``grad_added_to_main_grad`` is set; that hook also marks the gradient bucket
    ready, which ``overlap_grad_reduce`` waits for. So, as megatron-core's own fused weight-gradient layers do:
    - the weight gets no other gradient (untied, or the last stage of a pipeline): an uninitialised stand-in
      (zeros where megatron asks for them, ``zero_out_wgrad``) with ``grad_added_to_main_grad`` set, so the
      hook runs but adds nothing; it is dropped right after;
    - a tied embedding on this stage: None. The embedding's gradient arrives at the same parameter at the end
      of the backward and its hook adds that to ``main_grad`` as usual; no [V/tp, h] gradient waits in
      autograd through the layers' backward."""
    if gets_other_gradient:
        return None
    if hasattr(weight, "grad_added_to_main_grad"):
        weight.grad_added_to_main_grad = True
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(weight.shape, dtype=weight.dtype, device=weight.device)


WGRAD_BLOCK_ROWS = 4096  # vocabulary rows per low-precision weight-gradient matmul (bounds its temporary)


def _accumulate_weight_grad(acc: Tensor, grad32: Tensor, grad_low: Tensor, hidden: Tensor) -> None:
    """acc += grad^T h into the fp32 accumulator: in place for fp32 inputs; for bf16/fp16 the matmul runs in the
    input dtype (tensor cores, or the CPU's bf16 units: an fp32 matmul there measured 2.4x slower), a block of
    vocabulary rows at a time, each block added in fp32 (no weight-sized temporary)."""
    if hidden.dtype == torch.float32:
        acc.addmm_(grad32.t(), hidden)
        return
    for start in range(0, acc.size(0), WGRAD_BLOCK_ROWS):
        rows = slice(start, start + WGRAD_BLOCK_ROWS)
        acc[rows].add_(torch.matmul(grad_low[:, rows].t(), hidden))


def fused_output_objective_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    objective: Objective | str,
    loss_mask: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    tp_group: Optional[dist.ProcessGroup] | object = _DEFAULT,
    select_group: Optional[dist.ProcessGroup] | object = _DEFAULT,
    weight_gets_other_gradient: bool = False,
) -> LossOutput:
    """f(p) per target token from hidden states and this TP rank's output weight shard, logits never whole.

    Args:
        hidden: [..., h] final hidden states (after the final norm), the full sequence on every TP rank
            (see :func:`output_layer_input`); bf16 or fp32, statistics in fp32.
        weight: [V/tp, h] this rank's output (or tied embedding) weight shard; gets its gradient.
        target: [...] token ids in the unpadded vocabulary, ``ignore_index`` for no-loss tokens.
        objective, loss_mask, ignore_index, vocab_size, tp_group, select_group: as
            :func:`megatron_sft.loss.vocab_parallel_objective_loss`, whose outputs this returns.
        chunk_tokens: tokens per chunk; peak extra memory is chunk_tokens x V/tp x (4 + dtype) bytes.
        weight_gets_other_gradient: the weight is also used elsewhere in this backward (a tied embedding on
            the same stage); matters only when it has a DDP ``main_grad`` (:func:`_weight_grad_for_autograd`).
    """
    objective, tp_group, select_group = resolve_objective_and_groups(objective, tp_group, select_group)
    if hidden.shape[:-1] != target.shape or hidden.size(-1) != weight.size(-1):
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and target "
                         f"{tuple(target.shape)} do not fit: hidden is [..., h], weight [V/tp, h], target [...]")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    _, tp_size = _group_rank_and_size(tp_group)
    full_vocab = vocab_size if vocab_size is not None else weight.size(0) * tp_size
    valid = valid_target_mask(target, loss_mask, ignore_index, full_vocab)
    loss, p, selected = _FusedOutputObjectiveLoss.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, target.reshape(-1), valid.reshape(-1), objective, vocab_size,
        tp_group, select_group, chunk_tokens, weight_gets_other_gradient)
    shape = target.shape
    return LossOutput(per_token_loss=loss.view(shape), p=p.view(shape), valid=valid, selected=selected.view(shape))


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over TP. megatron-core's
    ``copy_to_tensor_model_parallel_region`` all-reduces ``grad.contiguous()`` and returns the original: a
    non-contiguous gradient (GPTModel transposes its output, so the loss's gradient arrives transposed) would
    silently stay partial. Here the reduced contiguous gradient is what is returned."""

    @staticmethod
    def forward(ctx, hidden: Tensor, group: dist.ProcessGroup) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def output_layer_input(hidden: Tensor, sequence_parallel: bool, tp_group: Optional[dist.ProcessGroup]) -> Tensor:
    """What megatron-core's ColumnParallelLinear feeds its matmul: the SP-gathered sequence (gradient
    reduce-scattered back), or the replicated hidden states whose gradient is all-reduced over TP."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    if tp_group is None or _group_rank_and_size(tp_group)[1] == 1:
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=tp_group)
    return _CopyToTensorParallel.apply(hidden, tp_group)


def install_fused_output_layer(gpt_model: torch.nn.Module) -> None:
    """Make ``gpt_model`` (a last pipeline stage) return the output layer's input instead of logits.

    The output layer's forward is replaced on this instance only (its parameters, names and checkpoints stay as
    they are): it hands back the hidden states as its matmul would see them (:func:`output_layer_input`) and
    remembers the weight it was given (the tied embedding or its own), which :func:`fused_output_weight`
    returns to the loss function. GPTModel transposes them to [b, s, h] as it would the logits."""
    layer = gpt_model.output_layer
    used: dict[str, Tensor] = {}  # not an attribute holding the Parameter: that would register it in the state dict

    def forward(input_: Tensor, weight: Optional[Tensor] = None, runtime_gather_output: Optional[bool] = None):
        if runtime_gather_output:
            raise ValueError("the fused output loss returns no logits; build the model without it for inference")
        used["weight"] = layer.weight if weight is None else weight
        embedding = getattr(gpt_model, "embedding", None) if gpt_model.pre_process else None
        used["tied_here"] = embedding is not None and embedding.word_embeddings.weight is used["weight"]
        return output_layer_input(input_, layer.sequence_parallel, layer.tp_group), None

    layer.forward = forward
    layer.fused_output_weight = used


def fused_output_weight(chunk: torch.nn.Module) -> tuple[Tensor, bool]:
    """The output weight the last forward of ``chunk`` (a GPTModel, possibly wrapped by DDP / Float16Module)
    used, which the fused loss takes beside the hidden states, and whether it is this chunk's input embedding
    too (tied, same stage: it gets a second gradient in the same backward)."""
    module = chunk
    while not hasattr(module, "output_layer") and hasattr(module, "module"):
        module = module.module
    used = getattr(getattr(module, "output_layer", None), "fused_output_weight", {})
    if used.get("weight") is None:
        raise RuntimeError("the fused output loss needs install_fused_output_layer() on the last stage's model")
    return used["weight"], used["tied_here"]
