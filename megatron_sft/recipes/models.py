"""Base models of the paper and the ones users fine-tune (Qwen3, Qwen3-MoE, Mistral, Llama 3.2). The canonical key is the HF repo's name in lower case (``qwen2.5-math-1.5b`` for
``Qwen/Qwen2.5-Math-1.5B``; ``deepseek-math-7b`` without the repo's ``-base``; ``mistral-7b-v0.3``, alias ``mistral-7b``, for
Mistral-7B-v0.3); the reference implementation's
spellings (``qwen-2.5-math-1.5b`` ...) are aliases, accepted wherever a key is read.

The architecture numbers are the models' HF ``config.json`` values. They size the parallel layout
(:mod:`megatron_sft.recipes.parallel_plan`) without downloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sft.model.architectures import architecture, parameter_count
from megatron_sft.model.args import ModelArgs

LLAMA3_PLAIN_TEMPLATE = (
    "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)

# Mistral-7B-v0.3 is a base model: train on Mistral's [INST] instruction format as a plain template
MISTRAL_PLAIN_TEMPLATE = "[INST] {prompt} [/INST]"


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    keys: tuple[str, ...]  # first: the canonical key; the rest are accepted aliases
    hf_id: str
    family: str  # the architecture table's model_type: qwen2 | llama | qwen3 | mistral | qwen3_moe
    layers: int
    hidden: int
    ffn_hidden: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    # base-model tokenizers of Llama 3 ship no chat template: train on its chat format as a plain template
    template: str = "chat"
    plain_template: str = "{prompt}\n"
    head_dim: int = 0  # 0: hidden / heads; Qwen3 sets its own (kv_channels)
    # mixture of experts (0: dense): experts per layer, experts per token, each expert's FFN width (ffn_hidden
    # is then the config's unused dense intermediate_size); the names the memory model's ModelShape uses
    num_experts: int = 0
    moe_topk: int = 0
    moe_ffn: int = 0

    @property
    def key(self) -> str:
        return self.keys[0]

    def model_args(self) -> ModelArgs:
        """The shape as ModelArgs (what a conversion of the HF config would give, rope and dtype aside)."""
        arch = architecture(self.family)
        return ModelArgs(
            architecture=arch.hf_class, vocab_size=self.vocab, hidden_size=self.hidden, ffn_hidden_size=self.ffn_hidden,
            num_layers=self.layers, num_attention_heads=self.heads, num_query_groups=self.kv_heads,
            kv_channels=self.head_dim or self.hidden // self.heads, max_position_embeddings=0, norm_eps=0.0,
            tie_word_embeddings=self.tied_embeddings, qkv_bias=arch.qkv_bias, rope_theta=0.0,
            qk_layernorm=arch.qk_norm, num_moe_experts=self.num_experts, moe_router_topk=self.moe_topk,
            moe_ffn_hidden_size=self.moe_ffn, moe_norm_topk_prob=bool(self.num_experts),
        )

    @property
    def parameters(self) -> int:
        """Parameter count from the architecture table's tensors (the ones the converter reads)."""
        return parameter_count(self.model_args())

    @property
    def active_parameters(self) -> int:
        """Parameters one token runs through (of a mixture of experts: its top-k experts only)."""
        return parameter_count(self.model_args(), active=True)


def _qwen(keys: tuple[str, ...], hf_id: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
          tied: bool) -> ModelSpec:
    return ModelSpec(keys, hf_id, "qwen2", layers, hidden, ffn, heads, kv, vocab, tied)


def _qwen3(keys: tuple[str, ...], hf_id: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
           tied: bool) -> ModelSpec:
    """Qwen3 dense: head_dim 128 whatever the hidden size (Qwen3-0.6B: 16 heads x 128 > hidden 1024)."""
    return ModelSpec(keys, hf_id, "qwen3", layers, hidden, ffn, heads, kv, vocab, tied, head_dim=128)


def _llama(keys: tuple[str, ...], hf_id: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
           tied: bool, llama3_format: bool = True) -> ModelSpec:
    if llama3_format:
        return ModelSpec(keys, hf_id, "llama", layers, hidden, ffn, heads, kv, vocab, tied,
                         template="plain", plain_template=LLAMA3_PLAIN_TEMPLATE)
    return ModelSpec(keys, hf_id, "llama", layers, hidden, ffn, heads, kv, vocab, tied)


MODELS: tuple[ModelSpec, ...] = (
    _qwen(("qwen2.5-math-1.5b", "qwen-2.5-math-1.5b"), "Qwen/Qwen2.5-Math-1.5B", 28, 1536, 8960, 12, 2, 151936, True),
    _qwen(("qwen2.5-math-7b", "qwen-2.5-math-7b"), "Qwen/Qwen2.5-Math-7B", 28, 3584, 18944, 28, 4, 152064, False),
    _qwen(("qwen2.5-1.5b", "qwen-2.5-1.5b"), "Qwen/Qwen2.5-1.5B", 28, 1536, 8960, 12, 2, 151936, True),
    _qwen(("qwen2.5-3b", "qwen-2.5-3b"), "Qwen/Qwen2.5-3B", 36, 2048, 11008, 16, 2, 151936, True),
    _qwen(("qwen2.5-7b", "qwen-2.5-7b"), "Qwen/Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, False),
    _qwen(("qwen2.5-14b", "qwen-2.5-14b"), "Qwen/Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, False),
    _qwen(("qwen2.5-coder-7b", "qwen-2.5-coder-7b"), "Qwen/Qwen2.5-Coder-7B", 28, 3584, 18944, 28, 4, 152064, False),
    _llama(("llama-3.1-8b",), "meta-llama/Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),
    _llama(("llama-3.2-3b",), "meta-llama/Llama-3.2-3B", 28, 3072, 8192, 24, 8, 128256, True),
    _llama(("llama-3.2-1b",), "meta-llama/Llama-3.2-1B", 16, 2048, 8192, 32, 8, 128256, True),
    _llama(("deepseek-math-7b", "deepseek-math-7b-base"), "deepseek-ai/deepseek-math-7b-base", 30, 4096, 11008, 32, 32,
           102400, False, llama3_format=False),
    _qwen3(("qwen3-0.6b",), "Qwen/Qwen3-0.6B", 28, 1024, 3072, 16, 8, 151936, True),
    _qwen3(("qwen3-8b",), "Qwen/Qwen3-8B", 36, 4096, 12288, 32, 8, 151936, False),
    ModelSpec(("qwen3-30b-a3b",), "Qwen/Qwen3-30B-A3B", "qwen3_moe", 48, 2048, 6144, 32, 4, 151936, False, head_dim=128,
              num_experts=128, moe_topk=8, moe_ffn=768),
    ModelSpec(("mistral-7b-v0.3", "mistral-7b"), "mistralai/Mistral-7B-v0.3", "mistral", 32, 4096, 14336, 32, 8, 32768,
              False, template="plain", plain_template=MISTRAL_PLAIN_TEMPLATE),
)


def _normalise(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


def get_model(key: str) -> ModelSpec:
    """The model for a key: the canonical one or an alias (``qwen-2.5-math-1.5b``, ``Qwen2.5-Math-1.5B`` ...);
    dashes, underscores and case do not matter, and an HF repo id (``Qwen/Qwen2.5-7B``) names its model too."""
    wanted = _normalise(key.split("/")[-1])
    for spec in MODELS:
        if any(_normalise(k) == wanted for k in spec.keys):
            return spec
    raise UnknownModelError(f"unknown model key {key!r}; known keys: {', '.join(model_keys())}")


def model_keys() -> list[str]:
    return [spec.key for spec in MODELS]
