"""Model registry, parallel planning, recipes, sweeps, examples/ and the sbatch/sweep command lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sft.recipes.datasets import RECIPES
from megatron_sft.recipes.models import MODELS, UnknownModelError, get_model, model_keys
from megatron_sft.recipes.parallel_plan import PlanError, fit_micro_batch, plan_parallel
from megatron_sft.recipes.sweeps import SweepError, sweep_runs
from megatron_sft.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "megatron_sft"]

# parameter counts published on the models' Hugging Face pages (billions)
PUBLISHED_BILLIONS = {
    "qwen2.5-math-1.5b": 1.54, "qwen2.5-math-7b": 7.62, "qwen2.5-1.5b": 1.54, "qwen2.5-3b": 3.09,
    "qwen2.5-7b": 7.62, "qwen2.5-14b": 14.7, "qwen2.5-coder-7b": 7.61, "llama-3.1-8b": 8.03, "llama-3.2-3b": 3.21,
    "deepseek-math-7b": 6.91, "llama-3.2-1b": 1.24, "qwen3-0.6b": 0.6, "qwen3-8b": 8.2, "mistral-7b-v0.3": 7.25,
    "qwen3-30b-a3b": 30.5,
}
REFERENCE_KEYS = ["qwen-2.5-math-1.5b", "qwen-2.5-math-7b", "qwen-2.5-1.5b", "qwen-2.5-7b", "qwen2.5-3b", "qwen2.5-7b",
                  "qwen2.5-14b", "qwen2.5-coder-7b", "llama-3.1-8b", "llama-3.2-3b", "deepseek-math-7b"]


@pytest.mark.parametrize("spec", MODELS, ids=lambda m: m.key)
def test_parameter_count_matches_the_published_size(spec):
    assert spec.parameters / 1e9 == pytest.approx(PUBLISHED_BILLIONS[spec.key], rel=0.01)


def test_parameter_formula_matches_a_real_hf_model():
    """The same formula on a small HF Qwen2 and Llama built from configs counts what torch counts."""
    from megatron_sft.recipes.models import ModelSpec
    from megatron_sft.toy.tiny_models import save_tiny_hf_model

    import tempfile

    for variant, family in (("qwen2-tied-gqa", "qwen2"), ("llama-untied-mha-rope-scaled", "llama")):
        with tempfile.TemporaryDirectory() as tmp:
            model = save_tiny_hf_model(tmp, variant)
        c = model.config
        spec = ModelSpec(("x",), "x", family, c.num_hidden_layers, c.hidden_size, c.intermediate_size,
                         c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings)
        assert spec.parameters == sum(p.numel() for p in model.parameters()), variant


def test_every_reference_key_resolves_and_spellings_are_forgiven():
    for key in REFERENCE_KEYS:
        assert get_model(key).hf_id.split("/")[0] in ("Qwen", "meta-llama", "deepseek-ai")
    assert get_model("qwen2.5-math-1.5b") is get_model("qwen-2.5-math-1.5b")
    assert get_model("Qwen-2.5-7B") is get_model("qwen2.5-7b")
    with pytest.raises(UnknownModelError, match="unknown model key 'gpt-2'; known keys: qwen2.5-math-1.5b"):
        get_model("gpt-2")
    assert len(model_keys()) == len(set(model_keys()))


@pytest.mark.parametrize("key,nodes,expected", [
    ("qwen-2.5-math-1.5b", 1, (1, 1, 8)), ("qwen2.5-3b", 1, (1, 1, 8)), ("qwen-2.5-7b", 1, (2, 1, 4)),
    ("llama-3.1-8b", 1, (2, 1, 4)), ("qwen2.5-14b", 1, (8, 1, 1)), ("qwen2.5-14b", 2, (4, 1, 4)),
])
def test_plan_picks_tp_by_model_size(key, nodes, expected):
    plan = plan_parallel(get_model(key), nodes, 8, 80.0, 256, 4)
    assert (plan.tensor, plan.pipeline, plan.data) == expected
    assert plan.sequence_parallel == (plan.tensor > 1)
    assert plan.state_gib_per_gpu <= 40.0


def test_plan_respects_heads_and_falls_back_to_pipeline_or_fails_clearly():
    # Qwen2.5-3B has 2 KV heads: TP is at most 2, so on small GPUs the plan adds pipeline stages
    plan = plan_parallel(get_model("qwen2.5-3b"), 1, 8, 24.0, 256, 4)
    assert plan.tensor == 2 and plan.pipeline > 1 and get_model("qwen2.5-3b").layers % plan.pipeline == 0
    with pytest.raises(PlanError, match="does not fit 1 node\\(s\\) x 1 GPUs of 80 GiB.*add nodes"):
        plan_parallel(get_model("qwen2.5-14b"), 1, 1, 80.0, 256, 4)


def test_micro_batch_is_lowered_to_split_the_global_batch():
    assert fit_micro_batch(224, 14, 8) == 14  # 224 / 8 ranks = 28 per rank = 2 x 14
    assert fit_micro_batch(224, 16, 8) == 14
    assert fit_micro_batch(256, 16, 3 * 8 // 3) == 16
    with pytest.raises(PlanError, match="cannot be split over 3"):
        fit_micro_batch(256, 4, 3)


def test_sweeps_cover_the_paper_grids_and_check_values():
    alphas = [r.objective for r in sweep_runs("alpha", "math")]
    assert alphas[0] == "family:0.1" and alphas[-1] == "family:10" and len(alphas) == 19
    assert {r.model_key for r in sweep_runs("alpha", "figfont")} == {"qwen2.5-7b"}
    assert len(sweep_runs("threshold", "math")) == 36 and len(sweep_runs("percentile", "math")) == 54
    scale = sweep_runs("scale", "instruction_tuning")
    assert [(get_model(r.model_key).key, r.objective) for r in scale][::2] == [
        ("qwen2.5-3b", "nll"), ("qwen2.5-7b", "nll"), ("qwen2.5-14b", "nll")]
    from megatron_sft.recipes.training_config import recipe_micro_batch

    assert RECIPES["instruction_tuning"].settings("qwen-2.5-7b").lr == 5e-6  # the reference spells it qwen2.5-7b
    assert recipe_micro_batch("instruction_tuning", "qwen2.5-3b") == (224, 14)
    assert [r.objective for r in sweep_runs("threshold", "math", values=[0.5])] == [
        "neg_p_above:0.5", "neg_p_below:0.5", "nll_above:0.5", "nll_below:0.5"]
    from megatron_sft.objectives import ObjectiveSpecError

    with pytest.raises(ObjectiveSpecError):
        sweep_runs("threshold", "math", values=[1.5])  # a quantile above 1
    with pytest.raises(SweepError, match="unknown sweep 'beta'"):
        sweep_runs("beta", "math")
    with pytest.raises(SweepError, match="no default model for dataset 'coder'"):
        sweep_runs("alpha", "coder")


def test_examples_are_in_sync_with_the_recipes_and_load():
    from megatron_sft.recipes.examples import MULTI_NODE, example_files

    files = example_files()
    assert len(files) == sum(len(r.models) for r in RECIPES.values()) + len(MULTI_NODE)
    written = {str(p.relative_to(ROOT / "examples")) for p in (ROOT / "examples").glob("*/*.yaml")}
    assert written == set(files), "stale or missing examples: python tools/write_examples.py"
    for relative, text in files.items():
        path = ROOT / "examples" / relative
        assert path.is_file(), f"{path} missing: python tools/write_examples.py"
        assert path.read_text() == text, f"{path} is stale: python tools/write_examples.py"
        config = load_config(path)
        gpus = 8 * (2 if relative.endswith("-2nodes.yaml") else 1)
        data_parallel = gpus // (config.parallel.tensor * config.parallel.pipeline)
        assert config.train.global_batch_size % (config.train.micro_batch_size * data_parallel) == 0
    figfont_llama = yaml.safe_load((ROOT / "examples/figfont/llama-3.1-8b.yaml").read_text())
    assert figfont_llama["optim"]["lr"] == 2e-5 and figfont_llama["optim"]["weight_decay"] == 1e-5
    assert figfont_llama["data"]["template"] == "plain" and "<|start_header_id|>user" in figfont_llama["data"]["plain_template"]


def run_cli(*args, cwd):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_sbatch_command_writes_a_job_and_explains_bad_input(tmp_path):
    done = run_cli("sbatch", "--dataset", "math", "--model", "qwen-2.5-math-7b", "--objective", "GeneralFamily-8",
                   "--nodes", "2", "--time", "48:00:00", "--partition", "gpu", cwd=tmp_path)  # the reference's key
    assert done.returncode == 0, done.stdout + done.stderr
    job = tmp_path / "jobs" / "math_qwen2.5-math-7b_family-8"  # named with the canonical key
    config = yaml.safe_load((job / "configs" / "math_qwen2.5-math-7b_family-8.yaml").read_text())
    # the memory model's plan (memory/plan.py): 7.6B fits one 80 GB GPU per replica at 3,072 tokens
    assert config["objective"]["name"] == "family:8" and config["parallel"]["tensor"] == 1
    assert config["model"]["recompute"] == "none" and "per GPU" in (job / "memory_plan.txt").read_text()
    assert config["checkpoint"]["export_hf"] is False  # the export is its own job
    submit = (job / "submit.sh").read_text()
    assert "--nodes=2 --gpus-per-node=8 --time=48:00:00" in submit and "--partition=gpu" in submit
    assert (job / "models.txt").read_text().split() == ["models/Qwen2.5-Math-7B", "ckpt/qwen2.5-math-7b",
                                                        "Qwen/Qwen2.5-Math-7B"]
    assert "run `megatron-sft prepare math --out data/math` first" in done.stdout
    again = run_cli("sbatch", "--dataset", "math", "--model", "qwen-2.5-math-7b", "--objective", "nll",
                    "--job-dir", str(job), cwd=tmp_path)
    assert again.returncode == 2 and "already holds a job; pass --overwrite" in again.stdout
    again = run_cli("sbatch", "--dataset", "math", "--model", "qwen-2.5-math-7b", "--objective", "nll",
                    "--job-dir", str(job), "--overwrite", cwd=tmp_path)
    assert again.returncode == 0 and [p.name for p in (job / "configs").iterdir()] == ["math_qwen2.5-math-7b_nll.yaml"]

    for args, message in [
        (("--model", "gpt-2", "--objective", "nll"), "unknown model key 'gpt-2'"),
        (("--model", "qwen2.5-14b", "--objective", "nll", "--gpus-per-node", "1"), "no layout fits 1 node(s) x 1 GPUs of 80 GiB"),
        (("--model", "qwen-2.5-7b", "--objective", "nll", "--tp", "8"), "--tp 8 must divide"),
        (("--model", "qwen-2.5-7b", "--objective", "p^2"), "p^2"),
        (("--model", "qwen-2.5-7b", "--objective", "nll", "--set", "optim.lr=-1"), "optim.lr must be > 0"),
    ]:
        failed = run_cli("sbatch", "--dataset", "math", *args, "--dry-run", cwd=tmp_path)
        assert failed.returncode == 2 and message in failed.stdout, (args, failed.stdout, failed.stderr)
    failed = run_cli("sbatch", "--dataset", "poetry", "--model", "qwen-2.5-7b", "--objective", "nll", cwd=tmp_path)
    assert failed.returncode == 2 and "unknown dataset 'poetry'" in failed.stdout


def test_sbatch_submit_without_slurm_says_so(tmp_path):
    done = subprocess.run([*CLI, "sbatch", "--dataset", "figfont", "--model", "qwen-2.5-7b", "--objective", "nll",
                           "--submit"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 2 and "sbatch is not on PATH" in done.stdout, done.stdout + done.stderr
    assert (tmp_path / "jobs" / "figfont_qwen2.5-7b_nll" / "submit.sh").is_file()


def test_sweep_dry_run_prints_every_config_and_writes_nothing(tmp_path):
    done = run_cli("sweep", "alpha", "--dataset", "figfont", "--values", "0.5,2", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "configs/figfont_qwen2.5-7b_family-0.5.yaml" in done.stdout
    assert "configs/figfont_qwen2.5-7b_family-2.yaml" in done.stdout and "--array=0-1" in done.stdout
    assert not (tmp_path / "jobs").exists()
    bad = run_cli("sweep", "alpha", "--values", "0.5,x", cwd=tmp_path)
    assert bad.returncode == 2 and "expected comma-separated numbers" in bad.stdout


def test_eval_stage_runs_each_datasets_benchmarks():
    from megatron_sft.recipes.datasets import RECIPES
    from megatron_sft.recipes.jobs import JobError, eval_stage

    assert eval_stage("math", None) == (["math500", "minerva", "olympiadbench", "aime24", "amc23"], [])
    assert eval_stage("medical", None)[0] == ["medqa", "medmcqa", "mmlu_pro_medical", "gpqa_medical",
                                               "medbullets_op4", "medbullets_op5", "pubmedqa"]
    assert eval_stage("coder", None) == (["humaneval_plus", "mbpp_plus"], [])
    assert eval_stage("instruction_tuning", None) == (["alpacaeval"], [])  # judged (eval --judge-model / --judge-url)
    assert eval_stage("low_resource_language", None) == (
        [f"mmlu_prox_{lang}" for lang in ("mar", "tel", "nep", "swa", "wol", "yor", "zul")], [])
    assert eval_stage("math", "none") == ([], []) and eval_stage("math", "aime24,amc23") == (["aime24", "amc23"], [])
    with pytest.raises(JobError, match="--eval-benchmarks: unknown benchmark"):
        eval_stage("math", "gsm8k")
    for name in RECIPES:
        eval_stage(name, None)


def test_headline_sweep_as_reference_is_the_papers_pair_with_the_reference_normalization(tmp_path):
    """`sbatch sweep headline --as-reference`: NLL and -p on Qwen2.5-Math-1.5B, both trained with the reference
    trainer's normalization (micro_batch_sum), evaluated on the five math benchmarks."""
    assert [r.objective for r in sweep_runs("headline", "math")] == ["nll", "neg_p"]
    done = run_cli("sweep", "headline", "--as-reference", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    job = tmp_path / "jobs" / "sweep-headline_math_qwen2.5-math-1.5b"
    configs = sorted((job / "configs").iterdir())
    assert [c.name for c in configs] == ["math_qwen2.5-math-1.5b_neg_p.yaml", "math_qwen2.5-math-1.5b_nll.yaml"]
    for path in configs:
        assert yaml.safe_load(path.read_text())["objective"]["normalization"] == "micro_batch_sum"
    assert '"$job_dir/eval.sbatch" math500,minerva,olympiadbench,aime24,amc23' in (job / "submit.sh").read_text()
    plain = run_cli("sweep", "headline", "--dry-run", cwd=tmp_path)
    assert "normalization: micro_batch_sum" not in plain.stdout
    assert run_cli("sweep", "headline", "--values", "1", "--dry-run", cwd=tmp_path).returncode == 2
