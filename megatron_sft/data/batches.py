"""From data files to this rank's micro-batches of a training step.

Rows are read, tokenised (response-only loss), packed (or one per row) once at start-up, identically on
every rank; the :class:`ShardedSampler` then picks this data-parallel rank's rows for each step, which are
cut into micro-batches and collated. Under pipeline parallelism every micro-batch has the same length
(the p2p buffers are fixed-size); otherwise a micro-batch is as long as its longest row. Lengths are
rounded up to a multiple of the tensor-parallel size (sequence parallelism splits the sequence over TP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_sft.data.collate import collate
from megatron_sft.data.formatting import Formatter, TokenizeReport, tokenize_rows
from megatron_sft.data.packing import PackedRow, pack_examples, single_rows
from megatron_sft.data.sources import read_rows
from megatron_sft.config import Config, DataConfig


@dataclass
class TrainingRows:
    rows: list[PackedRow]
    report: TokenizeReport
    sequences: int  # examples (several per row when packed)
    tokens: int  # non-padding tokens
    target_tokens: int  # tokens trained on


def load_rows(paths: list[str], data: DataConfig, tokenizer: Any) -> TrainingRows:
    formatter = Formatter(tokenizer, data)

    def all_rows():
        for path in paths:
            yield from read_rows(path, bad_lines="yield")  # undecodable lines: skipped or reported per data.on_bad_row

    examples, report = tokenize_rows(all_rows(), formatter, on_bad_row=data.on_bad_row)
    rows = pack_examples(examples, data.max_length) if data.packing else single_rows(examples)
    return TrainingRows(
        rows=rows,
        report=report,
        sequences=len(examples),
        tokens=sum(len(e) for e in examples),
        target_tokens=sum(sum(e.target_mask) for e in examples),
    )


@dataclass
class BatchShape:
    micro_batch_size: int
    pad_id: int
    pad_to_multiple: int  # tensor-parallel size
    fixed_length: int | None  # set under pipeline and expert parallelism

    def collate(self, rows: list[PackedRow]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad_id, seq_length=self.fixed_length, pad_to_multiple=self.pad_to_multiple)

    def micro_batches(self, rows: list[PackedRow]) -> list[dict[str, torch.Tensor]]:
        size = self.micro_batch_size
        if len(rows) % size:
            raise ValueError(f"{len(rows)} rows per rank is not a multiple of the micro batch size {size}")
        return [self.collate(rows[i : i + size]) for i in range(0, len(rows), size)]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def batch_shape(cfg: Config, micro_batch_size: int, pad_id: int) -> BatchShape:
    """The micro-batch shape a run's layout needs: fixed length under pipeline parallelism, and under expert
    parallelism (megatron-core's allgather token dispatcher gathers equal token counts from every EP rank)."""
    par = cfg.parallel
    return BatchShape(micro_batch_size, pad_id, par.tensor,
                      round_up(cfg.data.max_length, par.tensor) if par.pipeline > 1 or par.expert > 1 else None)


def data_parallel_share(count: int, dp: int, dp_rank: int, multiple: int) -> tuple[list[int], int]:
    """Each of ``count`` items exactly once over the DP ranks: this rank's contiguous share of indices, filled
    up to a multiple of ``multiple`` with repeats (index modulo count), and how many of them are real (the
    repeats must carry no loss and no statistic)."""
    per_rank = round_up(-(-count // dp), multiple)
    first = dp_rank * per_rank
    return [i % count for i in range(first, first + per_rank)], max(0, min(per_rank, count - first))
