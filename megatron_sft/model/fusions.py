"""Which of megatron-core's kernel fusions a run uses: ``model.swiglu_fusion``, ``model.rope_fusion`` and
``model.masked_softmax_fusion``.

Why: megatron-core leaves every fusion off by default, and some need kernels that only Transformer Engine or
Apex provide: turned on blindly they fail at the first step; left off they cost speed and, for SwiGLU,
activation memory (the fused SwiGLU keeps its input only: 3f instead of 5f values per token, see
memory/model.py). Each key: null = on wherever it runs (CUDA and its kernel importable), true = on or a
one-line error naming what is missing, false = off. Without CUDA all are off (cpu_shims.py).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

# config key (ModelConfig) -> megatron-core TransformerConfig field
FUSIONS = {"swiglu_fusion": "bias_activation_fusion", "rope_fusion": "apply_rope_fusion",
           "masked_softmax_fusion": "masked_softmax_fusion"}


def _te_rope_available() -> bool:
    try:
        from megatron.core.models.common.embeddings.rope_utils import fused_apply_rotary_pos_emb
    except ImportError:
        return False
    return fused_apply_rotary_pos_emb is not None


def missing_for(key: str, backend: str) -> Optional[str]:
    """What the fusion ``key`` lacks on this machine with this attention backend (None: it can run)."""
    if not torch.cuda.is_available():
        return "CUDA"
    if key == "rope_fusion" and not _te_rope_available():
        return "Transformer Engine (its fused RoPE kernel)"
    if key == "masked_softmax_fusion":
        if backend != "local":
            return "model.attention_backend=local (the other backends do not use megatron-core's softmax)"
        if importlib.util.find_spec("scaled_masked_softmax_cuda") is None:
            return "megatron-core's fused softmax kernels (scaled_masked_softmax_cuda, built with Apex)"
    return None  # swiglu_fusion: megatron-core's own torch.jit kernel, CUDA only


def resolve_fusions(model_config: Any, backend: str) -> dict[str, bool]:
    """TransformerConfig fields for the configured fusions; ConfigError when one set to true cannot run."""
    from megatron_sft.config import ConfigError

    fields = {}
    for key, field in FUSIONS.items():
        wanted, missing = getattr(model_config, key), missing_for(key, backend)
        if wanted and missing:
            raise ConfigError(f"model.{key}=true needs {missing}; set model.{key}=null (on wherever it runs) or false")
        fields[field] = missing is None if wanted is None else bool(wanted)
    return fields
