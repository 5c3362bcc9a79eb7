"""Multi-process vocab-parallel loss check: each rank computes its shard of a deterministic batch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sft.loss import finalize_loss, reduce_loss, vocab_parallel_objective_loss
from megatron_sft.parallel import init_model_parallel

SEQ, BATCH, VOCAB_PADDED = 6, 4, 256


def make_case_inputs(index: int, padded_vocab: bool, all_masked: bool = False):
    """Deterministic full-batch inputs; target logits boosted so p spans (0, 1)."""
    vocab = 250 if padded_vocab else VOCAB_PADDED
    gen = torch.Generator().manual_seed(1000 + index)
    logits = torch.randn(SEQ, BATCH, VOCAB_PADDED, generator=gen) * 2.5
    target = torch.randint(0, vocab, (SEQ, BATCH), generator=gen)
    boost = torch.rand(SEQ, BATCH, generator=gen) * 12.0
    logits.scatter_add_(-1, target.unsqueeze(-1), boost.unsqueeze(-1))
    loss_mask = (torch.rand(SEQ, BATCH, generator=gen) > 0.2).float()
    target[0, 0] = -100  # an ignored token
    if all_masked:
        loss_mask.zero_()
    return logits, target, loss_mask, (vocab if padded_vocab else None)


def loss_cases_worker(tensor_parallel: int, cases: list[dict]) -> list[dict]:
    from megatron.core import parallel_state as ps

    init_model_parallel(tensor_parallel=tensor_parallel)
    tp_rank = ps.get_tensor_model_parallel_rank()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    dp_group = ps.get_data_parallel_group()
    results = []
    for index, case in enumerate(cases):
        logits, target, loss_mask, vocab_size = make_case_inputs(index, case["padded"], case.get("all_masked", False))
        cols = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
        part = VOCAB_PADDED // tensor_parallel
        shard = logits[:, cols, tp_rank * part : (tp_rank + 1) * part].to(case["dtype"]).clone().requires_grad_(True)
        out = vocab_parallel_objective_loss(
            shard * 1, target[:, cols].clone(), case["spec"], loss_mask[:, cols], vocab_size=vocab_size
        )
        num, den = reduce_loss(out, case["reduction"], case["denominator"])
        global_den = den.detach().clone()
        dist.all_reduce(global_den, group=dp_group)
        finalize_loss(num, global_den).backward()
        global_num = num.detach().clone()
        dist.all_reduce(global_num, group=dp_group)
        results.append(
            dict(
                tp_rank=tp_rank, dp_rank=dp_rank, loss=finalize_loss(global_num, global_den),
                grad=shard.grad.detach().float(), p=out.p.detach(), selected=out.selected,
            )
        )
    return results


def assemble_case(per_rank: list[list[dict]], case_index: int, tensor_parallel: int, world_size: int) -> dict:
    """Stitch one case's per-rank shards back into full tensors: grad [s, B, V], p [s, B], losses [world]."""
    dp = world_size // tensor_parallel
    rows = {(r[case_index]["dp_rank"], r[case_index]["tp_rank"]): r[case_index] for r in per_rank}
    grad = torch.cat(
        [torch.cat([rows[(d, t)]["grad"] for t in range(tensor_parallel)], dim=-1) for d in range(dp)], dim=1
    )
    p = torch.cat([rows[(d, 0)]["p"] for d in range(dp)], dim=1)
    losses = torch.stack([r["loss"] for r in rows.values()])
    return dict(grad=grad, p=p, losses=losses)
