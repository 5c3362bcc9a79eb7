"""Base models of the paper, keyed as in the reference implementation (``qwen-2.5-math-1.5b`` ...).

The architecture numbers are the models' HF ``config.json`` values. They size the parallel layout
(:mod:`megatron_sft.recipes.parallel_plan`) without downloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

LLAMA3_PLAIN_TEMPLATE = (
    "<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelSpec:
    keys: tuple[str, ...]  # first: the canonical key; the rest are accepted aliases
    hf_id: str
    family: str  # qwen2 | llama
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

    @property
    def key(self) -> str:
        return self.keys[0]

    @property
    def parameters(self) -> int:
        """Parameter count from the architecture (attention with GQA, SwiGLU MLP, RMSNorms)."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        attention = self.hidden * self.hidden * 2 + self.hidden * kv * 2
        if self.family == "qwen2":  # q/k/v biases
            attention += self.hidden + 2 * kv
        mlp = 3 * self.hidden * self.ffn_hidden
        per_layer = attention + mlp + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embeddings + self.hidden


def _qwen(keys: tuple[str, ...], hf_id: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
          tied: bool) -> ModelSpec:
    return ModelSpec(keys, hf_id, "qwen2", layers, hidden, ffn, heads, kv, vocab, tied)


def _llama(keys: tuple[str, ...], hf_id: str, layers: int, hidden: int, ffn: int, heads: int, kv: int, vocab: int,
           tied: bool, llama3_format: bool = True) -> ModelSpec:
    if llama3_format:
        return ModelSpec(keys, hf_id, "llama", layers, hidden, ffn, heads, kv, vocab, tied,
                         template="plain", plain_template=LLAMA3_PLAIN_TEMPLATE)
    return ModelSpec(keys, hf_id, "llama", layers, hidden, ffn, heads, kv, vocab, tied)


MODELS: tuple[ModelSpec, ...] = (
    _qwen(("qwen-2.5-math-1.5b",), "Qwen/Qwen2.5-Math-1.5B", 28, 1536, 8960, 12, 2, 151936, True),
    _qwen(("qwen-2.5-math-7b",), "Qwen/Qwen2.5-Math-7B", 28, 3584, 18944, 28, 4, 152064, False),
    _qwen(("qwen-2.5-1.5b",), "Qwen/Qwen2.5-1.5B", 28, 1536, 8960, 12, 2, 151936, True),
    _qwen(("qwen2.5-3b", "qwen-2.5-3b"), "Qwen/Qwen2.5-3B", 36, 2048, 11008, 16, 2, 151936, True),
    _qwen(("qwen-2.5-7b", "qwen2.5-7b"), "Qwen/Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, False),
    _qwen(("qwen2.5-14b", "qwen-2.5-14b"), "Qwen/Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, False),
    _qwen(("qwen2.5-coder-7b", "qwen-2.5-coder-7b"), "Qwen/Qwen2.5-Coder-7B", 28, 3584, 18944, 28, 4, 152064, False),
    _llama(("llama-3.1-8b",), "meta-llama/Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),
    _llama(("llama-3.2-3b",), "meta-llama/Llama-3.2-3B", 28, 3072, 8192, 24, 8, 128256, True),
    _llama(("deepseek-math-7b",), "deepseek-ai/deepseek-math-7b-base", 30, 4096, 11008, 32, 32, 102400, False,
           llama3_format=False),
)


def _normalise(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


def get_model(key: str) -> ModelSpec:
    """The model for a reference key; spellings such as ``qwen2.5-math-1.5b`` for ``qwen-2.5-math-1.5b`` work."""
    wanted = _normalise(key)
    for spec in MODELS:
        if any(_normalise(k) == wanted for k in spec.keys):
            return spec
    raise UnknownModelError(f"unknown model key {key!r}; known keys: {', '.join(model_keys())}")


def model_keys() -> list[str]:
    return [spec.key for spec in MODELS]
