"""Packed-sequence attention inputs on CPU: the block-causal mask (local spec) and the THD parameters that
Transformer Engine gets on GPU, checked against attention patterns built independently by brute force."""

from __future__ import annotations

import torch

from megatron_sft.model.attention import (
    attention_inputs,
    block_causal_mask,
    thd_packed_seq_params,
)

# two rows: [seq 0 (2), seq 1 (2), padding (1)] and [seq 0 (3), seq 1 (2)]
SEQUENCE_IDS = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, 1, 1]])


def _allowed_by_brute_force(ids: list[int]) -> torch.Tensor:
    """[s, s] True where query i may see key j: same sequence and j <= i; padding sees itself only."""
    s = len(ids)
    return torch.tensor([[(ids[i] == ids[j] and j <= i and ids[i] >= 0) or i == j for j in range(s)] for i in range(s)])


def _allowed_by_segments(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    """[n, n] causal attention within each THD segment [cu[k], cu[k+1])."""
    segment = torch.zeros(n, dtype=torch.long)
    for k in range(len(cu_seqlens) - 1):
        segment[int(cu_seqlens[k]):int(cu_seqlens[k + 1])] = k
    return (segment[:, None] == segment[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()


def test_block_causal_mask_is_per_sequence_causal():
    mask = block_causal_mask(SEQUENCE_IDS)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    for b, ids in enumerate(SEQUENCE_IDS.tolist()):
        assert torch.equal(~mask[b, 0], _allowed_by_brute_force(ids)), b


def test_thd_segments_give_the_same_attention_as_the_mask():
    """THD flattens the micro-batch to one row; its segments must allow exactly what the mask allows,
    row by row, and nothing across rows (padding is a segment of its own)."""
    params = thd_packed_seq_params(SEQUENCE_IDS)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == [0, 2, 4, 5, 8, 10]
    assert torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv) and params.max_seqlen_q == params.max_seqlen_kv == 3
    allowed = _allowed_by_segments(params.cu_seqlens_q, SEQUENCE_IDS.numel())
    expected = torch.block_diag(*[_allowed_by_brute_force(ids) for ids in SEQUENCE_IDS.tolist()])
    assert torch.equal(allowed, expected)


def test_attention_inputs_thd_flattens_and_keeps_sequences_apart():
    """Every tensor becomes one [1, b*s] row; sequence ids stay distinct across the original rows (the
    sequence_mean reduction counts per id), padding stays -1."""
    batch = {"tokens": torch.arange(10).reshape(2, 5), "sequence_ids": SEQUENCE_IDS.clone()}
    flat, mask, params = attention_inputs(batch, use_thd=True)
    assert mask is None and params is not None
    assert torch.equal(flat["tokens"], torch.arange(10).reshape(1, 10))
    assert flat["sequence_ids"].tolist() == [[0, 0, 1, 1, -1, 2, 2, 2, 3, 3]]
    local, local_mask, none = attention_inputs(batch, use_thd=False)
    assert none is None and local is batch and torch.equal(local_mask, block_causal_mask(SEQUENCE_IDS))
    unpacked = {"tokens": batch["tokens"], "sequence_ids": torch.tensor([[0] * 5, [0] * 4 + [-1]])}
    assert attention_inputs(unpacked, use_thd=False)[1] is None  # one sequence per row: the plain causal mask
