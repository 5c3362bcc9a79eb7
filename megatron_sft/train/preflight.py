"""Checks the launcher runs before any worker starts, so that everyday mistakes cost seconds and read as
one line naming the key or file and the fix (they used to surface from every worker, as tracebacks)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Optional

from megatron_sft.parallel import under_launcher
from megatron_sft.train.run_lock import check_not_in_use
from megatron_sft.model.fusions import resolve_fusions
from megatron_sft.data.source_checks import check_data_source
from megatron_sft.model.args import ModelArgs
from megatron_sft.model.attention_backends import resolve_attention_backend
from megatron_sft.config import Config, ConfigError, check_checkpoint_exists


def _model_args(checkpoint: str) -> ModelArgs:
    path = Path(checkpoint) / "model_args.json"
    try:
        return ModelArgs.load(path)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: unreadable ({err}); convert the model again with `megatron-sft convert hf-to-mcore`") from None


def check_layout(args: ModelArgs, config: Config, nproc: Optional[int], launched: Optional[str] = None) -> None:
    """The parallel layout against the model (heads, KV heads, layers, vocabulary) and the process count
    (``nproc``; ``launched`` says how it was asked for, e.g. ``--nproc 3``, for the message)."""
    par, where = config.parallel, f"the model in {config.model.checkpoint}"
    tp, pp, vp = par.tensor, par.pipeline, par.virtual_pipeline or 1
    for count, what in ((args.num_attention_heads, "attention heads"), (args.num_query_groups, "KV heads")):
        if count % tp:
            raise ConfigError(f"parallel.tensor={tp} does not divide the {count} {what} of {where}; use a "
                              f"parallel.tensor that divides {args.num_attention_heads} and {args.num_query_groups}")
    if (args.padded_vocab_size or args.vocab_size) % tp:
        raise ConfigError(f"parallel.tensor={tp} does not divide the vocabulary ({args.padded_vocab_size}) of {where}")
    if args.num_layers % (pp * vp):
        raise ConfigError(f"parallel.pipeline={pp}{f' x parallel.virtual_pipeline={vp}' if vp > 1 else ''} does not "
                          f"divide the {args.num_layers} layers of {where}")
    if nproc is not None and nproc % (tp * pp):
        raise ConfigError(f"{launched or f'--nproc {nproc}'} is not a multiple of parallel.tensor x parallel.pipeline "
                          f"= {tp * pp}; launch a multiple of {tp * pp} processes (e.g. --nproc {tp * pp}) or lower "
                          "parallel.tensor / parallel.pipeline")
    check_experts(args, config, nproc, launched)


def check_experts(args: ModelArgs, config: Config, nproc: Optional[int] = None, launched: Optional[str] = None) -> None:
    """parallel.expert against the model's experts and the process count; a mixture of experts at TP > 1 needs
    sequence parallelism (megatron-core's MoELayer refuses to train without it)."""
    par = config.parallel
    try:
        args.check_expert_parallel(par.expert)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.is_moe and par.tensor > 1 and par.sequence_parallel is False:
        raise ConfigError(f"parallel.sequence_parallel=false with parallel.tensor={par.tensor}: megatron-core trains a "
                          "mixture of experts at TP > 1 only with sequence parallelism; remove the override (null: on)")
    ranks = par.expert * par.tensor * par.pipeline
    if nproc is not None and nproc % ranks:
        raise ConfigError(f"{launched or f'--nproc {nproc}'} is not a multiple of parallel.expert x parallel.tensor x "
                          f"parallel.pipeline = {ranks}; launch a multiple of {ranks} processes or lower parallel.expert")


def process_count(nproc: Optional[int]) -> tuple[int, str]:
    """How many ranks the run will have, and how they were asked for (named in a refusal): --nproc N local
    workers, the launcher's WORLD_SIZE (torchrun) / SLURM_NTASKS (srun), else this one process."""
    from megatron_sft.parallel import under_launcher

    if nproc is not None:
        return nproc, f"--nproc {nproc}"
    if under_launcher():
        world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
        return world, f"the launcher's {world} process(es) (WORLD_SIZE)"
    return 1, "1 process (no --nproc)"


def check_batch_split(config: Config, world: int) -> None:
    """The global batch against the data-parallel size (same rule and words as the trainer's start-up)."""
    par, t = config.parallel, config.train
    dp = max(1, world // (par.tensor * par.pipeline))
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size}) x data-parallel size ({dp} = {world} ranks / (TP {par.tensor} x PP "
                          f"{par.pipeline}))")
    if par.virtual_pipeline and (t.global_batch_size // (t.micro_batch_size * dp)) % par.pipeline:
        raise ConfigError(f"interleaved pipelining needs the micro-batches per rank "
                          f"({t.global_batch_size // (t.micro_batch_size * dp)}) to be a multiple of parallel.pipeline "
                          f"({par.pipeline}); raise train.global_batch_size")


def check_existing_checkpoints(config: Config, resume: bool) -> None:
    """A run directory whose ``checkpoints/latest`` exists is refused without --resume: the trainer's own rule
    (trainer._resume_checkpoint), checked here so that it costs no worker start-up."""
    from megatron_sft.train.checkpointing import LATEST

    out = Path(config.output_dir)
    pointer = out / "checkpoints" / LATEST
    if resume or not pointer.is_file():
        return
    latest = pointer.read_text().strip()
    raise ConfigError(f"{out} already has checkpoints (latest: {latest}); pass --resume to continue that run, or "
                      f"choose another output_dir (e.g. output_dir={out}2)")


# config key -> (module to import, pip requirement): the optional packages a config can ask for
OPTIONAL_PACKAGES = {
    "log.wandb": ("wandb", "'megatron-sft[wandb]'"),
    "log.tensorboard": ("tensorboard", "tensorboard"),
}


def check_optional_packages(config: Config) -> None:
    """Every optional package the config switches on imports (found before the model loads, not after)."""
    for key, (module, requirement) in OPTIONAL_PACKAGES.items():
        section, name = key.split(".")
        if not getattr(getattr(config, section), name):
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"{key}=true but {module} does not import ({err}); pip install {requirement}, or set "
                              f"{key}=false") from None


def preflight(config: Config, nproc: Optional[int] = None, resume: bool = False) -> None:
    """Before any worker starts: no checkpoints are overwritten without --resume, the optional packages asked
    for import, the model checkpoint is readable, the layout fits the model and the process count, and every
    data path exists and holds rows. ``nproc``: local workers to spawn (None: this process, or the launcher's)."""
    if not under_launcher():
        check_not_in_use(config.output_dir)
    check_existing_checkpoints(config, resume)
    check_optional_packages(config)
    backend = resolve_attention_backend(config.model.attention_backend)  # te / flash asked for where they cannot run
    resolve_fusions(config.model, backend)  # a fusion set to true where its kernel is missing
    check_checkpoint_exists(config)
    world, launched = process_count(nproc)
    check_layout(_model_args(config.model.checkpoint), config, world, launched)
    check_batch_split(config, world)
    for key, paths in (("data.train", config.data.train), ("data.eval", config.data.eval)):
        for path in paths:
            check_data_source(path, key)
