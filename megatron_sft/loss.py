"""Vocab-parallel f(p) loss over tensor-parallel-sharded logits.

Follows megatron-core's ``tensor_parallel.vocab_parallel_cross_entropy`` (same layout [s, b, V/tp], same
all-reduces: max, then target logit and sum-exp; we send the latter two in one all-reduce) and replaces
-log p by any objective f(p) from :mod:`megatron_sft.objectives`. Backward is

    grad_logits = grad_out * w(p) * (softmax - onehot),   w(p) = -f'(p) p,

computed in place in the one fp32 [s, b, V/tp] buffer kept from forward, so the vocabulary is never
gathered and no second vocabulary-sized buffer is kept alive. Like megatron-core, fp32 logits are
consumed in place (the caller's tensor is overwritten); bf16/fp16 logits are upcast once into that buffer.

The reduction over tokens is separate (:func:`reduce_loss`): it returns a numerator and a denominator
that the trainer sums over micro-batches and data-parallel ranks before dividing, which makes
"token mean over the global batch" exact whatever the micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist

from megatron_sft.objectives import Objective, parse_objective

Tensor = torch.Tensor
Reduction = Literal["token_mean", "sequence_mean"]
Denominator = Literal["selected", "valid"]


@dataclass
class LossOutput:
    """Per-token results of :func:`vocab_parallel_objective_loss`, all shaped like ``target``."""

    per_token_loss: Tensor  # f(p) on selected tokens, 0 elsewhere (differentiable)
    p: Tensor  # probability of the target token (detached); 1.0 on invalid tokens
    valid: Tensor  # bool: target tokens that count (loss mask and not ignore_index)
    selected: Tensor  # bool: valid tokens that the objective trains on (thresholds / percentiles)


def _group_rank_and_size(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: Optional[dist.ProcessGroup]) -> None:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


# ---- the steps shared by this loss and the fused output loss (megatron_sft.fused_output_loss) -------------------

def padding_start(vocab_size: Optional[int], vocab_start: int, partition_vocab: int) -> Optional[int]:
    """First padded column of this shard (ids >= vocab_size take no probability mass and get no gradient), or
    None when the shard has no padding."""
    if vocab_size is None or vocab_size >= vocab_start + partition_vocab:
        return None
    return max(vocab_size - vocab_start, 0)


def local_targets(target: Tensor, vocab_start: int, partition_vocab: int,
                  valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(target index within this shard, 0 where the target is not on it; whether it is, and valid)."""
    in_partition = (target >= vocab_start) & (target < vocab_start + partition_vocab)
    if valid is not None:
        in_partition &= valid
    return (target - vocab_start).masked_fill(~in_partition, 0), in_partition


def exp_and_target_statistics(logits: Tensor, local_target: Tensor, in_partition: Tensor,
                              tp_group: Optional[dist.ProcessGroup]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(max, sum of exps, log p, log(1 - p)) per token over the whole TP-sharded vocabulary; ``logits`` (fp32)
    is left holding exp(logits - max) of this shard. Two all-reduces: the max, then the target logit and the
    other tokens' mass together."""
    logits_max = logits.amax(dim=-1)
    _all_reduce(logits_max, dist.ReduceOp.MAX, tp_group)
    logits -= logits_max.unsqueeze(-1)
    index = local_target.unsqueeze(-1)
    target_logit = logits.gather(-1, index).squeeze(-1).masked_fill(~in_partition, 0.0)

    # exp in place; the other tokens' mass is summed with the target entry zeroed, so that
    # 1 - p = others / sum_exp has no cancellation when p -> 1.
    torch.exp(logits, out=logits)
    target_exp = logits.gather(-1, index)
    logits.scatter_(-1, index, target_exp.masked_fill(in_partition.unsqueeze(-1), 0.0))
    others_exp = logits.sum(dim=-1)
    logits.scatter_(-1, index, target_exp)
    stats = torch.stack([target_logit, others_exp])
    _all_reduce(stats, dist.ReduceOp.SUM, tp_group)
    target_logit, others_exp = stats[0], stats[1]
    sum_exp = others_exp + target_logit.exp()
    log_sum_exp = torch.log(sum_exp)
    logp = target_logit - log_sum_exp
    p = logp.exp()
    # log(1 - p): log1p(-p) where p is small (a difference of two logs would keep only the absolute
    # accuracy of log(sum_exp), 1e-5 relative for p ~ 0.004); log(others / sum_exp) where p -> 1
    log1mp = torch.where(p < 0.5, torch.log1p(-p), torch.log(others_exp) - log_sum_exp)
    return logits_max, sum_exp, logp, log1mp


def logit_gradient_(softmax: Tensor, local_target: Tensor, in_partition: Tensor, scale: Tensor,
                    one_minus_p: Tensor) -> Tensor:
    """In place: this shard's softmax becomes scale * (softmax - onehot), ``scale`` = g * w(p) per token. The
    target entry scale * (p - 1) is written as -scale * (1 - p) from the exact 1 - p: the difference
    softmax - 1 would cancel in fp32 when p -> 1, where w can be large (log(1 - p))."""
    grad = softmax.mul_(scale.unsqueeze(-1))
    index = local_target.unsqueeze(-1)
    target_grad = torch.where(in_partition, -scale * one_minus_p, grad.gather(-1, index).squeeze(-1))
    return grad.scatter_(-1, index, target_grad.unsqueeze(-1))


class _VocabParallelObjectiveLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        vocab_parallel_logits: Tensor,
        target: Tensor,
        valid: Tensor,
        objective: Objective,
        vocab_size: Optional[int],
        tp_group: Optional[dist.ProcessGroup],
        select_group: Optional[dist.ProcessGroup],
    ):
        input_dtype = vocab_parallel_logits.dtype
        logits = vocab_parallel_logits.float()  # aliases fp32 input: consumed in place like megatron-core
        tp_rank, _ = _group_rank_and_size(tp_group)
        partition_vocab = logits.size(-1)
        vocab_start = tp_rank * partition_vocab
        pad_from = padding_start(vocab_size, vocab_start, partition_vocab)
        if pad_from is not None:
            logits[..., pad_from:] = float("-inf")
        local_target, in_partition = local_targets(target, vocab_start, partition_vocab, valid)
        _, sum_exp, logp, log1mp = exp_and_target_statistics(logits, local_target, in_partition, tp_group)
        logp = logp.masked_fill(~valid, 0.0)
        p = logp.exp()
        log1mp = log1mp.masked_fill(~valid, float("-inf"))
        selected = objective.select(p, valid, select_group)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        loss = torch.where(selected, objective.value(logp, log1mp), zero)
        weight = torch.where(selected, objective.weight(logp, log1mp), zero)

        logits.div_(sum_exp.unsqueeze(-1))  # the buffer now holds this shard's softmax
        ctx.save_for_backward(logits, local_target, in_partition, weight, log1mp.exp())
        ctx.input_dtype = input_dtype
        ctx.mark_non_differentiable(p, selected)
        return loss, p, selected

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_p: Tensor, _grad_selected: Tensor):  # type: ignore[override]
        softmax, local_target, in_partition, weight, one_minus_p = ctx.saved_tensors
        # reuse the saved buffer for the gradient
        grad = logit_gradient_(softmax, local_target, in_partition, weight * grad_loss.float(), one_minus_p)
        if ctx.input_dtype != grad.dtype:
            grad = grad.to(ctx.input_dtype)
        return grad, None, None, None, None, None, None


def _default_tp_group() -> Optional[dist.ProcessGroup]:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _default_select_group() -> Optional[dist.ProcessGroup]:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return None


_DEFAULT = object()


def resolve_objective_and_groups(objective: Objective | str, tp_group: Optional[dist.ProcessGroup] | object,
                                 select_group: Optional[dist.ProcessGroup] | object,
                                 ) -> tuple[Objective, Optional[dist.ProcessGroup], Optional[dist.ProcessGroup]]:
    """A spec string parsed; ``_DEFAULT`` groups replaced by megatron-core's TP group and, for objectives that
    select over the batch (percentiles), its data-parallel group."""
    if isinstance(objective, str):
        objective = parse_objective(objective)
    if tp_group is _DEFAULT:
        tp_group = _default_tp_group()
    if select_group is _DEFAULT:
        select_group = _default_select_group() if objective.needs_batch_statistics else None
    return objective, tp_group, select_group  # type: ignore[return-value]


def vocab_parallel_objective_loss(
    vocab_parallel_logits: Tensor,
    target: Tensor,
    objective: Objective | str,
    loss_mask: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    vocab_size: Optional[int] = None,
    tp_group: Optional[dist.ProcessGroup] | object = _DEFAULT,
    select_group: Optional[dist.ProcessGroup] | object = _DEFAULT,
) -> LossOutput:
    """f(p) per target token from logits sharded over the vocabulary.

    Args:
        vocab_parallel_logits: [s, b, V/tp] (any leading shape) logits of this TP rank's vocab shard.
            fp32 logits are overwritten in place; bf16/fp16 are upcast and accumulated in fp32.
        target: [s, b] token ids in the full (unpadded) vocabulary; ``ignore_index`` marks no-loss tokens.
        objective: an :class:`Objective` or a spec string (``parse_objective``).
        loss_mask: [s, b], nonzero where the token is trained on (e.g. response tokens).
        vocab_size: true vocabulary size when the logits' vocab is padded to a TP multiple.
        tp_group: tensor-parallel group (default: megatron-core's, or none when not initialised).
        select_group: group holding the rest of the batch for percentile objectives
            (default: megatron-core's data-parallel group).
    """
    objective, tp_group, select_group = resolve_objective_and_groups(objective, tp_group, select_group)
    if target.shape != vocab_parallel_logits.shape[:-1]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits {tuple(vocab_parallel_logits.shape)} "
            "without the vocabulary dimension; logits are [s, b, V/tp] and target [s, b]"
        )
    _, tp_size = _group_rank_and_size(tp_group)
    full_vocab = vocab_size if vocab_size is not None else vocab_parallel_logits.size(-1) * tp_size
    valid = valid_target_mask(target, loss_mask, ignore_index, full_vocab)

    loss, p, selected = _VocabParallelObjectiveLoss.apply(
        vocab_parallel_logits, target, valid, objective, vocab_size, tp_group, select_group
    )
    return LossOutput(per_token_loss=loss, p=p, valid=valid, selected=selected)


def valid_target_mask(target: Tensor, loss_mask: Optional[Tensor], ignore_index: int, full_vocab: int) -> Tensor:
    """Tokens that count (not ``ignore_index``, ``loss_mask`` nonzero); a counted id outside the vocabulary is
    an error naming its position, never a silent wrong gather."""
    valid = target != ignore_index
    if loss_mask is not None:
        if loss_mask.shape != target.shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != target shape {tuple(target.shape)}")
        valid = valid & (loss_mask != 0)
    bad = valid & ((target < 0) | (target >= full_vocab))
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        raise ValueError(
            f"target id {int(target[tuple(first)])} at position {first} is outside the vocabulary "
            f"[0, {full_vocab}); mark tokens without a label with ignore_index={ignore_index} or loss_mask=0"
        )
    return valid


def reduce_loss(
    out: LossOutput,
    reduction: Reduction = "token_mean",
    denominator: Denominator = "selected",
    sequence_ids: Optional[Tensor] = None,
    batch_dim: int = -1,
) -> tuple[Tensor, Tensor]:
    """(numerator, denominator) of the loss; sum both over micro-batches and DP ranks, then divide.

    reduction:
        ``token_mean``: sum of f(p) over tokens / number of tokens (the default; the reference trainer).
        ``sequence_mean``: each sequence's token mean, averaged over sequences.
    denominator:
        ``selected`` counts only tokens a threshold/percentile objective keeps (what the reference
        trainer does); ``valid`` counts every response token, so dropped tokens dilute the loss.
    sequence_ids: [s, b] ids of packed sequences (tokens of different ids in one row are different
        sequences); without it every row b is one sequence.
    batch_dim: the dimension of ``out``'s tensors that indexes rows: -1 for megatron-core's loss layout
        [s, b], 0 for the [b, s] that GPTModel hands a loss function (what the trainer passes).
    """
    if denominator not in ("selected", "valid"):
        raise ValueError(f"denominator must be 'selected' or 'valid', got {denominator!r}")
    counted = out.selected if denominator == "selected" else out.valid
    if reduction == "token_mean":
        return out.per_token_loss.sum(), counted.sum().to(out.per_token_loss.dtype)
    if reduction != "sequence_mean":
        raise ValueError(f"reduction must be 'token_mean' or 'sequence_mean', got {reduction!r}")

    shape = [1] * counted.dim()
    shape[batch_dim] = -1  # one key per row (then per packed sequence within it)
    columns = torch.arange(counted.size(batch_dim), device=counted.device).view(shape).expand_as(counted)
    if sequence_ids is None:
        keys = columns
    else:
        if sequence_ids.shape != counted.shape:
            raise ValueError(f"sequence_ids shape {tuple(sequence_ids.shape)} != target shape {tuple(counted.shape)}")
        keys = columns * (int(sequence_ids.max()) + 1) + sequence_ids
    _, inverse = torch.unique(keys, return_inverse=True)
    counts = torch.bincount(inverse[counted], minlength=int(inverse.max()) + 1)
    per_token_scale = torch.where(counted, 1.0 / counts[inverse].clamp_min(1).to(out.per_token_loss.dtype), 0.0)
    numerator = (out.per_token_loss * per_token_scale).sum()
    return numerator, (counts > 0).sum().to(out.per_token_loss.dtype)


def token_p_stats(out: LossOutput) -> tuple[Tensor, Tensor]:
    """(sum of p, count) over valid tokens: the mean target-token probability, the capability diagnostic."""
    return out.p[out.valid].sum(), out.valid.sum().to(out.p.dtype)


def finalize_loss(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, and 0 (with zero gradients, never NaN) when no token counted."""
    return numerator / denominator.clamp_min(1.0)
