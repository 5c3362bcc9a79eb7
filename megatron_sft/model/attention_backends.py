"""Attention backends (``model.attention_backend``): which kernel computes core attention.

``te``: Transformer Engine's layer spec. ``local``: megatron-core's local spec as it is (an explicit [s, s]
score matrix and mask). ``torch``: the local spec with core attention on
``torch.nn.functional.scaled_dot_product_attention`` (fused kernels from the plain torch wheel), and on CUDA
``torch.nn.attention.varlen.varlen_attn`` for packed rows, so no [s, s] mask exists there. ``flash``: the
local spec with flash-attn's kernels. ``auto``: te, else flash, else torch, by what imports on this machine.

Every backend honours the packed rows' boundaries (model/attention.py): a block-causal mask
``[b, 1, s, s]`` (True = masked), or THD ``PackedSeqParams`` whose ``cu_seqlens`` delimit the sequences.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from megatron_sft.config import ConfigError

BACKENDS = ("auto", "te", "flash", "torch", "local")


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def flash_attn_available() -> bool:
    """CUDA and a flash-attn that imports (a wheel built for another torch is found but fails to import)."""
    return torch.cuda.is_available() and _imports("flash_attn")


@functools.cache
def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a binary built against another torch / CUDA
        return False
    return True


def resolve_attention_backend(name: str) -> str:
    """The concrete backend for ``name`` on this machine; one-line ConfigError when it cannot run here."""
    if name not in BACKENDS:
        raise ConfigError(f"model.attention_backend={name!r} is not one of {' | '.join(BACKENDS)}")
    if name == "auto":
        return "te" if transformer_engine_available() else "flash" if flash_attn_available() else "torch"
    if name == "te" and not transformer_engine_available():
        raise ConfigError("model.attention_backend=te needs CUDA and Transformer Engine: pip install 'megatron-sft[gpu]' "
                          "(transformer-engine[pytorch]) on a GPU machine, or set model.attention_backend=torch")
    if name == "flash" and not flash_attn_available():
        raise ConfigError("model.attention_backend=flash needs CUDA and flash-attn: pip install flash-attn "
                          "--no-build-isolation on a GPU machine, or set model.attention_backend=torch")
    return name


def packs_as_thd(backend: str) -> bool:
    """Whether packed rows reach this backend as THD ``PackedSeqParams`` (one flattened row, cu_seqlens)
    rather than a block-diagonal mask: the variable-length kernels need the former, masked SDPA the latter."""
    return backend in ("te", "flash") or (backend == "torch" and torch.cuda.is_available() and varlen_attn_available())


def core_attention_module(backend: str):
    """The core-attention class that replaces megatron-core's ``DotProductAttention`` (None: keep the spec's)."""
    if backend not in ("torch", "flash"):
        return None
    from megatron_sft.model.torch_attention import FlashAttention, TorchSDPAttention

    return TorchSDPAttention if backend == "torch" else FlashAttention


def varlen_attn_available() -> bool:
    """torch's variable-length flash kernel, ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None
