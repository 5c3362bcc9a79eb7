"""Slurm job directories: configs, run lists and a submit script chaining convert -> train -> export -> eval.

A job directory holds everything a run needs, so it can be inspected, versioned and resubmitted:

    JOB_DIR/configs/RUN.yaml      one training config per run (relative paths, resolved in --workdir)
    JOB_DIR/runs.txt              the configs, one per line: line i+1 is array task i
    JOB_DIR/models.txt            HF_DIR CKPT_DIR HF_REPO_ID for each distinct base model
    JOB_DIR/{convert,train,export,eval}.sbatch   copies of slurm/*.sbatch (the scripts, not rendered)
    JOB_DIR/submit.sh             sbatch calls with the resources and --dependency chain

A single run is a plain job; a sweep is a job array (``--array=0-N%M``): conversion first, then every
training task, then each task's export and evaluation as soon as that task is done (``aftercorr``). The
evaluation runs the dataset's benchmarks (``--eval-benchmarks`` to change, ``none`` to leave it out).
"""

from __future__ import annotations

import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_sft.recipes.datasets import get_recipe
from megatron_sft.recipes.models import ModelSpec, get_model
from megatron_sft.recipes.parallel_plan import ParallelPlan, PlanError, fit_micro_batch, plan_parallel
from megatron_sft.recipes.sweeps import SweepRun
from megatron_sft.recipes.training_config import (
    RECIPE_COMMENTS, config_yaml, recipe_config, recipe_micro_batch, run_name,
)

SBATCH_TEMPLATES = ("convert.sbatch", "train.sbatch", "export.sbatch", "eval.sbatch", "compare.sbatch")


class JobError(ValueError):
    """A job that cannot be generated; the message names the option to change."""


def templates_dir() -> Path:
    """slurm/ of the source checkout this package runs from."""
    path = Path(__file__).resolve().parents[2] / "slurm"
    if not all((path / name).is_file() for name in SBATCH_TEMPLATES):
        raise JobError(f"the sbatch templates are not in {path}; install megatron-sft from its source checkout "
                       "(pip install -e .) so that slurm/ is next to the package")
    return path


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    time: str = "24:00:00"
    partition: Optional[str] = None  # the GPU jobs' (train, eval)
    cpu_partition: Optional[str] = None  # the CPU-only jobs' (convert, export); None: the cluster's default
    account: Optional[str] = None
    qos: Optional[str] = None
    max_concurrent: Optional[int] = None  # array tasks running at once
    setup: Optional[str] = None  # shell code run at the start of every job
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    workdir: Path = field(default_factory=Path.cwd)
    data_root: str = "data"
    checkpoint_root: str = "ckpt"
    runs_root: str = "runs"
    hf_root: str = "models"
    hf_dir: Optional[str] = None  # one model's HF directory (default: HF_ROOT/<repo name>)
    tensor: Optional[int] = None  # override the plan
    pipeline: Optional[int] = None
    overrides: list[str] = field(default_factory=list)  # section.key=value for every run
    eval_benchmarks: Optional[str] = None  # None: the dataset's benchmarks; "none": no eval stage


@dataclass
class PlannedRun:
    name: str
    model: ModelSpec
    objective: str
    plan: ParallelPlan
    config: dict[str, Any]


@dataclass
class Job:
    name: str
    dataset: str
    runs: list[PlannedRun]
    options: SlurmOptions
    command: str  # the megatron-sft command line that generated it
    eval_benchmarks: list[str] = field(default_factory=list)  # the eval stage's benchmarks (empty: none)
    eval_skipped: list[str] = field(default_factory=list)  # the dataset's benchmarks megatron-sft eval lacks

    @property
    def models(self) -> list[ModelSpec]:
        seen: dict[str, ModelSpec] = {}
        for run in self.runs:
            seen.setdefault(run.model.key, run.model)
        return list(seen.values())

    @property
    def is_array(self) -> bool:
        return len(self.runs) > 1


def plan_job(name: str, dataset: str, runs: Sequence[SweepRun], options: SlurmOptions, command: str) -> Job:
    """Parallel layout and training config for every run; fails on anything that would fail on the cluster."""
    from megatron_sft.config import ConfigError, config_from_dict

    get_recipe(dataset)
    if options.hf_dir and len({get_model(run.model_key).key for run in runs}) > 1:
        raise JobError("--hf-dir names one model's directory; this job has several models, use --hf-root")
    planned = []
    for run in runs:
        model = get_model(run.model_key)
        global_batch, micro = recipe_micro_batch(dataset, model.key)
        plan = _plan(model, options, global_batch, micro, get_recipe(dataset).max_length)
        config = recipe_config(dataset, model.key, run.objective, plan, data_root=options.data_root,
                               checkpoint_root=options.checkpoint_root, runs_root=options.runs_root, export_hf=False)
        config["model"]["recompute"] = plan.recompute  # chosen with the layout by the memory model
        run_label = run_name(dataset, model.key, run.objective)  # not `name`: that is the job's
        try:
            config = _with_overrides(config, options.overrides)
            config_from_dict(config)  # the trainer's own checks
        except ConfigError as err:
            raise JobError(f"run {run_label}: {err}") from None
        planned.append(PlannedRun(run_label, model, run.objective, plan, config))
    names = [run.name for run in planned]
    if len(set(names)) != len(names):
        raise JobError(f"two runs of this job have the same name: {sorted(n for n in names if names.count(n) > 1)}")
    benchmarks, skipped = eval_stage(dataset, options.eval_benchmarks)
    return Job(name, dataset, planned, options, command, benchmarks, skipped)


def eval_stage(dataset: str, wanted: Optional[str]) -> tuple[list[str], list[str]]:
    """(benchmarks the eval job runs, the recipe's benchmarks left out because megatron-sft eval lacks them)."""
    from megatron_sft.evaluation.benchmarks import ALIASES, BENCHMARKS, BenchmarkError, resolve_benchmarks

    if wanted is not None:
        if wanted.strip().lower() == "none":
            return [], []
        try:
            return [b.name for b in resolve_benchmarks(wanted)], []
        except BenchmarkError as err:
            raise JobError(f"--eval-benchmarks: {err}") from None
    names = [ALIASES.get(n, n) for n in get_recipe(dataset).eval_benchmarks]
    return [n for n in names if n in BENCHMARKS], [n for n in names if n not in BENCHMARKS]


def _plan(model: ModelSpec, options: SlurmOptions, global_batch: int, micro: int, seq: int) -> ParallelPlan:
    if options.tensor is None and options.pipeline is None:
        return plan_parallel(model, options.nodes, options.gpus_per_node, options.gpu_memory_gib, global_batch, micro, seq)
    tp, pp = options.tensor or 1, options.pipeline or 1
    world = options.nodes * options.gpus_per_node
    if world % (tp * pp):
        raise PlanError(f"--tp {tp} x --pp {pp} does not divide {world} GPUs")
    if model.heads % tp or model.kv_heads % tp:
        raise PlanError(f"--tp {tp} must divide {model.key}'s {model.heads} attention and {model.kv_heads} KV heads")
    if model.layers % pp:
        raise PlanError(f"--pp {pp} must divide {model.key}'s {model.layers} layers")
    dp = world // (tp * pp)
    return ParallelPlan(tp, pp, dp, fit_micro_batch(global_batch, micro, dp), 0.0, f"TP{tp} PP{pp} DP{dp} set by hand")


def _with_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``section.key=value`` pairs (as on the train command line) applied to a config dict."""
    from megatron_sft.config import parse_overrides

    for section, values in parse_overrides(list(overrides)).items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:  # output_dir
            config[section] = values
    return config


def hf_dir(model: ModelSpec, options: SlurmOptions) -> str:
    return options.hf_dir or f"{options.hf_root}/{model.hf_id.split('/')[-1]}"


def write_job(job: Job, job_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write the job directory (see the module docstring); returns the files written."""
    templates = templates_dir()
    job_dir = job_dir.resolve()
    if (job_dir / "submit.sh").exists() and not overwrite:
        raise JobError(f"{job_dir} already holds a job; pass --overwrite to replace its files, or choose --job-dir")
    if overwrite and (job_dir / "configs").is_dir():
        for stale in (job_dir / "configs").glob("*.yaml"):
            stale.unlink()
    (job_dir / "configs").mkdir(parents=True, exist_ok=True)
    (job_dir / "logs").mkdir(exist_ok=True)
    written = []
    for run in job.runs:
        path = job_dir / "configs" / f"{run.name}.yaml"
        path.write_text(run_config_text(job, run))
        written.append(path)
    for name, content in list_files(job, job_dir).items():
        (job_dir / name).write_text(content)
        written.append(job_dir / name)
    if any(run.plan.memory_table for run in job.runs):  # the memory model's breakdown per model (megatron-sft plan)
        (job_dir / "memory_plan.txt").write_text(memory_plan_text(job))
        written.append(job_dir / "memory_plan.txt")
    for name in SBATCH_TEMPLATES:
        shutil.copy2(templates / name, job_dir / name)
        written.append(job_dir / name)
    submit = job_dir / "submit.sh"
    submit.write_text(submit_script(job))
    submit.chmod(0o755)
    written.append(submit)
    return written


def memory_plan_text(job: Job) -> str:
    """Each model's per-GPU memory terms for the chosen layout and the alternatives it rejected."""
    parts = {}
    for run in job.runs:
        if run.plan.memory_table:
            parts.setdefault(run.model.key, f"# {run.model.key}: {run.plan.reason}\n{run.plan.memory_table}\n")
    return "\n".join(parts.values())


def list_files(job: Job, job_dir: Path) -> dict[str, str]:
    """runs.txt (array task i trains line i+1) and models.txt (convert task i converts line i+1), as written."""
    runs = [str(job_dir.resolve() / "configs" / f"{run.name}.yaml") for run in job.runs]
    models = [_model_line(m, job.options) for m in job.models]
    return {"runs.txt": "\n".join(runs) + "\n", "models.txt": "\n".join(models) + "\n"}


def run_config_text(job: Job, run: PlannedRun) -> str:
    """configs/RUN.yaml: the training config with its header and the recipes' comments (why packing is off)."""
    return config_yaml(run.config, header=_config_header(job, run), comments=RECIPE_COMMENTS)


def _model_line(model: ModelSpec, options: SlurmOptions) -> str:
    return f"{hf_dir(model, options)} {options.checkpoint_root}/{model.key} {model.hf_id}"


def _config_header(job: Job, run: PlannedRun) -> str:
    recipe = get_recipe(job.dataset)
    return (f"{run.name}: {recipe.description}; {run.model.hf_id}; objective {run.objective}\n"
            f"layout: {run.plan.reason}\n"
            f"generated by: {job.command}")


def _script_preamble(job: Job) -> list[str]:
    """submit.sh up to the sbatch calls: comments, environment, the options every job shares, ``submit()``."""
    o = job.options
    q = shlex.quote
    common = [f"--chdir={o.workdir.resolve()}"]
    common += [f"--{flag}={value}" for flag, value in (("account", o.account), ("qos", o.qos)) if value]
    layouts = sorted({f"TP{r.plan.tensor} PP{r.plan.pipeline} DP{r.plan.data}" for r in job.runs})
    lines = [
        "#!/usr/bin/env bash",
        f"# {job.name}: {len(job.runs)} run(s) of {job.dataset} on {o.nodes} node(s) x {o.gpus_per_node} GPUs "
        f"({', '.join(layouts)}); convert -> train -> export" + (" -> eval." if job.eval_benchmarks else "."),
        f"# generated by: {job.command}",
        "# Edit configs/*.yaml or the resources below, then run this script again to resubmit.",
        "set -euo pipefail",
        'job_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)',
    ]
    if o.setup:
        lines.append(f"export MEGATRON_SFT_SETUP={q(o.setup)}")
    lines.append(f"export MEGATRON_SFT_GPUS_PER_NODE={o.gpus_per_node}")
    if o.container_image:
        lines.append(f"export MEGATRON_SFT_CONTAINER_IMAGE={q(o.container_image)}")
    if o.container_mounts:
        lines.append(f"export MEGATRON_SFT_CONTAINER_MOUNTS={q(o.container_mounts)}")
    return lines + [
        f"common=({' '.join(q(c) for c in common)})",
        "submit() { sbatch --parsable \"$@\" | cut -d ';' -f 1; }",
        "",
    ]


def is_judged(name: str) -> bool:
    """Benchmarks graded by an LLM judge, which the eval job needs named in MEGATRON_SFT_EVAL_ARGS."""
    from megatron_sft.evaluation.benchmarks import BENCHMARKS

    return name in BENCHMARKS and BENCHMARKS[name].grader == "judge"


def _judge_check_lines() -> list[str]:
    """bash: stop before submitting when the eval job would have no judge for a judged benchmark."""
    return [
        'case " ${MEGATRON_SFT_EVAL_ARGS:-} " in',
        '  *--judge-model*|*--judge-url*|*--config*) ;;',
        "  *) echo \"alpacaeval needs a judge: export MEGATRON_SFT_EVAL_ARGS='--judge-model DIR' (or '--judge-url URL "
        "--judge-name MODEL') and run this again\" >&2; exit 2 ;;",
        'esac',
    ]


def submit_script(job: Job) -> str:
    """bash that submits convert -> train -> export -> eval with sbatch dependencies and prints the job ids.
    ``--partition`` goes to the GPU jobs (train, eval) only; convert and export use no GPU and go to
    ``cpu_partition`` (the cluster's default partition when unset)."""
    o = job.options
    q = shlex.quote
    lines = _script_preamble(job)
    gpu = f" --partition={q(o.partition)}" if o.partition else ""
    cpu = f" --partition={q(o.cpu_partition)}" if o.cpu_partition else ""
    if any(is_judged(name) for name in job.eval_benchmarks):  # refused before anything is submitted
        lines += _judge_check_lines()
    n_models, n_runs = len(job.models), len(job.runs)
    concurrency = f"%{o.max_concurrent}" if o.max_concurrent else ""
    convert_array = f' --array=0-{n_models - 1}' if n_models > 1 else ""
    run_array = f' --array=0-{n_runs - 1}{concurrency}' if job.is_array else ""
    log = '--output="$job_dir/logs/%x-' + ('%A_%a' if job.is_array else '%j') + '.out"'
    convert_log = '--output="$job_dir/logs/%x-' + ('%A_%a' if n_models > 1 else '%j') + '.out"'
    name = q(job.name)
    lines += [
        f'convert=$(submit "${{common[@]}}"{cpu} --job-name={name}-convert{convert_array} {convert_log} \\',
        '  "$job_dir/convert.sbatch" "@$job_dir/models.txt")',
        f'train=$(submit "${{common[@]}}"{gpu} --job-name={name}-train --dependency="afterok:$convert"{run_array} \\',
        f'  --nodes={o.nodes} --gpus-per-node={o.gpus_per_node} --time={q(o.time)} {log} \\',
        '  "$job_dir/train.sbatch" "@$job_dir/runs.txt")',
        f'export=$(submit "${{common[@]}}"{cpu} --job-name={name}-export '
        f'--dependency="{"aftercorr" if job.is_array else "afterok"}:$train"{run_array} {log} \\',
        '  "$job_dir/export.sbatch" "@$job_dir/runs.txt")',
    ]
    if job.eval_skipped:
        lines.append(f"# not evaluated here: {', '.join(job.eval_skipped)} (needs an LLM judge; not in megatron-sft eval)")
    if not job.eval_benchmarks:
        lines += [
            'echo "$convert $train $export" > "$job_dir/job_ids"',
            f'echo "submitted {job.name}: convert $convert -> train $train -> export $export; logs in $job_dir/logs"',
        ]
        return "\n".join(lines) + "\n"
    lines += [
        f'evaluate=$(submit "${{common[@]}}"{gpu} --job-name={name}-eval '
        f'--dependency="{"aftercorr" if job.is_array else "afterok"}:$export"{run_array} \\',
        f'  --gpus-per-node={o.gpus_per_node} {log} \\',
        f'  "$job_dir/eval.sbatch" {q(",".join(job.eval_benchmarks))} "@$job_dir/runs.txt")',
        f'compare=$(submit "${{common[@]}}"{cpu} --job-name={name}-compare --dependency="afterany:$evaluate" \\',
        '  --output="$job_dir/logs/%x-%j.out" "$job_dir/compare.sbatch" "$job_dir/compare" "@$job_dir/runs.txt")',
        'echo "$convert $train $export $evaluate $compare" > "$job_dir/job_ids"',
        f'echo "submitted {job.name}: convert $convert -> train $train -> export $export -> eval $evaluate -> '
        'compare $compare (table in $job_dir/compare); logs in $job_dir/logs"',
    ]
    return "\n".join(lines) + "\n"


def job_summary(job: Job, job_dir: Optional[Path]) -> str:
    """What a user reads after generating: runs, layouts, missing inputs, how to submit."""
    o = job.options
    lines = [f"{job.name}: {len(job.runs)} run(s) of {job.dataset} on {o.nodes} node(s) x {o.gpus_per_node} GPUs"]
    for run in job.runs:
        lines.append(f"  {run.name}: {run.model.hf_id}, objective {run.objective}, {run.plan.reason}; "
                     f"micro-batch {run.plan.micro_batch_size}")
    workdir = o.workdir.resolve()
    for model in job.models:
        if not (workdir / hf_dir(model, o) / "config.json").is_file():
            lines.append(f"  note: {hf_dir(model, o)} has no HF model yet; the convert job downloads {model.hf_id} there "
                         "(or copy it there first if the compute nodes are offline)")
    for run in job.runs:
        if (workdir / run.config["output_dir"] / "checkpoints" / "latest").is_file():
            lines.append(f"  note: {run.config['output_dir']} already has checkpoints: the job resumes that run "
                         "(use another --runs-root, or move it away, to start over)")
    train_file = workdir / job.runs[0].config["data"]["train"][0]
    if not train_file.is_file():
        lines.append(f"  note: {train_file} does not exist yet: run `megatron-sft prepare {job.dataset} "
                     f"--out {o.data_root}/{job.dataset}` first")
    if job.eval_benchmarks:
        lines.append(f"  eval: {', '.join(job.eval_benchmarks)} -> {o.runs_root}/RUN/eval; side by side, written by "
                     f"the last job: {job_dir or 'JOB_DIR'}/compare/compare.md")
    if job.eval_skipped:
        lines.append(f"  note: {', '.join(job.eval_skipped)} is not evaluated (it needs an LLM judge)")
    if any(is_judged(name) for name in job.eval_benchmarks):
        lines.append("  note: alpacaeval is judged by an LLM: submit with MEGATRON_SFT_EVAL_ARGS='--judge-model DIR' "
                     "(or '--judge-url URL --judge-name MODEL', key in $OPENAI_API_KEY); submit.sh refuses without one")
    if job_dir is not None:
        lines.append(f"wrote {job_dir}; submit with: bash {job_dir}/submit.sh")
    return "\n".join(lines)
