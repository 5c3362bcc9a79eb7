"""Packed rows -> the tensors a megatron-core GPT step consumes: tokens, labels, loss mask, positions.

``labels[i] = input_ids[i + 1]`` with ``loss_mask[i] = target_mask[i + 1]``, except across a sequence
boundary inside a packed row (a sequence never predicts the next one's first token) and on padding.
Rows are padded to a common length that is a multiple of ``pad_to_multiple`` (TP x SP needs the sequence
length divisible by the tensor-parallel size).
"""

from __future__ import annotations

import torch

from megatron_sft.data.packing import PackedRow

IGNORE_INDEX = -100


def collate(rows: list[PackedRow], pad_id: int, seq_length: int | None = None, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    longest = max(len(r) for r in rows)
    length = seq_length or longest
    if longest > length:
        raise ValueError(f"a packed row has {longest} tokens > seq_length {length}")
    length = -(-length // pad_to_multiple) * pad_to_multiple
    batch = len(rows)
    tokens = torch.full((batch, length), pad_id, dtype=torch.long)
    target = torch.zeros((batch, length), dtype=torch.long)
    positions = torch.zeros((batch, length), dtype=torch.long)
    sequence_ids = torch.full((batch, length), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        tokens[b, :n] = torch.tensor(row.input_ids)
        target[b, :n] = torch.tensor(row.target_mask)
        positions[b, :n] = torch.tensor(row.position_ids)
        sequence_ids[b, :n] = torch.tensor(row.sequence_ids)
    same_sequence = (sequence_ids[:, :-1] == sequence_ids[:, 1:]) & (sequence_ids[:, :-1] >= 0)
    loss_mask = torch.zeros((batch, length), dtype=torch.float32)
    loss_mask[:, :-1] = (target[:, 1:].bool() & same_sequence).float()
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    labels[:, :-1] = torch.where(loss_mask[:, :-1].bool(), tokens[:, 1:], IGNORE_INDEX)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions, "sequence_ids": sequence_ids}
