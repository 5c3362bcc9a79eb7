"""Sequence packing: several examples per row of max_length tokens, each attending only to itself.

A packed row carries ``sequence_ids`` (which example each token belongs to) and ``position_ids`` that restart
at 0 for every example; the model uses them for per-sequence attention boundaries (no cross-contamination)
and the loss for per-sequence reductions.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from megatron_sft.data.formatting import Example


@dataclass
class PackedRow:
    input_ids: list[int]
    target_mask: list[int]
    position_ids: list[int]
    sequence_ids: list[int]  # 0, 1, ... per example in the row
    sources: list[str]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_examples(examples: list[Example], max_length: int) -> list[PackedRow]:
    """Best-fit packing in input order (deterministic); every example lands in exactly one row."""
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # sorted (free space, row index)
    for example in examples:
        if len(example) > max_length:
            raise ValueError(f"{example.where}: {len(example)} tokens > max_length {max_length}; format with the same max_length")
        slot = bisect.bisect_left(free, (len(example), -1))
        if slot < len(free):
            space, index = free.pop(slot)
            rows[index].append(example)
        else:
            index, space = len(rows), max_length
            rows.append([example])
        bisect.insort(free, (space - len(example), index))
    return [_join(row) for row in rows]


def single_rows(examples: list[Example]) -> list[PackedRow]:
    """One example per row (packing disabled)."""
    return [_join([example]) for example in examples]


def _join(parts: list[Example]) -> PackedRow:
    row = PackedRow([], [], [], [], [])
    for seq, example in enumerate(parts):
        row.input_ids += example.input_ids
        row.target_mask += example.target_mask
        row.position_ids += list(range(len(example)))
        row.sequence_ids += [seq] * len(example)
        row.sources.append(example.where)
    return row
