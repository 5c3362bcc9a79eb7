"""The model arguments a megatron checkpoint needs to be rebuilt, derived from an HF config.

Saved next to a converted checkpoint (``model_args.json``) so that training needs only the checkpoint
path and the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_sft.model.architectures import (
    ROPE_TYPES, Architecture, UnsupportedModelError, architecture_of, supported_architectures,
)

SUPPORTED_ARCHITECTURES = supported_architectures()
SUPPORTED_ROPE_TYPES = ROPE_TYPES
VOCAB_PAD_MULTIPLE = 128
__all__ = ["ModelArgs", "UnsupportedModelError", "SUPPORTED_ARCHITECTURES", "VOCAB_PAD_MULTIPLE"]


def _refuse_sliding_window(config: Any, always_on: bool = False) -> None:
    """Sliding-window attention (Qwen2 ``use_sliding_window``, ``layer_types`` with sliding layers, Mistral's
    ``sliding_window``, which HF applies on every layer whenever it is set) is not built: megatron attends to the
    whole causal context, so logits beyond the window would silently differ."""
    window = getattr(config, "sliding_window", None)
    positions = getattr(config, "max_position_embeddings", None)
    if window is None or (positions is not None and window >= positions):
        return  # a window that covers every position never binds
    sliding = [i for i, t in enumerate(getattr(config, "layer_types", None) or []) if t == "sliding_attention"]
    if always_on:
        raise UnsupportedModelError(
            f"sliding-window attention (sliding_window={window} < {positions} positions, on every layer) is not "
            "supported: megatron-sft attends to the full causal context, so the converted model would differ from HF "
            "beyond the window (Mistral-7B-v0.1 has one; v0.2/v0.3 do not); set sliding_window to null in "
            "config.json only if the model was trained without it"
        )
    if sliding or getattr(config, "use_sliding_window", False):
        where = f"layers {sliding}" if sliding else "use_sliding_window=true"
        raise UnsupportedModelError(
            f"sliding-window attention ({where}, window {window} < {positions} positions) is not supported: "
            "megatron-sft attends to the full causal context, so the converted model would differ from HF beyond "
            "the window; set use_sliding_window=false in config.json only if the model was trained without it"
        )


def _rope_parameters(config: Any, arch: Architecture) -> tuple[float, dict[str, Any]]:
    """(theta, HF rope_parameters with rope_type and rope_theta) from either spelling; refuses other kinds."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in arch.rope_types:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported; supported: {arch.rope_types}")
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    return theta, {**rope, "rope_type": rope_type, "rope_theta": theta}


def _head_dim(config: Any, arch: Architecture) -> int:
    """kv_channels: the config's head_dim; must be hidden/heads unless the architecture decouples them."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim * heads != config.hidden_size and not arch.decoupled_head_dim:
        raise UnsupportedModelError(f"head_dim {head_dim} x {heads} heads != hidden_size {config.hidden_size}")
    return head_dim


def _refuse_unmapped(config: Any, arch: Architecture) -> None:
    """Settings the tensor table or the layer spec do not cover."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
    if getattr(config, "mlp_bias", False):
        raise UnsupportedModelError("mlp_bias=True is not supported")
    if not arch.qkv_bias and getattr(config, "attention_bias", False):
        raise UnsupportedModelError(f"attention_bias=True is not supported for {arch.hf_class} (it adds o_proj biases)")
    _refuse_sliding_window(config, arch.sliding_window_always_on)


def _moe_settings(config: Any, arch: Architecture) -> dict[str, Any]:
    """The ModelArgs MoE fields of a Qwen3-MoE config: every layer sparse (``decoder_sparse_step`` 1, no
    ``mlp_only_layers``), as in every released Qwen3-MoE; the dense-layer mixes are refused, not mapped."""
    if not arch.moe:
        return {}
    dense = list(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", 1)
    if dense or step != 1:
        raise UnsupportedModelError(
            f"{arch.hf_class} with dense MLP layers (mlp_only_layers={dense}, decoder_sparse_step={step}) is not "
            "supported: megatron-sft builds every layer as a mixture of experts (mlp_only_layers [] and "
            "decoder_sparse_step 1, as in Qwen3-30B-A3B)")
    return dict(num_moe_experts=config.num_experts, moe_router_topk=config.num_experts_per_tok,
                moe_ffn_hidden_size=config.moe_intermediate_size, moe_norm_topk_prob=bool(config.norm_topk_prob),
                moe_aux_loss_coeff=float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0))


@dataclass
class ModelArgs:
    architecture: str  # HF class name, e.g. Qwen2ForCausalLM
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_theta: float
    rope_parameters: dict[str, Any] = field(default_factory=dict)  # HF rope_parameters (type, factors)
    padded_vocab_size: int = 0  # fixed at conversion (multiple of 128) so a checkpoint reshards to any TP
    torch_dtype: str = "bfloat16"
    hf_config: dict[str, Any] = field(default_factory=dict)  # the full HF config, written back on export
    qk_layernorm: bool = False  # Qwen3's q_norm/k_norm (RMSNorm per head); absent from older model_args.json
    # mixture of experts (Qwen3-MoE; 0 experts: dense): experts per layer, experts per token, each expert's FFN
    # width, whether the top-k probabilities are renormalised to sum to 1, and HF's router_aux_loss_coef
    num_moe_experts: int = 0
    moe_router_topk: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = False
    moe_aux_loss_coeff: float = 0.0

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelArgs":
        arch = architecture_of(config)
        theta, rope = _rope_parameters(config, arch)
        _refuse_unmapped(config, arch)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16"
        return cls(
            architecture=arch.hf_class,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            kv_channels=_head_dim(config, arch),
            max_position_embeddings=config.max_position_embeddings,
            norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=arch.qkv_bias,
            qk_layernorm=arch.qk_norm,
            rope_theta=theta,
            rope_parameters=rope,
            padded_vocab_size=-(-config.vocab_size // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE,
            torch_dtype=str(dtype).replace("torch.", ""),
            hf_config=config.to_dict(),
            **_moe_settings(config, arch),
        )

    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts > 0

    def check_expert_parallel(self, expert_parallel: int) -> None:
        """``parallel.expert`` must split this model's experts evenly (1 for a dense model)."""
        if expert_parallel == 1:
            return
        if not self.is_moe:
            raise ValueError(f"parallel.expert={expert_parallel} needs a mixture-of-experts model; "
                             f"{self.architecture} is dense: set parallel.expert=1")
        if self.num_moe_experts % expert_parallel:
            raise ValueError(f"parallel.expert={expert_parallel} does not divide the {self.num_moe_experts} experts of "
                             f"this model; choose a divisor of {self.num_moe_experts}")

    def check_tensor_parallel(self, tensor_parallel: int) -> None:
        for what, count in (("attention heads", self.num_attention_heads), ("KV heads", self.num_query_groups)):
            if count % tensor_parallel:
                raise ValueError(
                    f"tensor_parallel={tensor_parallel} does not divide the {count} {what} of this model; "
                    f"choose a divisor of {count}"
                )
        if self.padded_vocab_size % tensor_parallel:
            raise ValueError(
                f"tensor_parallel={tensor_parallel} does not divide the padded vocabulary {self.padded_vocab_size}"
            )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "ModelArgs":
        return cls(**json.loads(Path(path).read_text()))

    def hf_config_object(self) -> Any:
        from transformers import AutoConfig

        config = dict(self.hf_config)
        return AutoConfig.for_model(config.pop("model_type"), **config)

    def rope_inv_freq(self) -> Optional["torch.Tensor"]:  # noqa: F821
        """HF's inverse frequencies when rope is scaled (llama3/linear), else None (plain theta)."""
        if self.rope_parameters.get("rope_type", "default") == "default":
            return None
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_parameters["rope_type"]](self.hf_config_object(), "cpu")
        if attention_scaling != 1.0:
            raise UnsupportedModelError(f"rope attention scaling {attention_scaling} is not supported")
        return inv_freq
