"""The architecture table: every entry converts HF -> mcore -> HF bit-exact and gives the HF model's logits at its
tested layouts, on a tiny random model shaped like a real one (real vocabulary, head_dim, rope); the registry,
the README table and the refusals come from the same table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_sft.launch import run_local_workers
from megatron_sft.model.architectures import ARCHITECTURES, architecture, expected_hf_shapes, readme_table
from megatron_sft.model.args import ModelArgs, UnsupportedModelError
from megatron_sft.recipes.models import get_model
from megatron_sft.testing.architecture_check import convert_all_worker, logits_at_layouts_worker, merge_results
from megatron_sft.testing.convert_check import assert_same_tensors, safetensors_tensors
from megatron_sft.testing.hub_configs import HUB_CONFIGS, head_dim, save_hub_shaped_model, shrunk

ROOT = Path(__file__).resolve().parents[1]
# every tiny config of the table, plus DeepSeek-Math-7B (Llama architecture: its own vocabulary, MHA, plain rope)
CASES = {a.model_type: a.tiny_config for a in ARCHITECTURES}
CASES["deepseek-math-7b"] = shrunk(HUB_CONFIGS["deepseek-math-7b"], layers=2, heads=2)
# the default run keeps the new architectures (and Llama 3.2); Qwen2 and Llama 3.1 shapes are also covered by
# tests/test_convert.py and tests/test_export_readers.py, DeepSeek-Math's settings by the ModelArgs test below
SLOW_CASES = ("qwen2", "deepseek-math-7b")
DEFAULT_CASES = tuple(c for c in CASES if c not in SLOW_CASES)
INPUT_IDS = torch.randint(0, 32768, (2, 24), generator=torch.Generator().manual_seed(0))  # below every vocabulary


def _layouts(case: str, slow: bool) -> list[tuple[int, int]]:
    arch = architecture(CASES[case]["model_type"])
    return [layout for layout in arch.tested_layouts if (layout[1] > 1) == slow]


def _config(config: dict, hf_config_from: Path) -> ModelArgs:
    from transformers import AutoConfig

    hf_config_from.mkdir(parents=True, exist_ok=True)
    (hf_config_from / "config.json").write_text(json.dumps(config))
    return ModelArgs.from_hf_config(AutoConfig.from_pretrained(hf_config_from))


def _build(root: Path, cases: tuple[str, ...]) -> dict:
    """Per case: an fp32 HF model (2 layers) with its logits on INPUT_IDS, and a bf16 one (1 layer, the real
    dtype); all converted to megatron and exported back in one process."""
    out, jobs = {}, []
    for case in cases:
        config = CASES[case]
        for dtype, layers in (("float32", 2), ("bfloat16", 1)):
            hf, ckpt, export = (root / f"{case}-{dtype}-{kind}" for kind in ("hf", "ckpt", "export"))
            model = save_hub_shaped_model(hf, dict(config, torch_dtype=dtype, num_hidden_layers=layers))
            entry = out.setdefault(case, {})[dtype] = dict(hf=hf, ckpt=ckpt, export=export)
            if dtype == "float32":
                with torch.no_grad():
                    entry["logits"] = model(INPUT_IDS).logits
            jobs.append((str(hf), str(ckpt), str(export)))
    run_local_workers(convert_all_worker, 1, jobs)
    return out


def _logits(built: dict, slow: bool, world: int) -> dict:
    """Megatron logits of every built fp32 checkpoint at its default (or slow) layouts, in one process group."""
    ckpts = [str(built[case]["float32"]["ckpt"]) for case in built]
    layouts = sorted({layout for case in built for layout in _layouts(case, slow)})
    return merge_results(run_local_workers(logits_at_layouts_worker, world, ckpts, layouts, INPUT_IDS))


def _check_logits(built: dict, logits: dict, case: str, slow: bool) -> None:
    paths = built[case]["float32"]
    for tp, pp in _layouts(case, slow):
        got = logits[(str(paths["ckpt"]), tp, pp)]
        torch.testing.assert_close(got, paths["logits"], atol=1e-5, rtol=1e-5, msg=lambda m: f"TP={tp} PP={pp}: {m}")


def _check_round_trip(paths: dict, case: str, dtype: str) -> None:
    original = safetensors_tensors(paths["hf"])
    original = safetensors_tensors(paths["hf"])
    assert {t.dtype for t in original.values()} == {getattr(torch, dtype)}
    assert original["model.embed_tokens.weight"].shape[0] == CASES[case]["vocab_size"]
    assert_same_tensors(original, safetensors_tensors(paths["export"]))
    assert json.loads((paths["export"] / "config.json").read_text())["architectures"] == CASES[case]["architectures"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("arch"), DEFAULT_CASES)


@pytest.fixture(scope="module")
def logits(built):
    """TP=1 and TP=2 from one 2-process group (TP=1 runs there as two data-parallel replicas)."""
    return _logits(built, slow=False, world=2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_hf_to_mcore_to_hf_is_bit_exact(built, case, dtype):
    _check_round_trip(built[case][dtype], case, dtype)


@pytest.mark.parametrize("case", DEFAULT_CASES)
def test_megatron_logits_equal_hf_logits(built, logits, case):
    _check_logits(built, logits, case, slow=False)


@pytest.mark.slow
def test_megatron_logits_equal_hf_logits_with_pipeline_stages(built):
    """TP=2 x PP=2 (4 processes) for every default case."""
    found = _logits(built, slow=True, world=4)
    for case in DEFAULT_CASES:
        _check_logits(built, found, case, slow=True)


@pytest.mark.slow
def test_remaining_cases_round_trip_and_logits_at_every_layout(tmp_path):
    """Qwen2 (Qwen2.5-1.5B shape, real vocabulary) and DeepSeek-Math-7B: the same checks at every tested layout."""
    built = _build(tmp_path, SLOW_CASES)
    found = {**_logits(built, slow=False, world=2), **_logits(built, slow=True, world=4)}
    for case in SLOW_CASES:
        for dtype in ("float32", "bfloat16"):
            _check_round_trip(built[case][dtype], case, dtype)
        _check_logits(built, found, case, slow=False)
        _check_logits(built, found, case, slow=True)


# --- the table itself -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.model_type)
def test_tiny_config_is_shaped_like_the_real_model(arch):
    real, tiny = HUB_CONFIGS[arch.shaped_like], arch.tiny_config
    assert get_model(arch.shaped_like).family == arch.model_type
    for key in ("architectures", "model_type", "vocab_size", "rope_theta", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings", "torch_dtype", "sliding_window", "use_sliding_window"):
        assert tiny.get(key) == real.get(key), key
    assert (tiny.get("rope_scaling"), head_dim(tiny)) == (real.get("rope_scaling"), head_dim(real))
    assert tiny["num_hidden_layers"] <= 2 and tiny["num_key_value_heads"] % 2 == 0  # TP=2 divides the KV heads


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.model_type)
def test_parameter_count_is_the_hf_models(arch):
    """The table's tensors are exactly the HF model's parameters (a real transformers model, on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in arch.tiny_config.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    args = ModelArgs.from_hf_config(config)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == _as_in_memory(expected_hf_shapes(args))


def _as_in_memory(shapes: dict) -> dict:
    """The checkpoint's per-expert tensors (``mlp.experts.{e}.gate_proj.weight`` ..., what save_pretrained writes
    and the hub holds) as transformers 5 holds them in memory: ``mlp.experts.gate_up_proj`` [E, 2F, H] and
    ``mlp.experts.down_proj`` [E, H, F]."""
    out: dict = {}
    for name, shape in shapes.items():
        prefix, sep, rest = name.partition(".mlp.experts.")
        if not sep:
            out[name] = shape
            continue
        kind = rest.split(".")[1]
        fused, rows = ("down_proj", shape[0]) if kind == "down_proj" else ("gate_up_proj", 2 * shape[0])
        count = out.get(f"{prefix}{sep}{fused}", (0,))[0]
        out[f"{prefix}{sep}{fused}"] = (count + (kind != "up_proj"), rows, shape[1])
    return out


@pytest.mark.parametrize("key", [k for k in HUB_CONFIGS])
def test_registry_matches_the_hub_config(key):
    spec, real = get_model(key), HUB_CONFIGS[key]
    assert (spec.layers, spec.hidden, spec.ffn_hidden, spec.heads, spec.kv_heads, spec.vocab, spec.tied_embeddings) == (
        real["num_hidden_layers"], real["hidden_size"], real["intermediate_size"], real["num_attention_heads"],
        real["num_key_value_heads"], real["vocab_size"], real["tie_word_embeddings"])
    assert spec.model_args().kv_channels == head_dim(real) and spec.family == real["model_type"]
    assert (spec.num_experts, spec.moe_topk, spec.moe_ffn) == (
        real.get("num_experts", 0), real.get("num_experts_per_tok", 0), real.get("moe_intermediate_size", 0))


def test_readme_table_is_generated_from_the_architecture_table():
    readme = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    table = readme_table().splitlines()
    start = readme.index(table[0]) if table[0] in readme else -1
    assert readme[start:start + len(table) + 1] == table + [""], (
        "README's architecture table is stale; paste the output of: .venv/bin/python -c "
        "'from megatron_sft.model.architectures import readme_table; print(readme_table())'")


@pytest.mark.parametrize("table", sorted({a.tensors for a in ARCHITECTURES}, key=len), ids=lambda t: f"{len(t)}-rules")
def test_one_tensor_table_names_each_tensor_once(table):
    assert len({r.mcore for r in table}) == len(table)
    hf = [n for r in table for n in r.hf]
    assert len(set(hf)) == len(hf) and all(len(r.hf) == len(r.shapes) for r in table)
    # an expert index only inside a layer, on both sides
    assert all(r.per_layer and all("{e}" in n for n in r.hf) for r in table if r.per_expert)


# --- what each architecture reads from its config, and what it refuses --------------------------------------

def test_qwen3_head_dim_is_decoupled_and_qk_norm_on(tmp_path):
    args = _config(HUB_CONFIGS["qwen3-0.6b"], tmp_path)
    assert (args.kv_channels, args.hidden_size, args.num_attention_heads) == (128, 1024, 16)
    assert args.qk_layernorm and not args.qkv_bias and args.tie_word_embeddings and args.rope_theta == 1e6
    with pytest.raises(UnsupportedModelError, match="attention_bias=True is not supported for Qwen3ForCausalLM"):
        _config(dict(HUB_CONFIGS["qwen3-0.6b"], attention_bias=True), tmp_path)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        _config(dict(HUB_CONFIGS["qwen3-0.6b"], use_sliding_window=True, sliding_window=4096), tmp_path)


def test_llama_32_is_tied_with_llama3_rope_and_deepseek_math_keeps_its_vocabulary(tmp_path):
    llama = _config(HUB_CONFIGS["llama-3.2-1b"], tmp_path / "llama")
    assert llama.tie_word_embeddings and llama.kv_channels == 64 and not llama.qk_layernorm
    assert llama.rope_parameters["rope_type"] == "llama3" and llama.rope_parameters["factor"] == 32.0
    assert llama.rope_inv_freq() is not None
    deepseek = _config(HUB_CONFIGS["deepseek-math-7b"], tmp_path / "deepseek")
    assert (deepseek.vocab_size, deepseek.padded_vocab_size, deepseek.rope_theta) == (102400, 102400, 10000.0)
    assert deepseek.rope_inv_freq() is None and deepseek.num_query_groups == 32 and not deepseek.tie_word_embeddings


def test_mistral_sliding_window_is_refused_and_v03_accepted(tmp_path):
    assert _config(HUB_CONFIGS["mistral-7b-v0.3"], tmp_path).kv_channels == 128
    v01 = dict(HUB_CONFIGS["mistral-7b-v0.3"], sliding_window=4096, vocab_size=32000, rope_theta=10000.0)  # Mistral-7B-v0.1
    with pytest.raises(UnsupportedModelError, match=r"sliding-window attention \(sliding_window=4096 < 32768 positions"):
        _config(v01, tmp_path)


def test_anything_else_is_refused_naming_the_supported_architectures(tmp_path):
    gemma = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}
    with pytest.raises(UnsupportedModelError, match="Gemma2ForCausalLM") as refused:
        _config(gemma, tmp_path)
    for arch in ARCHITECTURES:
        assert arch.hf_class in str(refused.value)


@pytest.mark.parametrize("key", ["qwen3-0.6b", "qwen3-8b", "mistral-7b-v0.3", "llama-3.2-1b", "deepseek-math-7b",
                                 "qwen3-30b-a3b"])
def test_new_registry_keys_plan_a_job(key):
    """What `megatron-sft sbatch --model KEY` plans (the library call, without the subprocess)."""
    from megatron_sft.recipes.jobs import SlurmOptions, plan_job
    from megatron_sft.recipes.sweeps import SweepRun

    # Qwen3-30B-A3B's 30.5B weights + Adam state (18 bytes each) exceed 8 x 80 GB at the planner's 50% budget
    nodes = 2 if get_model(key).num_experts else 1
    job = plan_job("job", "math", [SweepRun(key, "nll")], SlurmOptions(nodes=nodes), "megatron-sft sbatch")
    (run,) = job.runs
    assert run.model.key == key and run.config["parallel"]["tensor"] == run.plan.tensor
    assert get_model(key).heads % run.plan.tensor == 0 and get_model(key).kv_heads % run.plan.tensor == 0
