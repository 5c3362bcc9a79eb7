"""Per-sequence attention boundaries for packed rows (no token attends across examples).

Local spec (CPU, or GPU without Transformer Engine): a boolean block-diagonal causal mask
``[b, 1, s, s]`` (True = masked), which megatron-core's ``DotProductAttention`` applies as given.
Transformer Engine: ``PackedSeqParams`` in THD layout, the micro-batch flattened to one row with
``cu_seqlens`` at every sequence boundary, so flash/fused attention skips the masked blocks entirely.
RoPE is relative, so positions continuing across a packed row give the same attention as restarting them.
"""

from __future__ import annotations

from typing import Optional

import torch


def is_packed(sequence_ids: torch.Tensor) -> bool:
    """Whether any row holds more than one example (otherwise the plain causal mask is exact)."""
    return bool((sequence_ids > 0).any())


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i must not see key j: j > i or j in another sequence.

    Padding (sequence id -1) attends to itself only, so no row is fully masked.
    """
    same = sequence_ids.unsqueeze(2) == sequence_ids.unsqueeze(1)
    s = sequence_ids.size(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=sequence_ids.device).tril()
    allowed = same & causal
    allowed |= torch.eye(s, dtype=torch.bool, device=sequence_ids.device)
    return (~allowed).unsqueeze(1)


def thd_packed_seq_params(sequence_ids: torch.Tensor):
    """PackedSeqParams for the micro-batch flattened to one row: one segment per (row, sequence)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = sequence_ids.shape
    row_offset = torch.arange(b, device=sequence_ids.device).unsqueeze(1) * (s + 1)
    flat = (sequence_ids + 1 + row_offset).reshape(-1)
    starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 1)).squeeze(1)
    cu_seqlens = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    max_len = int(torch.diff(cu_seqlens).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


def attention_inputs(batch: dict[str, torch.Tensor], use_thd: bool) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor], object]:
    """(batch, attention_mask, packed_seq_params) for one micro-batch; THD flattens the batch to one row."""
    sequence_ids = batch["sequence_ids"]
    if not use_thd:
        return batch, (block_causal_mask(sequence_ids) if is_packed(sequence_ids) else None), None
    # THD always (packed or not), so every micro-batch reaches the pipeline schedule as one [b*s] row
    params = thd_packed_seq_params(sequence_ids)
    flat = {key: value.reshape(1, -1) for key, value in batch.items()}
    # sequence ids restart in every row: offset them so that the flattened row keeps sequences apart
    # (reduction=sequence_mean counts per sequence id within a row)
    offset = torch.arange(sequence_ids.size(0), device=sequence_ids.device).unsqueeze(1) * (int(sequence_ids.max()) + 1)
    flat["sequence_ids"] = torch.where(sequence_ids >= 0, sequence_ids + offset, -1).reshape(1, -1)
    return flat, None, params
