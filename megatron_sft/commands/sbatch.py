"""``megatron-sft sbatch`` (one run) and ``megatron-sft sweep`` (a job array): Slurm jobs from the recipes."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from megatron_sft.recipes.datasets import RECIPES
    from megatron_sft.recipes.models import MODELS
    from megatron_sft.recipes.sweeps import SWEEPS

    models = "\n".join(f"  {m.key:20s} {m.hf_id} ({m.parameters / 1e9:.1f}B)"
                       + (f"; also {', '.join(m.keys[1:])}" if len(m.keys) > 1 else "") for m in MODELS)
    datasets = "\n".join(f"  {r.name:22s} {r.description}; paper's models: {', '.join(r.models)}" for r in RECIPES.values())
    one = sub.add_parser(
        "sbatch", help="write (and optionally submit) the Slurm jobs of one run: convert -> train -> export",
        description="Write a job directory for one dataset x model x objective run: the training config (the "
        "reference's recipe, with TP/PP chosen for the model and GPUs), copies of slurm/*.sbatch and submit.sh, "
        "which chains conversion, training and export with sbatch dependencies. Prints what it wrote.",
        epilog=f"models (--model):\n{models}\n\ndatasets (--dataset):\n{datasets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    one.add_argument("--dataset", required=True, help="recipe: " + ", ".join(RECIPES))
    one.add_argument("--model", required=True, help="model key, e.g. qwen2.5-math-1.5b (the HF repo name in lower case; "
                     "the reference's spellings such as qwen-2.5-math-1.5b and HF repo ids work too; see below)")
    one.add_argument("--objective", required=True,
                     help="objective spec (`megatron-sft objectives`), e.g. nll, neg_p, family:8; reference keys such as "
                     "original, p, GeneralFamily-8, OnlyTopP-0.5 work too")
    _add_common(one)
    one.set_defaults(run=run_one)

    sweeps = "\n".join(f"  {s.name:11s} {s.description}" for s in SWEEPS.values())
    many = sub.add_parser(
        "sweep", help="write (and optionally submit) one of the paper's sweeps as a Slurm job array",
        description="Write a job directory whose training and export jobs are arrays, one task per run of the sweep "
        "(see `sbatch --help` for the layout). Conversion runs once per base model before any training task.",
        epilog=f"sweeps:\n{sweeps}\n\nmodels (--model):\n{models}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    many.add_argument("name", choices=sorted(SWEEPS), help="which sweep")
    many.add_argument("--dataset", help="recipe (default: the sweep's dataset in the paper: math, or "
                      "instruction_tuning for scale)")
    many.add_argument("--model", help="model key (default: the model the paper swept on that dataset)")
    many.add_argument("--values", help="comma-separated alphas / quantiles / percentiles instead of the paper's grid")
    many.add_argument("--max-concurrent", type=int, help="array tasks running at once (sbatch --array=...%%N)")
    _add_common(many)
    many.set_defaults(run=run_sweep)


def _add_common(parser: argparse.ArgumentParser) -> None:
    res = parser.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1, help="nodes per training run (default 1)")
    res.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    res.add_argument("--gpu-memory-gb", type=float, default=80.0,
                     help="memory of one GPU in GiB, for choosing TP/PP (default 80: H100/A100-80GB)")
    res.add_argument("--tp", type=int, help="tensor-parallel size instead of the automatic choice")
    res.add_argument("--pp", type=int, help="pipeline-parallel size instead of the automatic choice")
    res.add_argument("--time", default="24:00:00", help="time limit of a training job (default 24:00:00); "
                     "a run that needs longer saves and requeues itself")
    res.add_argument("--partition", help="sbatch --partition of the GPU jobs (train, eval)")
    res.add_argument("--cpu-partition", help="sbatch --partition of the CPU-only jobs (convert, export; they request "
                     "no GPU); default: the cluster's default partition")
    res.add_argument("--account", help="sbatch --account")
    res.add_argument("--qos", help="sbatch --qos")
    env = parser.add_argument_group("environment and paths (relative to --workdir)")
    env.add_argument("--workdir", type=Path, default=Path.cwd(), help="directory the jobs run in (default: here)")
    env.add_argument("--setup", help="shell code every job runs first, e.g. 'module load cuda; source .venv/bin/activate' "
                     "(default: activate this installation's .venv when there is one)")
    env.add_argument("--container-image", help="run training in this container (pyxis srun --container-image)")
    env.add_argument("--container-mounts", help="pyxis --container-mounts for the training container")
    env.add_argument("--data-root", default="data", help="prepared data: DATA_ROOT/DATASET/{train,val}.jsonl (default data)")
    env.add_argument("--ckpt-root", default="ckpt", help="converted base models: CKPT_ROOT/MODEL (default ckpt)")
    env.add_argument("--runs-root", default="runs", help="training runs: RUNS_ROOT/RUN (default runs)")
    env.add_argument("--hf-root", default="models", help="HF base models: HF_ROOT/<repo name>, downloaded by the "
                     "convert job when missing (default models)")
    env.add_argument("--hf-dir", help="one model's HF directory, instead of HF_ROOT/<repo name>")
    env.add_argument("--as-reference", action="store_true",
                     help="train as the reference trainer does (objective.normalization=micro_batch_sum: each "
                     "micro-batch's mean backpropagated undivided, the clip acting on their sum), to reproduce the "
                     "paper's runs step for step")
    env.add_argument("--set", dest="overrides", action="append", default=[], metavar="section.key=value",
                     help="override a training config value in every run (repeatable), e.g. --set train.epochs=3")
    env.add_argument("--eval-benchmarks", help="benchmarks the eval job runs after export (default: the dataset's, "
                     "e.g. math -> math500,minerva,olympiadbench,aime24,amc23; 'none': no eval job). Extra eval "
                     "flags go in MEGATRON_SFT_EVAL_ARGS at submit time")
    out = parser.add_argument_group("output")
    out.add_argument("--job-dir", type=Path, help="where to write the job (default: jobs/NAME)")
    out.add_argument("--overwrite", action="store_true", help="replace the files of an existing job directory")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print submit.sh and the configs; write nothing")
    mode.add_argument("--submit", action="store_true", help="write the job and run its submit.sh (needs sbatch)")


def _options(args: argparse.Namespace):
    from megatron_sft.recipes.jobs import SlurmOptions

    setup = args.setup
    if setup is None:
        venv = Path(sys.prefix)
        if (venv / "bin" / "activate").is_file():
            setup = f"source {shlex.quote(str(venv / 'bin' / 'activate'))}"
    return SlurmOptions(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gb, time=args.time,
        partition=args.partition, cpu_partition=args.cpu_partition, account=args.account, qos=args.qos,
        max_concurrent=getattr(args, "max_concurrent", None), setup=setup, container_image=args.container_image,
        container_mounts=args.container_mounts, workdir=args.workdir, data_root=args.data_root,
        checkpoint_root=args.ckpt_root, runs_root=args.runs_root, hf_root=args.hf_root, hf_dir=args.hf_dir,
        tensor=args.tp, pipeline=args.pp, eval_benchmarks=args.eval_benchmarks,
        overrides=(["objective.normalization=micro_batch_sum"] if args.as_reference else []) + list(args.overrides),
    )


def _command_line() -> str:
    return "megatron-sft " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_one(args: argparse.Namespace) -> int:
    from megatron_sft.recipes.sweeps import SweepRun
    from megatron_sft.recipes.training_config import run_name

    return _generate(args, lambda: run_name(args.dataset, args.model, args.objective), args.dataset,
                     lambda: [SweepRun(args.model, args.objective)])


def run_sweep(args: argparse.Namespace) -> int:
    from megatron_sft.recipes.sweeps import SWEEPS, SweepError, sweep_runs

    dataset = args.dataset or SWEEPS[args.name].default_dataset
    try:
        values = [float(v) for v in args.values.split(",")] if args.values else None
    except ValueError:
        print(f"megatron-sft sweep: error: --values {args.values!r}: expected comma-separated numbers")
        return 2

    def runs():
        return sweep_runs(args.name, dataset, args.model, values)

    def name():
        """sweep-NAME_DATASET[_MODEL]: the sweep, never one of its runs (the model when all runs share one)."""
        from megatron_sft.recipes.models import get_model

        models = {get_model(run.model_key).key for run in runs()}
        return f"sweep-{args.name}_{dataset}" + (f"_{models.pop()}" if len(models) == 1 else "")

    try:
        return _generate(args, name, dataset, runs)
    except SweepError as err:
        print(f"megatron-sft sweep: error: {err}")
        return 2


def _generate(args: argparse.Namespace, name_fn, dataset: str, runs_fn) -> int:
    from megatron_sft.objectives import ObjectiveSpecError
    from megatron_sft.recipes.datasets import UnknownRecipeError
    from megatron_sft.recipes.jobs import (
        JobError, job_summary, list_files, plan_job, run_config_text, submit_script, write_job,
    )
    from megatron_sft.recipes.models import UnknownModelError
    from megatron_sft.recipes.parallel_plan import PlanError

    prog = f"megatron-sft {args.command}"
    try:
        name = name_fn()
        job = plan_job(name, dataset, runs_fn(), _options(args), _command_line())
    except (UnknownModelError, UnknownRecipeError, ObjectiveSpecError, PlanError, JobError) as err:
        print(f"{prog}: error: {err}")
        return 2
    job_dir = (args.job_dir or Path("jobs") / name).resolve()
    if args.dry_run:  # every file write_job would write but the sbatch templates (copies of slurm/*.sbatch)
        print(f"# ---- submit.sh\n{submit_script(job)}")
        for listing, text in list_files(job, job_dir).items():
            print(f"# ---- {listing}\n{text}")
        for run in job.runs:
            print(f"# ---- configs/{run.name}.yaml\n{run_config_text(job, run)}")
        print(job_summary(job, None))
        print(f"dry run: nothing written; without --dry-run this goes to {job_dir}")
        return 0
    try:
        write_job(job, job_dir, overwrite=args.overwrite)
    except JobError as err:
        print(f"{prog}: error: {err}")
        return 2
    print(job_summary(job, job_dir))
    if args.submit:
        if shutil.which("sbatch") is None:
            print(f"{prog}: error: sbatch is not on PATH (not a Slurm login node?); the job is written, submit it "
                  f"later with: bash {job_dir}/submit.sh")
            return 2
        return subprocess.run(["bash", str(job_dir / "submit.sh")]).returncode
    return 0
