"""Qwen3-MoE on megatron-core's MoELayer: HF's router equals megatron-core's settings, logits equal HF's at every
TP x EP (x PP) layout with no capacity limit (and differ exactly when a capacity limit drops tokens), expert
parallelism is validated by name, and training gives the same losses and weights at 1 process, EP=2 and DP=2.

(HF -> mcore -> HF bit-exactness in fp32 and bf16 and TP=1 / TP=2 / TP=2 x PP=2 logits run for the `qwen3_moe`
entry in tests/test_architectures.py, with every other architecture.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_sft.launch import run_local_workers
from megatron_sft.model.architectures import architecture, parameter_count
from megatron_sft.model.args import ModelArgs, UnsupportedModelError
from megatron_sft.model.builder import moe_settings
from megatron_sft.testing.hub_configs import HUB_CONFIGS, save_hub_shaped_model
from megatron_sft.testing.moe_check import merged, moe_logits_worker
from megatron_sft.testing.train_check import checkpoint_tensors, logged, make_tiny_run_inputs, tiny_config, train_worker

INPUT_IDS = torch.randint(0, 32768, (2, 24), generator=torch.Generator().manual_seed(0))
TINY = architecture("qwen3_moe").tiny_config
# (TP, EP, PP, capacity factor): no capacity limit is exactly HF; 1.0 drops tokens (8 experts, top-2, 48 tokens)
DEFAULT_CASES = [(1, 1, 1, None), (1, 2, 1, None), (2, 1, 1, None), (1, 2, 1, 1.0)]
SLOW_CASES = [(2, 2, 1, None), (2, 1, 2, None), (1, 4, 1, None), (2, 2, 1, 1.0)]  # 4 processes


def _args(config: dict, tmp_path: Path) -> ModelArgs:
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(json.dumps(config))
    return ModelArgs.from_hf_config(AutoConfig.from_pretrained(tmp_path))


# --- the settings: HF's routing is megatron-core's ----------------------------------------------------------

@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_megatron_routing_equals_hf_routing(norm_topk_prob, tmp_path):
    """HF's softmax -> top-k (-> / sum) against megatron-core's router function with the settings we pass."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    config = dict(TINY, norm_topk_prob=norm_topk_prob)
    settings = moe_settings(_args(config, tmp_path))
    hf_router = Qwen3MoeTopKRouter(AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"}))
    torch.nn.init.normal_(hf_router.weight)
    hidden = torch.randn(64, TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    logits, hf_weights, hf_experts = hf_router(hidden)
    probs, routing_map = topk_routing_with_score_function(
        logits, settings["moe_router_topk"], use_pre_softmax=settings["moe_router_pre_softmax"],
        scaling_factor=settings["moe_router_topk_scaling_factor"], score_function=settings["moe_router_score_function"])
    expected = torch.zeros_like(probs).scatter(1, hf_experts, hf_weights)
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    assert settings["moe_expert_capacity_factor"] is None and settings["moe_router_load_balancing_type"] == "none"


def test_qwen3_moe_config_maps_to_model_args(tmp_path):
    args = _args(HUB_CONFIGS["qwen3-30b-a3b"], tmp_path)
    assert (args.num_moe_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (128, 8, 768)
    assert args.moe_norm_topk_prob and args.moe_aux_loss_coeff == 0.001 and args.qk_layernorm and args.kv_channels == 128
    assert parameter_count(args) / 1e9 == pytest.approx(30.5, rel=0.01)
    # the model card's "3.3B activated": 3.35B (attention, router and 8 experts per layer, both embeddings)
    assert int(parameter_count(args, active=True) / 1e8) == 33


@pytest.mark.parametrize("override", [{"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}])
def test_dense_layer_mixes_are_refused_in_one_line(override, tmp_path):
    with pytest.raises(UnsupportedModelError, match="every layer as a mixture of experts") as refused:
        _args(dict(TINY, **override), tmp_path)
    assert "\n" not in str(refused.value)


def test_expert_parallel_is_checked_by_name(tmp_path):
    from megatron_sft.config import ConfigError
    from megatron_sft.train.preflight import check_experts

    args = _args(TINY, tmp_path)
    config = tiny_config(tmp_path, tmp_path, tmp_path / "out", "parallel.expert=3")
    with pytest.raises(ConfigError, match=r"parallel.expert=3 does not divide the 8 experts"):
        check_experts(args, config)
    config = tiny_config(tmp_path, tmp_path, tmp_path / "out", "parallel.expert=2", "parallel.tensor=2")
    with pytest.raises(ConfigError, match=r"--nproc 2 is not a multiple of parallel.expert x parallel.tensor"):
        check_experts(args, config, 2)
    config = tiny_config(tmp_path, tmp_path, tmp_path / "out", "parallel.tensor=2", "parallel.sequence_parallel=false")
    with pytest.raises(ConfigError, match="sequence parallelism"):
        check_experts(args, config, 2)
    dense = _args(architecture("qwen3").tiny_config, tmp_path)
    with pytest.raises(ConfigError, match="parallel.expert=2 needs a mixture-of-experts model"):
        check_experts(dense, tiny_config(tmp_path, tmp_path, tmp_path / "out", "parallel.expert=2"))


# --- logits at TP x EP x PP against the HF model ------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny Qwen3-30B-A3B-shaped model (fp32, 2 layers, 8 experts top-2), its HF logits, its checkpoint."""
    from megatron_sft.convert.hf_to_mcore import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("moe")
    model = save_hub_shaped_model(root / "hf", dict(TINY, torch_dtype="float32"))
    with torch.no_grad():
        logits = model(INPUT_IDS).logits
    run_local_workers(convert_hf_to_mcore, 1, root / "hf", root / "ckpt", timeout_s=300)
    return root / "ckpt", logits


def _check_cases(converted, cases: list, world: int) -> None:
    ckpt, hf_logits = converted
    found = merged(run_local_workers(moe_logits_worker, world, str(ckpt), cases, INPUT_IDS))
    for case in cases:
        diff = float((found[case] - hf_logits).abs().max())
        print(f"TP={case[0]} EP={case[1]} PP={case[2]} capacity={case[3]}: max |logit diff| {diff:.3g}, "
              f"dropped {found['dropped'][case]}")
        if case[3] is None:
            assert found["dropped"][case] == 0
            torch.testing.assert_close(found[case], hf_logits, rtol=1e-5, atol=1e-5, msg=lambda m: f"{case}: {m}")
        else:  # a capacity limit that drops tokens changes the output; one that drops none would not
            assert found["dropped"][case] > 0 and diff > 1e-3, (case, found["dropped"][case], diff)


def test_cases_are_the_layouts_the_readme_table_names():
    ran = {(tp, ep) for tp, ep, pp, capacity in DEFAULT_CASES + SLOW_CASES if pp == 1 and capacity is None}
    assert set(architecture("qwen3_moe").tested_expert_layouts) <= ran


def test_logits_equal_hf_at_tp_and_ep(converted):
    _check_cases(converted, DEFAULT_CASES, world=2)


@pytest.mark.slow
def test_logits_equal_hf_at_tp2_x_ep2_and_with_pipeline_stages(converted):
    _check_cases(converted, SLOW_CASES, world=4)


# --- training: layouts agree ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    return root, *make_tiny_run_inputs(root, variant="qwen3-moe-untied")


def _train(inputs, name: str, nproc: int, *overrides: str) -> tuple[dict, Path]:
    root, ckpt, data = inputs
    config = tiny_config(ckpt, data, root / name, *overrides)
    return run_local_workers(train_worker, nproc, config.to_dict(), False, timeout_s=600)[0], root / name


@pytest.fixture(scope="module")
def moe_reference(moe_run):
    summary, out = _train(moe_run, "reference", 1)
    return summary, out, checkpoint_tensors(summary["checkpoint"])


def _assert_same_run(inputs, reference, nproc: int, name: str, *overrides: str) -> None:
    ref_summary, ref_out, ref_weights = reference
    summary, out = _train(inputs, name, nproc, *overrides)
    torch.testing.assert_close(torch.tensor(summary["losses"]), torch.tensor(ref_summary["losses"]), rtol=1e-5, atol=1e-6)
    # the global grad norm (what clipping uses) counts every expert shard once
    torch.testing.assert_close(torch.tensor(logged(out, "grad_norm")), torch.tensor(logged(ref_out, "grad_norm")), rtol=1e-5, atol=0)
    if "moe_aux_loss" in (ref_out / "metrics.jsonl").read_text():  # the load-balancing loss agrees too
        torch.testing.assert_close(torch.tensor(logged(out, "moe_aux_loss")), torch.tensor(logged(ref_out, "moe_aux_loss")),
                                   rtol=1e-5, atol=1e-7)
    weights, initial = checkpoint_tensors(summary["checkpoint"]), checkpoint_tensors(inputs[1])
    assert weights.keys() == ref_weights.keys()
    for key in ref_weights:
        assert (ref_weights[key] - initial[key]).abs().max() > 0, f"{key} was not updated by the reference run"
        torch.testing.assert_close(weights[key], ref_weights[key], rtol=0, atol=2e-6, msg=lambda m, k=key: f"{name} {k}: {m}")


def test_moe_training_logs_the_aux_loss_apart_from_the_objective(moe_reference):
    summary, out, _ = moe_reference
    aux = logged(out, "moe_aux_loss")
    assert len(aux) == 2 and all(0.5 < a < 4.0 for a in aux)  # ~1 for balanced routing (E * sum f_i P_i / k)
    assert summary["losses"] == logged(out, "loss")


def test_moe_training_at_ep2_matches_one_process(moe_run, moe_reference):
    _assert_same_run(moe_run, moe_reference, 2, "ep2", "parallel.expert=2")


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,overrides", [
    ("dp2", 2, ()), ("ep2_dp2", 4, ("parallel.expert=2",)), ("tp2_sp", 2, ("parallel.tensor=2",)),
])
def test_moe_training_layouts_match_one_process(moe_run, moe_reference, name, nproc, overrides):
    _assert_same_run(moe_run, moe_reference, nproc, name, *overrides)


@pytest.mark.slow
def test_dense_qwen3_training_at_dp2_matches_one_process(tmp_path):
    inputs = (tmp_path, *make_tiny_run_inputs(tmp_path, variant="qwen3-tied-gqa"))
    summary, out = _train(inputs, "reference", 1)
    assert "moe_aux_loss" not in (out / "metrics.jsonl").read_text()
    _assert_same_run(inputs, (summary, out, checkpoint_tensors(summary["checkpoint"])), 2, "dp2")


@pytest.mark.slow
def test_moe_resume_at_ep2_is_bit_exact_and_exports(moe_run):
    """3 steps at EP=2 == 2 steps, then a resume for the third (optimizer state with experts sharded over EP); the
    final checkpoint exports to an HF model that transformers loads."""
    from transformers import AutoModelForCausalLM

    root, ckpt, data = moe_run
    common = ["parallel.expert=2", "checkpoint.every_steps=1", "checkpoint.keep_last=5"]

    def run(name: str, steps: int, resume: bool, *extra: str) -> dict:
        config = tiny_config(ckpt, data, root / name, *common, f"train.max_steps={steps}", *extra)
        return run_local_workers(train_worker, 2, config.to_dict(), resume, timeout_s=600)[0]

    whole = run("ep2_whole", 3, False, "checkpoint.export_hf=true")
    run("ep2_resumed", 2, False)
    resumed = run("ep2_resumed", 3, True)
    assert resumed["losses"] == whole["losses"][2:]
    final, other = checkpoint_tensors(whole["checkpoint"]), checkpoint_tensors(resumed["checkpoint"])
    assert all(torch.equal(final[k], other[k]) for k in final)
    exported = AutoModelForCausalLM.from_pretrained(whole["export"], dtype=torch.float32)
    assert exported.config.num_experts == 4
