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

HUB_CONFIGS = {"qwen2.5-1.5b": QWEN25_15B, "llama-3.1-8b": LLAMA31_8B}


def shrunk(config: dict[str, Any], layers: int, heads: int | None = None) -> dict[str, Any]:
    """``config`` with ``layers`` layers and, with ``heads``, that many query heads: the head dimension and the
    query-to-KV-head ratio are kept, the hidden and MLP sizes follow."""
    out = dict(config, num_hidden_layers=layers)
    if heads is not None:
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        ratio = config["num_attention_heads"] // config["num_key_value_heads"]
        if heads % ratio:
            raise ValueError(f"{heads} heads do not keep the {ratio}:1 query-to-KV ratio")
        out.update(num_attention_heads=heads, num_key_value_heads=heads // ratio, hidden_size=heads * head_dim,
                   intermediate_size=2 * heads * head_dim, head_dim=head_dim)
    return out


def save_hub_shaped_model(path: str | Path, config: dict[str, Any], seed: int = 0) -> None:
    """Random weights for ``config`` in its dtype, the tiny tokenizer, and config.json exactly as given."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_sft.testing.tiny_models import save_tiny_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    hf_config = AutoConfig.from_pretrained(path)
    torch.manual_seed(seed)
    dtype = getattr(torch, config["torch_dtype"])
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    with torch.no_grad():  # random norms and biases (HF initialises them to ones / zeros)
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "layernorm.weight")):
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.5)
    model.save_pretrained(path)
    save_tiny_tokenizer(path)
    (path / "config.json").write_text(json.dumps(config, indent=2))  # the hub's spelling, not transformers 5's
