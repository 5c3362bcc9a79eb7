"""The per-GPU memory model (megatron_sft/memory/model.py), its planner and its check against measurement.

Terms are compared with numbers worked out by hand, the activation terms also with what autograd really saves
in megatron-core's local spec (one layer = the difference between a 2-layer and a 1-layer decoder), and the
GPT special case with Korthikanti et al. 2022's 34sbh + 5as^2b.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_sft.memory.check import compare_with_measured, layout_from_config, predicted_line
from megatron_sft.memory.model import (
    GIB, Layout, MemoryModelError, ModelShape, cpu_layout, estimate, expert_data_parallel, expert_parameters,
    in_flight_microbatches, korthikanti_layer_bytes, layer_activation_bytes, layer_backward_workspace, layer_parameters,
    moe_activation_bytes, output_backward_workspace, output_saved_bytes, stage_expert_parameters, stage_parameters,
    static_terms,
)
from megatron_sft.memory.plan import MemoryPlanError, plan_memory

# h 64, 4 heads of 16, 2 KV heads, SwiGLU f 160, vocab 256
TINY = ModelShape(layers=4, hidden=64, ffn=160, heads=4, kv_heads=2, vocab=256, tied_embeddings=False)
SEQ, MICRO = 32, 2


def test_parameters_by_hand():
    # qkv 64*(64+32+32) + bias 128 = 8320; proj 64*64 = 4096; fc1 64*320 = 20480; fc2 160*64 = 10240; norms 128
    assert layer_parameters(TINY) == 8320 + 4096 + 20480 + 10240 + 128
    per_layer = 43264
    assert stage_parameters(TINY, Layout(), "only") == 4 * per_layer + 2 * 256 * 64 + 64
    assert stage_parameters(TINY, Layout(tensor=2, pipeline=2), "first") == 2 * per_layer / 2 + 256 * 64 / 2
    tied = replace(TINY, tied_embeddings=True)
    assert stage_parameters(tied, Layout(), "only") == 4 * per_layer + 256 * 64 + 64
    assert stage_parameters(tied, Layout(pipeline=2), "last") == 2 * per_layer + 256 * 64 + 64  # PP keeps a copy


def test_static_terms_by_hand():
    p = 4 * 43264 + 2 * 256 * 64 + 64  # 205888
    bf16 = {t.name: t.bytes for t in static_terms(TINY, Layout(data=4), "only")}
    assert bf16 == {"weights": 2 * p, "main grads (fp32)": 4 * p, "optimizer state": 12 * p / 4}
    fp32 = {t.name: t.bytes for t in static_terms(TINY, cpu_layout(data=2), "only")}
    assert fp32 == {"weights": 4 * p, "main grads (fp32)": 4 * p, "optimizer state": 8 * p / 2}
    plain = {t.name: t.bytes for t in static_terms(TINY, Layout(data=4, distributed_optimizer=False), "only")}
    assert plain["optimizer state"] == 12 * p


def test_layer_activations_by_hand():
    t, lay = SEQ * MICRO, cpu_layout(seq=SEQ, micro_batch=MICRO)
    # fp32, torch norms 2 x 3h, q + repeated k, v + proj input 4*64, SwiGLU 5f; probs 4 heads x 32^2 x 2 rows
    none = (6 * 64 + 4 * 64 + 5 * 160) * t * 4 + 4 * SEQ**2 * MICRO * 4
    assert layer_activation_bytes(TINY, lay) == none == 401408
    # selective: q + k (32) + the qkv output (128) kept through v, + proj input; no probabilities
    assert layer_activation_bytes(TINY, lay, "selective") == (6 * 64 + (64 + 32 + 128 + 64) + 5 * 160) * t * 4
    assert layer_activation_bytes(TINY, lay, "full") == 64 * t * 4
    # TP2 + SP: everything / 2; TP2 without SP: the norms stay whole
    sp = replace(lay, tensor=2, sequence_parallel=True)
    assert layer_activation_bytes(TINY, sp) == none / 2
    tp = replace(lay, tensor=2)
    assert layer_activation_bytes(TINY, tp) == 6 * 64 * t * 4 + (4 * 64 + 5 * 160) * t * 4 / 2 + 4 * SEQ**2 * MICRO * 4 / 2
    # GPU path: bf16, fused norms 2 x 2h, flash attention keeps q + 2kv, no scores
    gpu = Layout(seq=SEQ, micro_batch=MICRO)
    assert layer_activation_bytes(TINY, gpu) == (4 * 64 + (64 + 64 + 64) + 5 * 160) * t * 2


@pytest.mark.parametrize("tensor,sp", [(1, False), (2, False), (4, False), (2, True), (8, True)])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_gpt_case_is_korthikanti(tensor, sp, recompute):
    """GPT: MHA, GeLU with f = 4h, fused LayerNorm, 16-bit softmax, dropout. The local spec keeps the fused qkv
    output alive through the view v under MHA (2q more than the paper counts): the rest is the paper's formula."""
    s, b, h, a = 2048, 2, 1024, 16
    gpt = ModelShape(layers=24, hidden=h, ffn=4 * h, heads=a, kv_heads=a, vocab=51200, tied_embeddings=True, gated=False)
    lay = Layout(seq=s, micro_batch=b, tensor=tensor, sequence_parallel=sp, attention="materialized", softmax_fp32=False,
                 dropout=0.1, recompute=recompute)
    ours = layer_activation_bytes(gpt, lay)
    kept_qkv = {"none": 2 * h, "selective": 2 * h, "full": 0}[recompute] * s * b * 2 / tensor
    assert ours - kept_qkv == pytest.approx(korthikanti_layer_bytes(s, b, h, a, tensor, sp, recompute))


def _saved_bytes_worker(layers: int, mode: str) -> int:
    """Bytes autograd saves for the decoder of a tiny megatron-core model (local spec, fp32), storages counted once."""
    import torch

    from megatron_sft.model.args import ModelArgs
    from megatron_sft.model.builder import build_gpt_model, build_transformer_config
    from megatron_sft.parallel import init_model_parallel

    init_model_parallel(1, 1)
    args = ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=64, ffn_hidden_size=160, num_layers=layers,
                     num_attention_heads=4, num_query_groups=2, kv_channels=16, max_position_embeddings=128, norm_eps=1e-6,
                     tie_word_embeddings=False, qkv_bias=True, rope_theta=10000.0, padded_vocab_size=256)
    config = build_transformer_config(args, recompute_granularity=None if mode == "none" else mode)
    model = build_gpt_model(args, config, attention_backend="local")  # the spec cpu_layout describes (not SDPA)
    tokens = torch.randint(0, 256, (MICRO, SEQ))
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).expand(MICRO, 1, SEQ, SEQ).contiguous()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.decoder(model.embedding(tokens, torch.arange(SEQ).expand(MICRO, SEQ)), attention_mask=mask,
                      rotary_pos_emb=model.rotary_pos_emb(SEQ))
    return sum(saved.values())


def _saved_per_layer(mode: str) -> int:
    from megatron_sft.launch import run_local_workers

    def run(layers):
        return run_local_workers(_saved_bytes_worker, 1, layers, mode, timeout_s=300)[0]

    return run(2) - run(1)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_layer_activations_match_what_autograd_saves(mode):
    predicted = layer_activation_bytes(TINY, cpu_layout(seq=SEQ, micro_batch=MICRO), mode)
    # not modelled (< 3% here, less at real sizes): rope cos/sin for q and k, and the norms' 1/rms per token
    small = (4 * SEQ * 16 * 4 + 2 * SEQ * MICRO * 4) if mode != "full" else 0
    assert _saved_per_layer(mode) == pytest.approx(predicted + small, abs=16)


def test_pipeline_stage_memory_follows_the_schedule():
    lay = Layout(pipeline=4, num_microbatches=8)
    assert in_flight_microbatches(lay, "first") == 4
    assert in_flight_microbatches(lay, "last") == 1
    assert in_flight_microbatches(replace(lay, num_microbatches=2), "first") == 2
    assert in_flight_microbatches(replace(lay, virtual=2), "first") == 4 * (1 + 3 / 8)
    assert in_flight_microbatches(Layout(), "only") == 1
    m = replace(TINY, layers=8)
    est = estimate(m, replace(lay, seq=SEQ, micro_batch=MICRO))
    acts = {t.name: t.bytes for t in est.terms}
    assert est.stage == "first" and acts["layer activations (none)"] == 4 * 2 * layer_activation_bytes(m, est.layout)
    pp1 = estimate(m, Layout(seq=SEQ, micro_batch=MICRO))
    assert {t.name: t.bytes for t in pp1.terms}["layer activations (none)"] == 8 * layer_activation_bytes(m, pp1.layout)


def test_output_and_loss_buffers_fused_or_not():
    t, v, h = 4096, 151936, 1536
    m = ModelShape(layers=2, hidden=h, ffn=8960, heads=12, kv_heads=2, vocab=v, tied_embeddings=True)
    fused = cpu_layout(seq=t, loss_chunk_tokens=512)
    unfused = replace(fused, fused_output_loss=False)
    # fused: final norm (2h, torch norm) + the hidden copy the loss keeps + 24 bytes/token; unfused: + fp32 logits
    assert output_saved_bytes(m, fused) == 2 * t * h * 4 + t * h * 4 + 24 * t
    assert output_saved_bytes(m, unfused) == 2 * t * h * 4 + t * h * 4 + t * v * 4
    # fused backward: grad_hidden + one fp32 chunk of logits (each freed before the next); the weight gradient
    # goes into the DDP buffer, and a tied weight gets no stand-in
    assert output_backward_workspace(m, fused) == t * h * 4 + 512 * v * 4
    assert output_backward_workspace(m, replace(fused, seq=512)) == 512 * h * 4 + 512 * v * 4
    # untied on a GPU: megatron-core's [V, h] stand-in (bf16) once the chunks are gone, if it is the larger
    gpu = Layout(seq=t, loss_chunk_tokens=512)
    untied = replace(m, tied_embeddings=False)
    assert output_backward_workspace(untied, gpu) == t * h * 2 + max(512 * v * (2 + 4), v * h * 2)
    assert output_backward_workspace(untied, replace(gpu, loss_chunk_tokens=64)) == t * h * 2 + v * h * 2
    assert output_backward_workspace(untied, gpu, "last") == output_backward_workspace(m, gpu, "last")
    assert estimate(m, unfused).peak - estimate(m, fused).peak > 0.9 * t * v * 4


def test_planner_recomputes_when_and_only_when_nothing_fits_without():
    from megatron_sft.recipes.models import get_model

    m = ModelShape.from_spec(get_model("qwen2.5-7b"))
    modes = []
    for memory in (40, 48, 56, 64, 80, 96, 141):
        try:
            plan = plan_memory(m, 1, 8, memory, 16384, 256, 1)
        except MemoryPlanError:
            modes.append(None)
            continue
        modes.append(plan.layout.recompute)
        none_fits = [est for est, _ in plan.rejected if est.layout.recompute == "none" and est.fits(plan.budget_bytes)]
        if plan.layout.recompute == "none":
            assert plan.chosen.peak <= plan.budget_bytes
        else:  # every layout without recompute was tried and does not fit
            assert not none_fits
            assert {(e.layout.tensor, e.layout.pipeline) for e, why in plan.rejected if e.layout.recompute == "none"}
    assert "none" in modes and any(mode in ("selective", "full") for mode in modes), modes
    assert modes.index("none") > max(i for i, mode in enumerate(modes) if mode in ("selective", "full"))


def test_planner_prefers_less_model_parallelism_and_larger_micro_batches():
    from megatron_sft.recipes.models import get_model

    small = ModelShape.from_spec(get_model("qwen2.5-1.5b"))
    plan = plan_memory(small, 1, 8, 80, 2048, 256, 4)
    assert (plan.layout.tensor, plan.layout.pipeline, plan.layout.micro_batch, plan.layout.recompute) == (1, 1, 4, "none")
    with pytest.raises(MemoryPlanError, match="no layout fits"):
        plan_memory(ModelShape.from_spec(get_model("qwen2.5-14b")), 1, 1, 24, 16384, 256, 1)


def test_bad_layouts_are_one_line_errors():
    with pytest.raises(MemoryModelError, match="parallel.tensor=3"):
        estimate(TINY, Layout(tensor=3))
    with pytest.raises(MemoryModelError, match="parallel.pipeline=3"):
        estimate(TINY, Layout(pipeline=3))


def test_compare_with_measured_warns_above_20_percent():
    assert not compare_with_measured(110 * GIB, 100 * GIB).warn
    assert not compare_with_measured(81 * GIB, 100 * GIB).warn
    high = compare_with_measured(125 * GIB, 100 * GIB)
    assert high.warn and high.relative == pytest.approx(0.25) and high.message.startswith("WARNING")
    assert compare_with_measured(70 * GIB, 100 * GIB).warn
    assert not compare_with_measured(1 * GIB, 0).warn  # nothing measured: no warning


def test_predicted_line_uses_the_config():
    from megatron_sft.config import load_config
    from megatron_sft.model.args import ModelArgs

    args = ModelArgs(architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=64, ffn_hidden_size=160, num_layers=4,
                     num_attention_heads=4, num_query_groups=2, kv_channels=16, max_position_embeddings=128,
                     norm_eps=1e-6, tie_word_embeddings=False, qkv_bias=True, rope_theta=1e4, padded_vocab_size=256)
    config = load_config(None, ["output_dir=unused", "model.checkpoint=unused", "data.train=unused", "parallel.tensor=2", "parallel.sequence_parallel=true", "data.max_length=32",
                                "train.micro_batch_size=2", "train.global_batch_size=8", "model.recompute=full"])
    lay = layout_from_config(config, world_size=4, on_gpu=False)
    assert (lay.tensor, lay.data, lay.seq, lay.micro_batch, lay.num_microbatches, lay.recompute) == (2, 2, 32, 2, 2, "full")
    assert lay.precision == "fp32" and lay.attention == "materialized"
    line, est = predicted_line(config, args, world_size=4)
    assert est.peak == estimate(TINY, lay).peak if not __import__("torch").cuda.is_available() else True
    assert line.startswith("memory model: predicted peak") and "recompute=full" in line


def test_plan_command(capsys):
    from megatron_sft.cli import main

    assert main(["plan", "--model", "qwen2.5-14b", "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "80",
                 "--seq", "16384"]) == 0
    out = capsys.readouterr().out
    assert "chosen: TP4+SP PP1 DP4 mb1 recompute=none" in out and "does not fit" in out and "layer activations" in out
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "unknown model key" in capsys.readouterr().out


def test_a_decoupled_head_dim_reaches_the_memory_model():
    """Qwen3-0.6B: 16 heads x head_dim 128 = 2048 attention width, above its hidden size 1024."""
    from megatron_sft.memory.model import ModelShape
    from megatron_sft.recipes.models import get_model

    assert ModelShape.from_spec(get_model("qwen3-0.6b")).head_dim == 128
    assert ModelShape.from_spec(get_model("qwen2.5-7b")).head_dim == 3584 // 28


def test_tied_output_gradient_is_held_until_the_embeddings():
    """Unfused output layer, tied embeddings: the loss's [V, h] weight gradient stays in autograd's input buffer
    through every layer's backward and the embedding's (2 x V*h*4 at its end). The fused path holds none."""
    lay = cpu_layout(seq=SEQ, micro_batch=MICRO, fused_output_loss=False)
    tied = replace(TINY, tied_embeddings=True)
    fused = estimate(tied, replace(lay, fused_output_loss=True))
    assert "tied output-layer gradient (held)" not in {t.name for t in fused.terms}
    fused_static = sum(t.bytes for t in fused.terms if t.phase == "static")
    assert fused.phases["embedding"] == fused_static + 256 * 64 * 4
    terms = {t.name: t for t in estimate(tied, lay).terms}
    held = terms["tied output-layer gradient (held)"]
    assert held.bytes == 256 * 64 * 4 and held.phase == "layers+embedding"
    assert "tied output-layer gradient (held)" not in {t.name for t in estimate(TINY, lay).terms}
    assert "tied output-layer gradient (held)" not in {t.name for t in estimate(tied, replace(lay, pipeline=2)).terms}
    # the embedding phase: the held gradient + the embedding's own dense one, activations gone
    est = estimate(tied, lay)
    static = sum(t.bytes for t in est.terms if t.phase == "static")
    assert est.phases["embedding"] == static + 2 * 256 * 64 * 4
    assert estimate(TINY, lay).phases["embedding"] == sum(t.bytes for t in static_terms(TINY, lay, "only")) + 256 * 64 * 4
    assert est.peak == max(est.phases.values())


def test_layer_backward_frees_the_mlp_activations_before_the_attention():
    lay = cpu_layout(seq=SEQ, micro_batch=MICRO)
    t = SEQ * MICRO
    mlp = 4 * 160 * t * 4 + 2 * 160 * 64 * 4
    attention = 2 * 4 * SEQ**2 * MICRO * 4 + 3 * 64 * t * 4 - 5 * 160 * t * 4
    assert layer_backward_workspace(TINY, lay) == max(mlp, attention) == mlp


def test_attention_score_buffer_counts_on_gpu_only():
    """megatron-core's global buffer for the score matmul: allocated (CUDA counts it), never written on CPU."""
    gpu = Layout(seq=SEQ, micro_batch=MICRO, attention="materialized", tensor=2)
    names = {t.name: t.bytes for t in static_terms(TINY, gpu, "only")}
    assert names["attention score buffer (megatron)"] == 4 * SEQ**2 * MICRO * 2 / 2
    assert "attention score buffer (megatron)" not in {t.name for t in static_terms(TINY, cpu_layout(seq=SEQ), "only")}
    assert "attention score buffer (megatron)" not in {t.name for t in static_terms(TINY, Layout(seq=SEQ), "only")}


# 8 experts of FFN 32, top-2, on TINY's attention
MOE = replace(TINY, layers=2, num_experts=8, moe_topk=2, moe_ffn=32)


def test_moe_parameters_by_hand():
    assert expert_parameters(MOE) == 3 * 64 * 32 == 6144
    # qkv 8320 + proj 4096 + norms 128 + router 8*64 + 8 experts
    assert layer_parameters(MOE) == 8320 + 4096 + 128 + 512 + 8 * 6144 == 62208
    lay = Layout(tensor=2, data=4, expert=2)
    assert stage_expert_parameters(MOE, lay) == 2 * (8 / 2) * 6144 / 2 == 24576
    # per layer: (qkv + proj + norms) / T + the router whole; + embedding and output layer / T + final norm
    assert stage_parameters(MOE, lay, "only") == 2 * ((8320 + 4096 + 128) / 2 + 512) + 24576 + 2 * 256 * 64 / 2 + 64
    assert expert_data_parallel(lay) == 2
    p, pe = 54592, 24576
    terms = {t.name: t.bytes for t in static_terms(MOE, lay, "only")}
    assert terms == {"weights": 2 * p, "main grads (fp32)": 4 * p, "optimizer state": (p - pe) * 12 / 4 + pe * 12 / 2}
    assert stage_parameters(replace(MOE, num_experts=0), Layout(), "only") == stage_parameters(TINY, Layout(), "only") / 2 + (
        2 * 256 * 64 + 64) / 2  # dense again: 2 of TINY's 4 layers


def test_moe_activations_by_hand():
    lay = cpu_layout(seq=SEQ, micro_batch=MICRO)
    t = SEQ * MICRO  # 64 tokens, each to 2 experts
    router = t * 8 * (4 + 4 + 1)  # fp32 logits + probabilities + the bool routing map
    dispatched = 2 * t * 2 * 64 * 4  # the experts' input and output, t*k rows of h
    experts = t * 2 * 5 * 32 * 4  # SwiGLU on t*k rows of width F
    assert moe_activation_bytes(MOE, lay) == router + dispatched + experts == 152064
    # the MoE term replaces TINY's dense 5f; norms, attention and scores stay
    assert layer_activation_bytes(MOE, lay) == layer_activation_bytes(TINY, lay) - 5 * 160 * t * 4 + 152064
    # TP2 + SP: the router's tokens / 2 (sequence shard), the dispatched rows gathered (whole), experts' FFN / 2
    sp = replace(lay, tensor=2, sequence_parallel=True)
    assert moe_activation_bytes(MOE, sp) == router / 2 + dispatched + experts / 2
    assert moe_activation_bytes(TINY, lay) == 0
    assert layer_activation_bytes(MOE, lay, "full") == t * 64 * 4


def test_moe_shape_from_spec_and_args():
    from types import SimpleNamespace

    spec = SimpleNamespace(layers=2, hidden=64, ffn_hidden=160, heads=4, kv_heads=2, vocab=250, tied_embeddings=False,
                           head_dim=0, family="qwen3_moe", num_experts=8, moe_topk=2, moe_ffn=32)
    shape = ModelShape.from_spec(spec)
    assert (shape.vocab, shape.num_experts, shape.moe_topk, shape.moe_ffn, shape.qkv_bias) == (256, 8, 2, 32, False)
    assert not ModelShape.from_spec(SimpleNamespace(**{**vars(spec), "num_experts": 0, "moe_topk": 0, "moe_ffn": 0})).is_moe
    args = SimpleNamespace(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4, num_query_groups=2,
                           padded_vocab_size=256, vocab_size=250, tie_word_embeddings=False, kv_channels=16, qkv_bias=False,
                           num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32)
    assert ModelShape.from_args(args) == replace(shape, head_dim=16)


def test_moe_layouts_are_checked():
    with pytest.raises(MemoryModelError, match="parallel.expert=2 needs a mixture-of-experts"):
        estimate(TINY, Layout(data=2, expert=2))
    with pytest.raises(MemoryModelError, match="parallel.expert=4 must divide"):
        estimate(MOE, Layout(data=2, expert=4))
    assert "EP2" in Layout(data=2, expert=2).name()


def test_planner_uses_expert_parallelism_for_a_mixture_of_experts():
    from megatron_sft.recipes.models import get_model

    m = ModelShape.from_spec(get_model("qwen3-30b-a3b"))
    assert m.is_moe and m.num_experts == 128
    plan = plan_memory(m, 1, 8, 80, 4096, 64, 1)
    lay = plan.layout
    assert lay.expert > 1 and m.num_experts % lay.expert == 0 and lay.data % lay.expert == 0
    # the same layout without EP does not fit; EP shrinks the expert weights and their gradients
    no_ep = estimate(m, replace(lay, expert=1))
    assert not no_ep.fits(plan.budget_bytes) and no_ep.peak > plan.chosen.peak
    assert {est.layout.expert for est, _ in plan.rejected} >= {1, 2}
    dense = plan_memory(ModelShape.from_spec(get_model("qwen2.5-1.5b")), 1, 8, 80, 2048, 256, 4)
    assert dense.layout.expert == 1 and all(est.layout.expert == 1 for est, _ in dense.rejected)
