"""Build a megatron-core GPTModel from :class:`ModelArgs` for any TP/PP layout.

The attention backend (``model.attention_backend``, model/attention_backends.py) picks the layer spec:
Transformer Engine's, or megatron-core's local (pure torch) spec with its core attention replaced by torch's
SDPA / flash-attn or kept; on CPU it applies the flags megatron-core needs without CUDA kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_sft.cpu_shims import cpu_transformer_config_overrides, define_missing_transformer_engine_names
from megatron_sft.model.args import ModelArgs
from megatron_sft.model.attention_backends import (  # noqa: F401  (transformer_engine_available: re-exported)
    core_attention_module,
    resolve_attention_backend,
    transformer_engine_available,
)


def build_transformer_config(
    args: ModelArgs,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    sequence_parallel: bool = False,
    params_dtype: Optional[torch.dtype] = None,
    recompute_granularity: Optional[str] = None,
    perform_initialization: bool = True,
    cpu_initialization: bool = False,
    expert_parallel: int = 1,
    moe_aux_loss_coeff: float = 0.0,
    moe_capacity_factor: Optional[float] = None,
    fusions: Optional[dict[str, bool]] = None,
):
    """TransformerConfig for ``args``.

    ``perform_initialization=False`` skips random init before a load; ``cpu_initialization`` keeps the
    weights in host memory even on a GPU machine (conversion). A mixture of experts is split over
    ``expert_parallel`` ranks and always runs with sequence parallelism at TP > 1 (megatron-core's MoELayer
    refuses to train without it); ``moe_aux_loss_coeff`` and ``moe_capacity_factor`` as in :func:`moe_settings`.
    ``fusions``: TransformerConfig fusion flags (model/fusions.py; all off when not given, and always on CPU).
    """
    from megatron.core.transformer import TransformerConfig

    args.check_tensor_parallel(tensor_parallel)
    args.check_expert_parallel(expert_parallel)
    sequence_parallel = sequence_parallel or args.is_moe
    on_gpu = torch.cuda.is_available()
    dtype = params_dtype or (torch.bfloat16 if on_gpu else torch.float32)
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=args.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=args.qkv_bias,
        qk_layernorm=args.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        recompute_granularity=recompute_granularity,
        recompute_method="uniform" if recompute_granularity == "full" else None,
        recompute_num_layers=1 if recompute_granularity == "full" else None,
        perform_initialization=perform_initialization,
        expert_model_parallel_size=expert_parallel,
        **moe_settings(args, moe_aux_loss_coeff, moe_capacity_factor),
        **(fusions or {}),
    )
    if not on_gpu:
        kwargs.update(cpu_transformer_config_overrides())
        kwargs["params_dtype"] = dtype
    elif cpu_initialization:
        kwargs["use_cpu_initialization"] = True
    return TransformerConfig(**kwargs)


def moe_settings(args: ModelArgs, aux_loss_coeff: float = 0.0, capacity_factor: Optional[float] = None) -> dict:
    """megatron-core's MoE settings that reproduce HF's Qwen3-MoE block exactly (empty for a dense model).

    HF routes with softmax over all experts, top-k, then (``norm_topk_prob``) divides by the top-k sum. That is
    megatron-core's top-k on the logits then softmax over the k (``moe_router_pre_softmax`` False: exp(l_i) /
    sum_topk exp(l_j) is the same ratio); without renormalising it is softmax then top-k (pre-softmax, no
    scaling factor). No capacity factor: no token is dropped, as in HF. The allgather dispatcher runs on gloo
    (the alltoall one creates CUDA streams); SequentialMLP runs anywhere (grouped GEMM needs CUDA kernels). The
    load-balancing loss is on only with a coefficient > 0 (megatron's ``aux_loss``, per micro-batch)."""
    if not args.is_moe:
        return {}
    define_missing_transformer_engine_names()
    return dict(
        num_moe_experts=args.num_moe_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_router_score_function="softmax",
        moe_router_pre_softmax=not args.moe_norm_topk_prob, moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="aux_loss" if aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coeff, moe_expert_capacity_factor=capacity_factor,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
    )


def build_gpt_model(
    args: ModelArgs,
    config,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_transformer_engine: Optional[bool] = None,
    attention_backend: str = "auto",
):
    """``attention_backend``: auto | te | flash | torch | local; ``use_transformer_engine`` (older callers)
    True/False means te/local. The resolved backend is kept as ``model.attention_backend``."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    if use_transformer_engine is not None:
        attention_backend = "te" if use_transformer_engine else "local"
    backend = resolve_attention_backend(attention_backend)
    if backend == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                                           qk_layernorm=config.qk_layernorm)
    else:
        spec = _local_block_spec(config, vp_stage, core_attention_module(backend))
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=args.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(args.rope_theta) if float(args.rope_theta).is_integer() else args.rope_theta,
        vp_stage=vp_stage,
    )
    inv_freq = args.rope_inv_freq()
    if inv_freq is not None:  # llama3 / linear rope scaling: use HF's exact frequencies
        model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq)
    model.attention_backend = backend  # how the batches' packed rows must reach it (attention_backends.packs_as_thd)
    return model


class SequenceParallelTorchNorm:
    """megatron-core's torch RMSNorm for the local spec, usable under sequence parallelism.

    ``WrappedTorchNorm`` refuses ``sequence_parallel=True`` although a norm is per token: under SP each
    rank normalises its own slice of the sequence. Its weight then gets a partial gradient on every TP
    rank, so it is tagged ``sequence_parallel`` for ``finalize_model_grads`` to all-reduce over TP (what
    the TE and Apex norms do). ``torch.nn.RMSNorm`` creates its weight in the default dtype (fp32); it is
    cast to ``config.params_dtype`` like every other parameter, so that a bf16 checkpoint converts and exports
    with bf16 norms (bit-exact round trip) instead of upcasting them.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        import copy

        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs).to(dtype=config.params_dtype)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _local_block_spec(config, vp_stage: Optional[int], core_attention=None):
    """The local (pure torch) layer spec for this stage's layers, with norms that work under SP and, when given,
    another core-attention module in place of ``DotProductAttention``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False,
                                     normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    layer.submodules.input_layernorm = SequenceParallelTorchNorm
    layer.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    if config.qk_layernorm:  # Qwen3's per-head q/k RMSNorm; finalize_model_grads sums its grads over TP
        layer.submodules.self_attention.submodules.q_layernorm = SequenceParallelTorchNorm
        layer.submodules.self_attention.submodules.k_layernorm = SequenceParallelTorchNorm
    if core_attention is not None:
        layer.submodules.self_attention.submodules.core_attention = core_attention
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=SequenceParallelTorchNorm)
