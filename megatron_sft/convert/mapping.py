"""Tensor-by-tensor mapping between HF Qwen2/Llama weights and megatron-core GPTModel weights (TP=1 layout).

Both directions are generators over (name, tensor) so a converter holds one layer's tensors at a time.
megatron layouts: fused QKV grouped per KV head ([q of the group's heads; k; v] for each group), gate and up
projections fused into linear_fc1 as [gate; up], vocabulary rows padded to a TP multiple.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

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


def hf_to_mcore(args: ModelArgs, get: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield megatron (name, tensor) pairs; ``get(hf_name)`` loads one HF tensor."""
    yield "embedding.word_embeddings.weight", _pad_rows(get("model.embed_tokens.weight"), args.padded_vocab_size)
    for i in range(args.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield mc + "input_layernorm.weight", get(hf + "input_layernorm.weight")
        attn = hf + "self_attn."
        yield mc + "self_attention.linear_qkv.weight", _fuse_qkv(
            args, get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight")
        )
        if args.qkv_bias:
            yield mc + "self_attention.linear_qkv.bias", _fuse_qkv(
                args, get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias")
            )
        yield mc + "self_attention.linear_proj.weight", get(attn + "o_proj.weight")
        yield mc + "pre_mlp_layernorm.weight", get(hf + "post_attention_layernorm.weight")
        yield mc + "mlp.linear_fc1.weight", torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
        yield mc + "mlp.linear_fc2.weight", get(hf + "mlp.down_proj.weight")
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not args.tie_word_embeddings:
        yield "output_layer.weight", _pad_rows(get("lm_head.weight"), args.padded_vocab_size)


def mcore_to_hf(args: ModelArgs, get: Callable[[str], Tensor]) -> Iterator[tuple[str, Tensor]]:
    """Yield HF (name, tensor) pairs, vocabulary padding stripped; ``get(mcore_name)`` loads one tensor."""
    vocab = args.vocab_size
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")[:vocab]
    for i in range(args.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        yield hf + "input_layernorm.weight", get(mc + "input_layernorm.weight")
        attn = hf + "self_attn."
        q, k, v = _split_qkv(args, get(mc + "self_attention.linear_qkv.weight"))
        yield attn + "q_proj.weight", q
        yield attn + "k_proj.weight", k
        yield attn + "v_proj.weight", v
        if args.qkv_bias:
            qb, kb, vb = _split_qkv(args, get(mc + "self_attention.linear_qkv.bias"))
            yield attn + "q_proj.bias", qb
            yield attn + "k_proj.bias", kb
            yield attn + "v_proj.bias", vb
        yield attn + "o_proj.weight", get(mc + "self_attention.linear_proj.weight")
        yield hf + "post_attention_layernorm.weight", get(mc + "pre_mlp_layernorm.weight")
        gate, up = torch.chunk(get(mc + "mlp.linear_fc1.weight"), 2, dim=0)
        yield hf + "mlp.gate_proj.weight", gate
        yield hf + "mlp.up_proj.weight", up
        yield hf + "mlp.down_proj.weight", get(mc + "mlp.linear_fc2.weight")
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not args.tie_word_embeddings:
        yield "lm_head.weight", get("output_layer.weight")[:vocab]


def expected_hf_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape (to refuse checkpoints that disagree)."""
    h, d, ffn, v = args.hidden_size, args.kv_channels, args.ffn_hidden_size, args.vocab_size
    q_rows, kv_rows = args.num_attention_heads * d, args.num_query_groups * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(args.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_rows, h), p + "self_attn.k_proj.weight": (kv_rows, h),
            p + "self_attn.v_proj.weight": (kv_rows, h), p + "self_attn.o_proj.weight": (h, q_rows),
            p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h), p + "mlp.down_proj.weight": (h, ffn),
        })
        if args.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_rows,), p + "self_attn.k_proj.bias": (kv_rows,),
                           p + "self_attn.v_proj.bias": (kv_rows,)})
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes
