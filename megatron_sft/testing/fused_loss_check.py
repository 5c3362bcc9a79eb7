"""Multi-process check of the fused output layer + f(p) loss against the unfused path on the same layout."""

from __future__ import annotations

import torch

SEQ, BATCH, HIDDEN, VOCAB_PADDED, VOCAB = 10, 3, 24, 256, 250


def make_inputs(seed: int, dtype: torch.dtype):
    """Hidden states, output weight, targets, loss mask and a non-uniform upstream gradient per token."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=gen)
    weight = torch.randn(VOCAB_PADDED, HIDDEN, generator=gen) * 0.6
    target = torch.randint(0, VOCAB, (SEQ, BATCH), generator=gen)
    weight[target.flatten()[:12]] += hidden.reshape(-1, HIDDEN)[:12] * 0.5  # some confident tokens: p spans (0, 1)
    loss_mask = (torch.rand(SEQ, BATCH, generator=gen) > 0.25).float()
    target[0, 0] = -100
    upstream = torch.rand(SEQ, BATCH, generator=gen) + 0.1
    return hidden.to(dtype), weight.to(dtype), target, loss_mask, upstream


def fused_vs_unfused_worker(tensor_parallel: int, sequence_parallel: bool, cases: list[dict]) -> list[dict]:
    """Per case, this rank's loss, p, selected and the gradients of its hidden-state leaf and weight shard, from
    the fused path and from output matmul + ``vocab_parallel_objective_loss``; both with the upstream
    gradient (``uniform``: the trainer's token-mean reduction instead)."""
    from megatron.core import parallel_state as ps

    from megatron_sft.fused_output_loss import fused_output_objective_loss, output_layer_input
    from megatron_sft.loss import finalize_loss, reduce_loss, vocab_parallel_objective_loss
    from megatron_sft.parallel import init_model_parallel

    init_model_parallel(tensor_parallel=tensor_parallel)
    tp_rank, tp_group = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    part = VOCAB_PADDED // tensor_parallel
    results = []
    for index, case in enumerate(cases):
        hidden, weight, target, loss_mask, upstream = make_inputs(index, case["dtype"])
        rows = slice(tp_rank * SEQ // tensor_parallel, (tp_rank + 1) * SEQ // tensor_parallel)
        out = {}
        for path in ("fused", "unfused"):
            h_leaf = (hidden[rows] if sequence_parallel else hidden).clone().requires_grad_(True)
            w_leaf = weight[tp_rank * part:(tp_rank + 1) * part].clone().requires_grad_(True)
            # [s, b, h] -> [b, s, h] as GPTModel returns it: the gradient reaches the TP copy transposed
            h = output_layer_input(h_leaf, sequence_parallel, tp_group).transpose(0, 1).contiguous()
            rows_target, rows_mask = target.t().contiguous(), loss_mask.t().contiguous()
            if path == "fused":
                loss = fused_output_objective_loss(h, w_leaf, rows_target, case["spec"], rows_mask,
                                                   vocab_size=VOCAB, chunk_tokens=case["chunk"])
            else:
                logits = torch.matmul(h, w_leaf.t())
                loss = vocab_parallel_objective_loss(logits, rows_target, case["spec"], rows_mask, vocab_size=VOCAB)
            if case["uniform"]:
                numerator, denominator = reduce_loss(loss, "token_mean", "selected")
                finalize_loss(numerator, denominator).backward()
            else:
                (loss.per_token_loss * upstream.t().to(loss.per_token_loss.dtype)).sum().backward()
            out[path] = dict(loss=loss.per_token_loss.detach().float(), p=loss.p, selected=loss.selected,
                             grad_h=h_leaf.grad.float(), grad_w=w_leaf.grad.float())
        results.append(out)
    return results
