"""Tensor-by-tensor mapping between HF and megatron-core GPTModel weights (TP=1 layout), driven by the
architecture table's one tensor-name table (:data:`megatron_sft.model.architectures.DENSE_TENSORS`).

Both directions are generators over (name, tensor) so a converter holds one layer's tensors at a time.
megatron layouts: fused QKV grouped per KV head ([q of the group's heads; k; v] for each group), gate and up
projections fused into linear_fc1 as [gate; up], vocabulary rows padded to a TP multiple.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from megatron_sft.model.architectures import expected_hf_shapes, named, tensor_rules
from megatron_sft.model.args import ModelArgs

Tensor = torch.Tensor


def _fuse_qkv(args: ModelArgs, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    groups, d = args.num_query_groups, args.kv_channels
    per_group = args.num_attention_heads // groups
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * d, *tail)
    k = k.reshape(groups, d, *tail)
    v = v.reshape(groups, d, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def _split_qkv(args: ModelArgs, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    groups, d = args.num_query_groups, args.kv_channels
    per_group = args.num_attention_heads // groups
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _fuse(args: ModelArgs, kind: str, parts: list[Tensor]) -> Tensor:
    """The megatron tensor of one rule from its HF tensors."""
    if kind == "qkv":
        return _fuse_qkv(args, *parts)
    if kind == "gate_up":
        return torch.cat(parts)
    if kind == "vocab":
        return _pad_rows(parts[0], args.padded_vocab_size)
    return parts[0]


def _split(args: ModelArgs, kind: str, tensor: Tensor) -> tuple[Tensor, ...]:
    """The HF tensors of one rule from its megatron tensor (inverse of :func:`_fuse`)."""
    if kind == "qkv":
        return _split_qkv(args, tensor)
    if kind == "gate_up":
        return tuple(torch.chunk(tensor, 2, dim=0))
    if kind == "vocab":
        return (tensor[: args.vocab_size],)
    return (tensor,)


def hf_to_mcore(args: ModelArgs, get: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield megatron (name, tensor) pairs; ``get(hf_name)`` loads one HF tensor."""
    for rule, layer in tensor_rules(args):
        yield named(rule.mcore, layer), _fuse(args, rule.fuse, [get(named(n, layer)) for n in rule.hf])


def mcore_to_hf(args: ModelArgs, get: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield HF (name, tensor) pairs, vocabulary padding stripped; ``get(mcore_name)`` loads one tensor."""
    for rule, layer in tensor_rules(args):
        parts = _split(args, rule.fuse, get(named(rule.mcore, layer)))
        yield from ((named(n, layer), t) for n, t in zip(rule.hf, parts))


__all__ = ["hf_to_mcore", "mcore_to_hf", "expected_hf_shapes"]
