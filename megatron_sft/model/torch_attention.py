"""megatron-core core-attention modules on torch's fused kernels (``torch``) and on flash-attn (``flash``).

Drop-in for megatron-core's local ``DotProductAttention`` (same constructor and forward, [s, b, h, d] in,
[s, b, h*d] out; THD: [t, h, d] in): the local spec's linear layers, TP head split and SP stay as they are;
only the scores -> softmax -> context step runs in one fused kernel instead of an explicit [s, s] matrix.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_sft.config import ConfigError


@functools.cache
def _varlen_attn():
    """torch's variable-length flash kernel (torch >= 2.10), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _sdpa_has_gqa() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (torch >= 2.5): K/V heads shared without repeating them."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


@functools.cache
def _log_path_once(backend: str, path: str) -> None:
    """Say once per process (rank 0 prints) which kernel packed or unpacked rows actually run on."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"attention backend {backend}: {path}", flush=True)


def _repeat_kv(key: torch.Tensor, value: torch.Tensor, groups: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    return key.repeat_interleave(groups, dim=dim), value.repeat_interleave(groups, dim=dim)


def _segment_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[1, 1, t, t] bool, True where attention is allowed: causal within each THD segment."""
    positions = torch.arange(total, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens.to(positions.dtype)[1:], positions, right=True)
    allowed = (segment[:, None] == segment[None, :]) & (positions[None, :] <= positions[:, None])
    return allowed[None, None]


class _CoreAttentionBase(MegatronModule):
    """The interface of megatron-core's ``DotProductAttention``: [s, b, h, d] in, [s, b, h*d] out (THD: [t, h, d]
    in, [t, h*d] out), the heads of this TP rank, softmax scale and attention dropout as it computes them."""

    backend = ""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None) -> None:
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.utils import is_layer_window_attention

        super().__init__(config=config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        unsupported = {"context_parallel_size > 1": config.context_parallel_size != 1,
                       f"softmax_type {config.softmax_type}": config.softmax_type != "vanilla",
                       "window attention": is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number),
                       f"attn_mask_type {attn_mask_type.name}": attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask)}
        for what, present in unsupported.items():
            if present:
                raise ConfigError(f"model.attention_backend={self.backend} does not support {what}; set "
                                  "model.attention_backend=local (or te)")
        head_dim = config.kv_channels
        # DotProductAttention divides the scale by layer_number under query-key layer scaling and multiplies the
        # scores back in its softmax: the net scale is this one
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _dropout(self) -> float:
        return self.dropout_p if self.training else 0.0

    def _rng_fork(self):
        """DotProductAttention draws attention dropout from the model-parallel RNG stream unless SP is on."""
        import contextlib

        from megatron.core import tensor_parallel

        if self._dropout() > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        return {}  # no parameters (vanilla softmax only)


class TorchSDPAttention(_CoreAttentionBase):
    """Core attention on torch's fused kernels: SDPA (causal without a mask, or the packed block mask) and
    ``varlen_attn`` for THD packed rows on CUDA."""

    backend = "torch"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        if attention_bias is not None:
            raise ConfigError("model.attention_backend=torch does not take an attention bias; use local")
        with self._rng_fork():
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                return self._thd(query, key, value, packed_seq_params)
            return self._sbhd(query, key, value, attention_mask, attn_mask_type)

    def _sbhd(self, query, key, value, attention_mask, attn_mask_type) -> torch.Tensor:
        from megatron.core.transformer.enums import AttnMaskType

        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        if attention_mask is not None:
            _log_path_once("torch", "SDPA with the block-causal mask (packed rows)")
            mask = ~attention_mask  # megatron: True = masked; SDPA: True = attend
            out = self._sdpa(q, k, v, attn_mask=mask, is_causal=False)
        else:
            mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
            causal = mask_type == AttnMaskType.causal and s > 1
            _log_path_once("torch", "SDPA, causal without a mask (unpacked rows)")
            out = self._sdpa(q, k, v, attn_mask=None, is_causal=causal)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _sdpa(self, q, k, v, attn_mask, is_causal: bool) -> torch.Tensor:
        groups = q.size(1) // k.size(1)
        extra = {}
        if groups > 1 and _sdpa_has_gqa():
            extra["enable_gqa"] = True
        elif groups > 1:
            k, v = _repeat_kv(k, v, groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self._dropout(),
                                              is_causal=is_causal, scale=self.softmax_scale, **extra)

    def _thd(self, query, key, value, params) -> torch.Tensor:
        """[t, h, d] packed rows: varlen_attn on CUDA in bf16/fp16, else SDPA with a mask from cu_seqlens."""
        varlen = _varlen_attn()
        if varlen is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and not self._dropout():
            _log_path_once("torch", "varlen_attn with cu_seqlens (packed rows)")
            return self._varlen(varlen, query, key, value, params)
        _log_path_once("torch", "SDPA with a mask built from cu_seqlens (packed rows; varlen_attn unavailable here)")
        t = query.size(0)
        mask = _segment_mask(params.cu_seqlens_q, t)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, h, t, d]
        out = self._sdpa(q, k, v, attn_mask=mask, is_causal=False)
        return out.squeeze(0).transpose(0, 1).reshape(t, -1)

    def _varlen(self, varlen, query, key, value, params) -> torch.Tensor:
        accepted = inspect.signature(varlen).parameters
        groups = query.size(1) // key.size(1)
        extra: dict = {"scale": self.softmax_scale}
        extra.update({"is_causal": True} if "is_causal" in accepted else {"window_size": (-1, 0)})
        if groups > 1 and "enable_gqa" in accepted:
            extra["enable_gqa"] = True
        elif groups > 1:
            key, value = _repeat_kv(key, value, groups, dim=1)
        cu_q, cu_k = params.cu_seqlens_q.to(torch.int32), params.cu_seqlens_kv.to(torch.int32)
        out = varlen(query, key, value, cu_q, cu_k, int(params.max_seqlen_q), int(params.max_seqlen_kv), **extra)
        return out.reshape(query.size(0), -1)


class FlashAttention(TorchSDPAttention):
    """Core attention on flash-attn's kernels (``flash_attn_func``, ``flash_attn_varlen_func`` for THD packed
    rows); a block mask, which flash-attn cannot take, goes to torch's SDPA."""

    backend = "flash"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None, attention_bias=None,
                packed_seq_params=None) -> torch.Tensor:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
        from megatron.core.transformer.enums import AttnMaskType

        if attention_bias is not None:
            raise ConfigError("model.attention_backend=flash does not take an attention bias; use local")
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        with self._rng_fork():
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                p = packed_seq_params
                out = flash_attn_varlen_func(
                    query, key, value, p.cu_seqlens_q.to(torch.int32), p.cu_seqlens_kv.to(torch.int32),
                    int(p.max_seqlen_q), int(p.max_seqlen_kv), dropout_p=self._dropout(),
                    softmax_scale=self.softmax_scale, causal=causal)
                return out.reshape(query.size(0), -1)
            if attention_mask is not None:
                _log_path_once("flash", "SDPA with the block-causal mask (a mask, not cu_seqlens, was given)")
                return self._sbhd(query, key, value, attention_mask, attn_mask_type)
            s, b = query.shape[:2]
            q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, d]
            out = flash_attn_func(q, k, v, dropout_p=self._dropout(), softmax_scale=self.softmax_scale, causal=causal)
            return out.transpose(0, 1).reshape(s, b, -1)
