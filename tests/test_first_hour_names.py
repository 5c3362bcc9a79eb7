"""Issue 23, items 7-9: one capability rule, canonical model keys, sweep job names, example headers (7); convert's
help, sbatch --dry-run listings, partitions, sequence parallelism by default, why recipes do not pack (8); the
`plot` command, the 2-node 14B example and the full-parameter statement (9). Fast: no training runs."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_sft.capability import ALTERNATIVES, MS_FROM, MW_BELOW, advise, region_objective
from megatron_sft.recipes.datasets import RECIPES
from megatron_sft.recipes.models import MODELS, get_model

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "megatron_sft"]
DOCS = [ROOT / "README.md", ROOT / "examples" / "README.md", ROOT / "slurm" / "README.md"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=180)


# ---- item 7: one capability rule -------------------------------------------------------------------------------

def test_demo_probe_and_recipes_share_one_capability_rule():
    """The issue's case: the demo called 0.597 "capable, use -p" while the probe called 0.615 intermediate."""
    from megatron_sft import demo, probe

    assert advise(0.597).region == advise(0.615).region == "model-intermediate"
    for mean_p in (0.0, 0.01, MW_BELOW - 1e-9, MW_BELOW, 0.5, 0.597, 0.615, MS_FROM - 1e-9, MS_FROM, 0.8, 1.0):
        advice = advise(mean_p)
        assert probe.recommend(mean_p) == (advice.label, advice.objective, advice.reasoning)
    assert probe.MS_FROM == MS_FROM and probe.MW_BELOW == MW_BELOW
    source = inspect.getsource(demo)
    assert "advise(" in source and ">= 0.5 else" not in source, "the demo must print the shared rule's advice"
    for recipe in RECIPES.values():
        expected = region_objective(recipe.capability) if recipe.capability else "nll"
        assert recipe.objective == expected, recipe.name
    assert RECIPES["math"].objective == "neg_p" and RECIPES["figfont"].objective == "nll"


def test_model_keys_are_the_hf_names_and_every_alias_resolves():
    for spec in MODELS:
        assert spec.key == spec.hf_id.split("/")[-1].lower().removesuffix("-base"), spec.hf_id
        for alias in (*spec.keys, spec.hf_id, spec.key.upper()):
            assert get_model(alias) is spec, alias
    assert get_model("qwen-2.5-7b").key == get_model("qwen2.5-7b").key == "qwen2.5-7b"
    assert get_model("qwen-2.5-3b").key == "qwen2.5-3b"  # the two spellings of the issue, one key
    for recipe in RECIPES.values():
        assert all(get_model(key).key == key for key in recipe.models), recipe.name
    from megatron_sft.recipes.sweeps import SWEEPS

    for sweep in SWEEPS.values():
        assert all(get_model(key).key == key for key in sweep.default_models.values()), sweep.name


def test_docs_name_only_canonical_keys_and_existing_examples():
    """Every examples/ path the READMEs show exists; keys in commands use the canonical spelling."""
    for doc in DOCS:
        text = doc.read_text()
        for path in re.findall(r"examples/[\w.-]+/[\w.-]+\.yaml", text):
            if path == "examples/DATASET/MODEL.yaml":  # the pattern, not a file
                continue
            assert (ROOT / path).is_file(), f"{doc.name} names {path}, which does not exist"
        for line in text.splitlines():
            if line.startswith(("megatron-sft", "sbatch", "torchrun")):
                assert "qwen-2.5" not in line, f"{doc.name}: {line}"


def test_sbatch_accepts_an_alias_and_sweep_jobs_are_named_after_the_sweep(tmp_path):
    one = cli("sbatch", "--dataset", "figfont", "--model", "Qwen-2.5-7B", "--objective", "nll", "--dry-run",
              cwd=tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "--job-name=figfont_qwen2.5-7b_nll-train" in one.stdout and "qwen-2.5" not in one.stdout
    sweep = cli("sweep", "alpha", "--dataset", "figfont", "--values", "0.5,2", "--dry-run", cwd=tmp_path)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    names = set(re.findall(r"--job-name=(\S+)", sweep.stdout))
    assert names == {f"sweep-alpha_figfont_qwen2.5-7b-{stage}" for stage in ("convert", "train", "export", "eval", "compare")}
    scale = cli("sweep", "scale", "--dry-run", cwd=tmp_path)  # three models: the name is the sweep's alone
    assert scale.returncode == 0 and "--job-name=sweep-scale_instruction_tuning-train" in scale.stdout, scale.stdout


def _header(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if line.startswith("#"))


def test_example_headers_suggest_a_real_alternative():
    files = sorted((ROOT / "examples").glob("*/*.yaml"))
    assert len(files) >= 19
    for path in files:
        text = path.read_text()
        objective = yaml.safe_load(text)["objective"]["name"]
        suggested = re.findall(r"objective\.name=(\S+)", _header(text))
        assert suggested and all(s != objective for s in suggested), f"{path}: suggests {suggested} in a {objective} file"
        assert f"Objective: {objective} (" in text, path
    medical = (ROOT / "examples" / "medical" / "qwen2.5-1.5b.yaml").read_text()
    assert f"objective.name={ALTERNATIVES['model-intermediate']}" in medical


# ---- item 8: convert help, dry-run listings, partitions, sequence parallelism, packing ---------------------------

def test_convert_help_says_checkpoints_reshard_at_load(tmp_path):
    from megatron_sft.cli import build_parser

    top = build_parser().format_help()
    own = cli("convert", "--help", cwd=tmp_path).stdout
    for text in (top, own):
        assert "(any TP/PP)" not in text
    assert "reshard" in " ".join(top.split()) and "resharded" in " ".join(own.split())


def test_sbatch_dry_run_prints_the_lists_it_would_write_and_partitions_split(tmp_path):
    args = ["sbatch", "--dataset", "math", "--model", "qwen2.5-math-7b", "--objective", "p", "--partition", "gpu",
            "--job-dir", "job"]
    dry = cli(*args, "--cpu-partition", "cpu", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert not (tmp_path / "job").exists()
    done = cli(*args, "--cpu-partition", "cpu", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("runs.txt", "models.txt"):
        assert f"# ---- {name}\n{(tmp_path / 'job' / name).read_text()}" in dry.stdout, name
    config = (tmp_path / "job" / "configs" / "math_qwen2.5-math-7b_neg_p.yaml").read_text()
    body = config.split("\n", 3)[3]  # after the header's run, layout and command lines (the command differs)
    assert "# ---- configs/math_qwen2.5-math-7b_neg_p.yaml\n" in dry.stdout and body in dry.stdout
    submit = (tmp_path / "job" / "submit.sh").read_text()
    jobs = {m.group(1): m.group(0) for m in re.finditer(r"(\w+)=\$\(submit .*?\.sbatch", submit, re.S)}
    assert set(jobs) == {"convert", "train", "export", "evaluate", "compare"}
    for gpu_job in ("train", "evaluate"):
        assert "--partition=gpu" in jobs[gpu_job] and "--partition=cpu" not in jobs[gpu_job]
    for cpu_job in ("convert", "export", "compare"):
        assert "--partition=cpu" in jobs[cpu_job] and "--partition=gpu" not in jobs[cpu_job]
    no_cpu = cli(*args, "--dry-run", cwd=tmp_path)  # without --cpu-partition: the cluster's default
    convert_line = next(line for line in no_cpu.stdout.splitlines() if line.startswith("convert=$(submit"))
    assert "--partition" not in convert_line


def test_tensor_parallel_turns_sequence_parallel_on_unless_set(tmp_path):
    from megatron_sft.config import load_config

    base = [f"output_dir={tmp_path / 'r'}", "model.checkpoint=ck", "data.train=a.jsonl"]
    assert load_config(None, base).parallel.sequence_parallel is False
    assert load_config(None, base + ["parallel.tensor=2"]).parallel.sequence_parallel is True
    assert load_config(None, base + ["parallel.tensor=2", "parallel.sequence_parallel=false"]).parallel.sequence_parallel is False
    assert load_config(None, base + ["parallel.sequence_parallel=true"]).parallel.sequence_parallel is True
    config = tmp_path / "c.yaml"
    config.write_text(f"output_dir: {tmp_path / 'r'}\nmodel:\n  checkpoint: ck\ndata:\n  train: [a.jsonl]\n")
    shown = cli("train", str(config), "parallel.tensor=2", "--print", "parallel", cwd=tmp_path)
    assert shown.returncode == 0 and yaml.safe_load(shown.stdout)["sequence_parallel"] is True, shown.stdout


def test_recipe_configs_say_why_packing_is_off(tmp_path):
    for path in sorted((ROOT / "examples").glob("*/*.yaml")):
        line = next(line for line in path.read_text().splitlines() if line.strip().startswith("packing:"))
        assert line.startswith("  packing: false  # off as in the reference"), f"{path}: {line}"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "Sequence packing (default on" in readme and "configs set `data.packing: false`, as the reference" in readme


# ---- item 9: plot, the 2-node 14B example, full-parameter ------------------------------------------------------

def _write_metrics(run: Path, steps: int, eval_every: int = 0) -> Path:
    """metrics.jsonl in the trainer's format (train/logger.py): one JSON object per step."""
    run.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": step / steps, "loss": 2.0 / step, "mean_p": 1 - 1 / (step + 1),
                  "selected_fraction": 1.0, "lr": 1e-4 * min(1.0, step / 3), "grad_norm": 1.0 / step,
                  "tokens_per_s": 1000.0, "step_seconds": 0.5, "mfu": None, "skipped": False}
        if step == 2:
            record.update(loss=float("nan"), grad_norm=None, skipped=True)  # a skipped non-finite step
        if eval_every and step % eval_every == 0:
            record.update({"eval/loss": 2.5 / step, "eval/mean_p": 0.5})
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_plot_writes_a_png_of_several_runs(tmp_path):
    from matplotlib.image import imread

    from megatron_sft.curves import load_run

    first, second = _write_metrics(tmp_path / "nll", 12, eval_every=4), _write_metrics(tmp_path / "neg_p", 8)
    done = cli("plot", str(first), str(second), "--out", "plots/curves.png", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    image = imread(tmp_path / "plots" / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 400 and image.shape[1] > 600 and image.std() > 0
    assert "nll: 12 steps" in done.stdout and "last eval loss" in done.stdout and "neg_p: 8 steps" in done.stdout
    curves = load_run(first)
    assert curves.series["eval/loss"][0] == [4, 8, 12] and 2 not in curves.series["loss"][0]
    assert 2 not in curves.series["grad_norm"][0]


@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_plot_refuses_a_bad_metrics_file_in_one_line_naming_it(tmp_path, case):
    run = tmp_path / "run"
    if case == "malformed":
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n{not json\n")
    done = cli("plot", str(run), "--out", "x.png", cwd=tmp_path)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2 and len(output.splitlines()) == 1, output
    assert output.startswith("megatron-sft plot: error: ") and str(run / "metrics.jsonl") in output
    if case == "malformed":
        assert f"{run / 'metrics.jsonl'}:2:" in output
    assert not (tmp_path / "x.png").exists()


def test_metrics_without_steps_or_loss_are_refused_naming_the_file(tmp_path):
    from megatron_sft.curves import CurvesError, load_run

    for name, text, message in [("empty", "", "no steps logged yet"), ("list", "[1, 2]\n", ":1: not a step record"),
                                ("noloss", json.dumps({"step": 1, "lr": 0.1}) + "\n", "no finite loss")]:
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        with pytest.raises(CurvesError, match=re.escape(str(path)) + ".*" + re.escape(message)):
            load_run(path)


def test_two_node_14b_example_and_its_sbatch_line():
    from megatron_sft.config import load_config

    relative = "examples/instruction_tuning/qwen2.5-14b-2nodes.yaml"
    config = load_config(ROOT / relative)
    assert config.model.checkpoint == "ckpt/qwen2.5-14b"
    tp, pp = config.parallel.tensor, config.parallel.pipeline
    assert (tp, pp) == (4, 1) and config.parallel.sequence_parallel
    assert config.train.global_batch_size % (config.train.micro_batch_size * 16 // (tp * pp)) == 0
    assert f"sbatch --nodes=2 slurm/train.sbatch {relative}" in (ROOT / "README.md").read_text()
    assert f"sbatch --nodes=2 slurm/train.sbatch {relative}" in (ROOT / relative).read_text()


def test_readme_says_fine_tuning_is_full_parameter():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "Fine-tuning is **full-parameter only**" in readme and "no LoRA" in readme
