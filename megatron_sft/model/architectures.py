"""The architecture table: every HF causal-LM architecture megatron-sft converts and trains, in one place.

Per architecture (HF class / ``model_type``) an entry says how its config maps to megatron-core settings
(q/k/v bias, q/k RMSNorm, whether ``head_dim`` may differ from hidden/heads, the rope scaling kinds HF and
megatron agree on, sliding-window semantics), which example models it covers, the layouts the tests check,
and a tiny config shaped like a real model (real vocabulary, head dim, rope; 2 layers, narrow) for the
tests. ONE tensor table (:data:`DENSE_TENSORS`) names every checkpoint tensor on both sides; it drives
HF -> mcore, mcore -> HF, the expected-shape check and the parameter count, so a name is written once.
Adding an architecture is one entry here and its tests (``tests/test_architectures.py`` runs every entry).
A mixture-of-experts entry (Qwen3-MoE) has its own table (:data:`QWEN3_MOE_TENSORS`) whose expert tensors carry
an expert index ``{e}`` beside the layer index ``{i}``: the same expansion names each expert's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional


class UnsupportedModelError(ValueError):
    """An HF model this converter cannot map exactly."""


@dataclass(frozen=True)
class TensorRule:
    """One megatron-core tensor and the HF tensor(s) it is made of; ``{i}`` stands for the layer number and
    ``{e}`` for the expert number (megatron-core's SequentialMLP ``local_experts``, all of them at EP=1).

    ``shapes`` gives each HF tensor's shape in named dimensions (h hidden, q query rows = heads x head_dim,
    kv KV rows, d head_dim, ffn, vocab, experts, moe_ffn per expert); ``fuse`` says how the HF tensors combine
    (copy, qkv grouped per KV head, gate_up stacked, vocab rows padded); ``when`` names the ModelArgs flag the
    tensor exists under."""

    mcore: str
    hf: tuple[str, ...]
    shapes: tuple[tuple[str, ...], ...]
    fuse: str = "copy"
    when: str = ""  # "" always | "qkv_bias" | "qk_layernorm" | "untied"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.mcore


_L, _A = "decoder.layers.{i}.", "model.layers.{i}."
DENSE_TENSORS: tuple[TensorRule, ...] = (
    TensorRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("vocab", "h"),), "vocab"),
    TensorRule(_L + "input_layernorm.weight", (_A + "input_layernorm.weight",), (("h",),)),
    TensorRule(_L + "self_attention.linear_qkv.weight",
               tuple(_A + f"self_attn.{p}_proj.weight" for p in "qkv"), (("q", "h"), ("kv", "h"), ("kv", "h")), "qkv"),
    TensorRule(_L + "self_attention.linear_qkv.bias",
               tuple(_A + f"self_attn.{p}_proj.bias" for p in "qkv"), (("q",), ("kv",), ("kv",)), "qkv", "qkv_bias"),
    TensorRule(_L + "self_attention.q_layernorm.weight", (_A + "self_attn.q_norm.weight",), (("d",),), when="qk_layernorm"),
    TensorRule(_L + "self_attention.k_layernorm.weight", (_A + "self_attn.k_norm.weight",), (("d",),), when="qk_layernorm"),
    TensorRule(_L + "self_attention.linear_proj.weight", (_A + "self_attn.o_proj.weight",), (("h", "q"),)),
    TensorRule(_L + "pre_mlp_layernorm.weight", (_A + "post_attention_layernorm.weight",), (("h",),)),
    TensorRule(_L + "mlp.linear_fc1.weight", (_A + "mlp.gate_proj.weight", _A + "mlp.up_proj.weight"),
               (("ffn", "h"), ("ffn", "h")), "gate_up"),
    TensorRule(_L + "mlp.linear_fc2.weight", (_A + "mlp.down_proj.weight",), (("h", "ffn"),)),
    TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",), (("h",),)),
    TensorRule("output_layer.weight", ("lm_head.weight",), (("vocab", "h"),), "vocab", "untied"),
)

# Qwen3-MoE: every layer's MLP is a router and experts (hub names per expert; transformers 5 fuses them in memory
# and writes them back per expert); the rest is DENSE_TENSORS
_X = _A + "mlp.experts.{e}."
MOE_MLP_TENSORS: tuple[TensorRule, ...] = (
    TensorRule(_L + "mlp.router.weight", (_A + "mlp.gate.weight",), (("experts", "h"),)),
    TensorRule(_L + "mlp.experts.local_experts.{e}.linear_fc1.weight", (_X + "gate_proj.weight", _X + "up_proj.weight"),
               (("moe_ffn", "h"), ("moe_ffn", "h")), "gate_up"),
    TensorRule(_L + "mlp.experts.local_experts.{e}.linear_fc2.weight", (_X + "down_proj.weight",), (("h", "moe_ffn"),)),
)
QWEN3_MOE_TENSORS: tuple[TensorRule, ...] = tuple(
    rule for dense in DENSE_TENSORS
    for rule in ((dense,) if ".mlp." not in dense.mcore else MOE_MLP_TENSORS if "fc1" in dense.mcore else ()))

ROPE_TYPES = ("default", "llama3", "linear")  # HF's inverse frequencies with attention scaling 1


@dataclass(frozen=True)
class Architecture:
    """One HF architecture and what megatron-core needs to reproduce it exactly."""

    hf_class: str
    model_type: str
    examples: tuple[tuple[str, bool], ...]  # (model, tied embeddings) for the README
    qkv_bias: bool  # Qwen2's always-on q/k/v biases; without them ``attention_bias`` (q/k/v/o biases) is refused
    qk_norm: bool  # q_norm/k_norm RMSNorm over each head -> megatron-core qk_layernorm
    decoupled_head_dim: bool  # head_dim from the config may differ from hidden/heads -> kv_channels
    tiny_config: dict[str, Any]  # hub-spelled config.json, 2 layers, narrow: what the tests build
    shaped_like: str  # the registry key whose real config the tiny one keeps (vocabulary, head_dim, rope)
    sliding_window_always_on: bool = False  # Mistral: ``sliding_window`` alone turns windowed attention on
    rope_types: tuple[str, ...] = ROPE_TYPES
    tested_layouts: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (2, 2))  # (TP, PP)
    tensors: tuple[TensorRule, ...] = field(default=DENSE_TENSORS, repr=False)
    moe: bool = False  # every layer's MLP is megatron-core's MoELayer (router + SequentialMLP experts)
    tested_expert_layouts: tuple[tuple[int, int], ...] = ()  # (TP, EP) the MoE tests run


def _tiny(hf_class: str, model_type: str, **config: Any) -> dict[str, Any]:
    """A hub-spelled config.json with the fields every tiny config shares."""
    return {"architectures": [hf_class], "model_type": model_type, "hidden_act": "silu", "attention_dropout": 0.0,
            "initializer_range": 0.02, "num_hidden_layers": 2, "use_cache": True, **config}


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(  # shaped like Qwen2.5-1.5B (tied, 6:1 GQA in the real one, head_dim 128, q/k/v biases)
        "Qwen2ForCausalLM", "qwen2", (("Qwen2.5-1.5B/3B/Math-1.5B", True), ("Qwen2.5-7B/14B/Math-7B/Coder-7B", False)),
        qkv_bias=True, qk_norm=False, decoupled_head_dim=False,
        tiny_config=_tiny("Qwen2ForCausalLM", "qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=2,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=131072,
                          rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=131072, max_window_layers=28,
                          use_sliding_window=False, tie_word_embeddings=True, torch_dtype="bfloat16"),
        shaped_like="qwen2.5-1.5b"),
    Architecture(  # shaped like Llama-3.2-1B (tied, head_dim 64, llama3 rope scaling factor 32)
        "LlamaForCausalLM", "llama",
        (("Llama-3.2-1B/3B", True), ("Llama-3.1-8B", False), ("DeepSeek-Math-7B", False)),
        qkv_bias=False, qk_norm=False, decoupled_head_dim=False,
        tiny_config=_tiny("LlamaForCausalLM", "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                          rms_norm_eps=1e-05, rope_theta=500000.0, attention_bias=False, mlp_bias=False,
                          rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                          tie_word_embeddings=True, torch_dtype="bfloat16"),
        shaped_like="llama-3.2-1b"),
    Architecture(  # shaped like Qwen3-0.6B (tied, head_dim 128 with hidden 1024 / 16 heads: decoupled, q/k norm)
        "Qwen3ForCausalLM", "qwen3", (("Qwen3-0.6B/1.7B/4B", True), ("Qwen3-8B/14B/32B", False)),
        qkv_bias=False, qk_norm=True, decoupled_head_dim=True,
        tiny_config=_tiny("Qwen3ForCausalLM", "qwen3", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                          rms_norm_eps=1e-06, rope_theta=1000000, rope_scaling=None, attention_bias=False,
                          sliding_window=None, max_window_layers=28, use_sliding_window=False,
                          tie_word_embeddings=True, torch_dtype="bfloat16"),
        shaped_like="qwen3-0.6b"),
    Architecture(  # shaped like Mistral-7B-v0.3 (untied, head_dim 128, vocab 32768, theta 1e6, no sliding window)
        "MistralForCausalLM", "mistral", (("Mistral-7B-v0.3", False),),
        qkv_bias=False, qk_norm=False, decoupled_head_dim=False, sliding_window_always_on=True,
        tiny_config=_tiny("MistralForCausalLM", "mistral", hidden_size=512, intermediate_size=512,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=32768,
                          max_position_embeddings=32768, rms_norm_eps=1e-05, rope_theta=1000000.0,
                          sliding_window=None, tie_word_embeddings=False, torch_dtype="bfloat16"),
        shaped_like="mistral-7b-v0.3"),
    Architecture(  # shaped like Qwen3-30B-A3B (untied, head_dim 128, q/k norm, 128 experts top-8 -> 8 top-2 here)
        "Qwen3MoeForCausalLM", "qwen3_moe", (("Qwen3-30B-A3B", False),),
        qkv_bias=False, qk_norm=True, decoupled_head_dim=True, moe=True, tensors=QWEN3_MOE_TENSORS,
        tiny_config=_tiny("Qwen3MoeForCausalLM", "qwen3_moe", hidden_size=256, intermediate_size=512,
                          moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
                          output_router_logits=False, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                          vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-06, rope_theta=1000000.0,
                          rope_scaling=None, attention_bias=False, sliding_window=None, max_window_layers=48,
                          use_sliding_window=False, tie_word_embeddings=False, torch_dtype="bfloat16"),
        shaped_like="qwen3-30b-a3b", tested_layouts=((1, 1), (2, 1), (2, 2)),
        tested_expert_layouts=((1, 2), (2, 1), (2, 2), (1, 4))),
)


def supported_architectures() -> list[str]:
    """The HF class names the table covers (what refusals name)."""
    return [arch.hf_class for arch in ARCHITECTURES]


def architecture(name: str) -> Architecture:
    """The entry for an HF class name (``Qwen3ForCausalLM``) or ``model_type`` (``qwen3``)."""
    for arch in ARCHITECTURES:
        if name in (arch.hf_class, arch.model_type):
            return arch
    raise UnsupportedModelError(_unsupported_message(name))


def _unsupported_message(what: Any) -> str:
    examples = "; ".join(f"{a.hf_class}: {', '.join(m for m, _ in a.examples)}" for a in ARCHITECTURES)
    return f"architecture {what!r} is not supported; supported: {supported_architectures()} ({examples})"


def architecture_of(config: Any) -> Architecture:
    """The entry for an HF config: its ``architectures`` list, else its ``model_type``; refused otherwise."""
    names = list(getattr(config, "architectures", None) or [])
    for arch in ARCHITECTURES:
        if arch.hf_class in names:
            return arch
    model_type = getattr(config, "model_type", "?")
    if names or model_type not in {a.model_type for a in ARCHITECTURES}:
        raise UnsupportedModelError(_unsupported_message(names or model_type))
    return architecture(model_type)


def _applies(rule: TensorRule, args: Any) -> bool:
    """Whether a model with ``args`` holds the rule's tensor (its ``when`` flag)."""
    if rule.when == "untied":
        return not args.tie_word_embeddings
    return not rule.when or bool(getattr(args, rule.when))


Slot = Optional[tuple[int, ...]]  # (layer,) or (layer, expert); None outside the layers


def tensor_rules(args: Any) -> Iterator[tuple[TensorRule, Slot]]:
    """(rule, slot) for every tensor of a model with ``args``, in checkpoint order: the tensors before the
    layers, each layer's in table order (an expert rule once per expert), then the ones after (slot None outside
    the layers)."""
    rules = [r for r in architecture(args.architecture).tensors if _applies(r, args)]
    first = next(n for n, r in enumerate(rules) if r.per_layer)
    layer_rules = [r for r in rules if r.per_layer]
    experts = range(getattr(args, "num_moe_experts", 0) or 0)
    yield from ((r, None) for r in rules[:first] if not r.per_layer)
    for i in range(args.num_layers):
        for r in layer_rules:
            yield from (((r, (i, e)) for e in experts) if r.per_expert else ((r, (i,)),))
    yield from ((r, None) for r in rules[first:] if not r.per_layer)


def named(template: str, slot: Slot | int) -> str:
    """A table name with its layer (and expert) number filled in."""
    if slot is None:
        return template
    layer, *expert = (slot,) if isinstance(slot, int) else slot
    name = template.replace("{i}", str(layer))
    return name.replace("{e}", str(expert[0])) if expert else name


def dimensions(args: Any) -> dict[str, int]:
    """The named dimensions of :class:`TensorRule` shapes for ``args`` (ModelArgs)."""
    d = args.kv_channels
    return {"h": args.hidden_size, "d": d, "q": args.num_attention_heads * d, "kv": args.num_query_groups * d,
            "ffn": args.ffn_hidden_size, "vocab": args.vocab_size,
            "experts": getattr(args, "num_moe_experts", 0), "moe_ffn": getattr(args, "moe_ffn_hidden_size", 0)}


def expected_hf_shapes(args: Any) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the config implies, with its shape (to refuse checkpoints that disagree)."""
    dims = dimensions(args)
    return {named(name, layer): tuple(dims[s] for s in shape)
            for rule, layer in tensor_rules(args) for name, shape in zip(rule.hf, rule.shapes)}


def parameter_count(args: Any, active: bool = False) -> int:
    """Parameters of the HF model (a tied LM head counted once), from the same table as the conversion;
    ``active``: those one token runs through (of a mixture of experts, only the top-k experts' weights)."""
    dims, total = dimensions(args), 0
    for rule, slot in tensor_rules(args):
        if active and rule.per_expert and slot[1] >= args.moe_router_topk:
            continue  # every expert has the same size: count the first top-k
        for shape in rule.shapes:
            count = 1
            for size in shape:
                count *= dims[size]
            total += count
    return total


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _tied_cell(arch: Architecture) -> str:
    kinds = {tied for _, tied in arch.examples}
    if len(kinds) == 1:
        return _yes_no(kinds.pop())
    return "; ".join(f"{_yes_no(tied)}: {model}" for model, tied in arch.examples)


def readme_table() -> str:
    """The README's architecture table, generated from :data:`ARCHITECTURES` (a test keeps them equal)."""
    rows = ["| architecture | example models | tied embeddings | GQA | qkv bias | qk-norm | head_dim | rope scaling | "
            "tested layouts (TP x PP) | mixture of experts (tested TP x EP) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for a in ARCHITECTURES:
        moe = f"yes ({', '.join(f'{tp}x{ep}' for tp, ep in a.tested_expert_layouts)})" if a.moe else "no"
        rows.append(" | ".join([
            f"| `{a.hf_class}` (`{a.model_type}`)", ", ".join(m for m, _ in a.examples), _tied_cell(a), "yes",
            _yes_no(a.qkv_bias), "RMSNorm per head" if a.qk_norm else "no",
            "from config" if a.decoupled_head_dim else "hidden / heads", ", ".join(a.rope_types),
            ", ".join(f"{tp}x{pp}" for tp, pp in a.tested_layouts), moe]) + " |")
    return "\n".join(rows) + "\n"
