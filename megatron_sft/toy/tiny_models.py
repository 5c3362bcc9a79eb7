"""Tiny random HF models (Qwen2, Llama, Qwen3, Qwen3-MoE) with a local tokenizer: what tests and the CPU default build on.

Nothing is downloaded: the configs are written here and the tokenizer is a small word-level vocabulary
built with the `tokenizers` library, with a chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

TINY_VARIANTS = {
    # name: (architecture, overrides)
    "qwen2-tied-gqa": ("qwen2", dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)),
    "qwen2-untied-mha": ("qwen2", dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4)),
    "llama-untied-mha-rope-scaled": ("llama", dict(
        tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )),
    "llama-tied-gqa": ("llama", dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2)),
    # q/k RMSNorm per head, head_dim decoupled from hidden / heads (4 x 32 query width at hidden 64, as Qwen3-0.6B)
    "qwen3-tied-gqa": ("qwen3", dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=32)),
    # Qwen3-MoE: every layer's MLP is 4 experts of width 32, top-2 renormalised (as Qwen3-30B-A3B's 128 top-8)
    "qwen3-moe-untied": ("qwen3_moe", dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                                           router_aux_loss_coef=0.001)),
}


def save_tiny_tokenizer(path: Path, vocab_words: int = 250) -> int:
    """A word-level tokenizer over digits, letters and a few words; returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]
    words = [str(i) for i in range(100)] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("+-*/=?.,:")
    words += [f"w{i}" for i in range(vocab_words - len(words) - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return len(vocab)


def save_tiny_hf_model(path: str | Path, variant: str = "qwen2-tied-gqa", seed: int = 0, layers: int = 2,
                       hidden: int = 64, dtype: torch.dtype = torch.float32, config_overrides: dict | None = None):
    """Write a random HF model + the tiny tokenizer to ``path``; returns the HF model (eval mode).

    ``config_overrides`` replaces config fields, e.g. a real model's shape for a benchmark (a vocabulary
    larger than the tokenizer's is fine: the ids used are the tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    arch, overrides = TINY_VARIANTS[variant]
    vocab = save_tiny_tokenizer(path)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  max_position_embeddings=256, rms_norm_eps=1e-6, dtype=str(dtype).replace("torch.", ""))
    overrides = {**overrides, **(config_overrides or {})}
    common = {k: v for k, v in common.items() if k not in overrides}
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, **overrides, architectures=["Qwen2ForCausalLM"]))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, **overrides, architectures=["LlamaForCausalLM"]))
    else:
        model = _auto_model(arch, {**common, **overrides})
    with torch.no_grad():  # random biases (HF initialises them to zero) so the bias mapping is tested
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # likewise the q/k norms (ones)
                param.normal_(1.0, 0.5)
    model = model.to(dtype).eval()
    model.save_pretrained(path)
    return model


def _auto_model(model_type: str, config: dict):
    """Any other architecture of the table, through transformers' Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_sft.model.architectures import architecture

    hf_config = AutoConfig.for_model(model_type, **config, architectures=[architecture(model_type).hf_class])
    return AutoModelForCausalLM.from_config(hf_config)
