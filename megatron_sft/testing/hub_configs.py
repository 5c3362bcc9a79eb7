"""Real models' config.json as the hub publishes them (transformers-4 spelling), shrunk only in depth and width.

Vocabularies, head dimensions, GQA ratios, RoPE settings and dtypes stay the real ones, so the conversion and
export are tested on what users convert. Nothing is downloaded: the dicts are written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

QWEN25_15B = {  # Qwen/Qwen2.5-1.5B config.json
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 151936,
}

LLAMA31_8B = {  # meta-llama/Llama-3.1-8B config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}

LLAMA32_1B = {  # meta-llama/Llama-3.2-1B config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}

QWEN3_06B = {  # Qwen/Qwen3-0.6B config.json: head_dim 128 although hidden 1024 / 16 heads = 64
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}

QWEN3_8B = dict(QWEN3_06B, hidden_size=4096, intermediate_size=12288, max_window_layers=36, num_attention_heads=32,
                num_hidden_layers=36, tie_word_embeddings=False)  # Qwen/Qwen3-8B config.json

MISTRAL_7B_V03 = {  # mistralai/Mistral-7B-v0.3 config.json (no sliding window, unlike v0.1)
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.42.0.dev0", "use_cache": True,
    "vocab_size": 32768,
}

DEEPSEEK_MATH_7B = {  # deepseek-ai/deepseek-math-7b-base config.json (Llama architecture, MHA, 4k context)
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 100000, "eos_token_id": 100001,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 30,
    "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "vocab_size": 102400,
}

QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B config.json: every layer a mixture of 128 experts, 8 per token
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}

HUB_CONFIGS = {"qwen2.5-1.5b": QWEN25_15B, "llama-3.1-8b": LLAMA31_8B, "llama-3.2-1b": LLAMA32_1B,
               "qwen3-0.6b": QWEN3_06B, "qwen3-8b": QWEN3_8B, "mistral-7b-v0.3": MISTRAL_7B_V03,
               "deepseek-math-7b": DEEPSEEK_MATH_7B, "qwen3-30b-a3b": QWEN3_30B_A3B}


def head_dim(config: dict[str, Any]) -> int:
    """The head dimension HF uses: ``head_dim`` when the config has one, else hidden / heads."""
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def shrunk(config: dict[str, Any], layers: int, heads: int | None = None) -> dict[str, Any]:
    """``config`` with ``layers`` layers and, with ``heads``, that many query heads: the head dimension and the
    query-to-KV-head ratio are kept, the hidden and MLP sizes follow (a ``head_dim`` decoupled from hidden / heads,
    as in Qwen3, keeps the real hidden-to-query-width ratio)."""
    out = dict(config, num_hidden_layers=layers)
    if heads is not None:
        d = head_dim(config)
        hidden = heads * d * config["hidden_size"] // (config["num_attention_heads"] * d)
        ratio = config["num_attention_heads"] // config["num_key_value_heads"]
        if heads % ratio:
            raise ValueError(f"{heads} heads do not keep the {ratio}:1 query-to-KV ratio")
        out.update(num_attention_heads=heads, num_key_value_heads=heads // ratio, hidden_size=hidden,
                   intermediate_size=2 * hidden, head_dim=d)
    return out


def save_hub_shaped_model(path: str | Path, config: dict[str, Any], seed: int = 0):
    """Random weights for ``config`` in its dtype, the tiny tokenizer, and config.json exactly as given; returns
    the HF model (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from megatron_sft.toy.tiny_models import save_tiny_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    dtype = getattr(torch, config["torch_dtype"])
    with no_init_weights():  # HF's per-module init is slow at real vocabularies; every parameter is drawn below
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.tie_weights()  # skipped with the init; a tied LM head must be the embedding itself
    std = config.get("initializer_range", 0.02)
    with torch.no_grad():  # random norms and biases too (HF would initialise them to ones / zeros)
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
            else:
                param.normal_(0.0, std)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))  # the hub's spelling, not transformers 5's
    return model.eval()
