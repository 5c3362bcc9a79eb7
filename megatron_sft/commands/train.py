"""``megatron-sft train CONFIG.yaml [section.key=value ...]``: supervised fine-tuning with an f(p) objective."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict


def add_parser(sub: argparse._SubParsersAction) -> None:
    from megatron_sft.train.config import describe_fields

    parser = sub.add_parser(
        "train",
        help="fine-tune a converted checkpoint with any f(p) objective (TP/SP/PP/DP on megatron-core)",
        description="Fine-tune a megatron-sft checkpoint (from `convert hf-to-mcore`). Run it on every rank of a "
        "torchrun or Slurm job (the parallel layout comes from the config; DP = world / (TP x PP)), or on N local "
        "processes with --nproc N. Settings come from CONFIG.yaml (see examples/) overridden by section.key=value "
        "pairs. Writes OUTPUT/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/, hf/}.",
        epilog="configuration keys (section.key = default):\n" + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="YAML config file (optional when everything is given as overrides)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values, e.g. optim.lr=1e-5 objective.name=neg_p parallel.tensor=2")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT/checkpoints/latest (model, optimizer, schedule, data order, RNG); "
                        "starts fresh when there is none yet, so a requeued job can always pass it")
    parser.add_argument("--print", dest="print_key", metavar="KEY",
                        help="print one resolved config value (e.g. output_dir, parallel.tensor; `all` for the whole "
                        "YAML) and exit without training; job scripts use it to find the run directory")
    parser.add_argument("--nproc", type=int, default=None,
                        help="launch this many local processes (gloo on 127.0.0.1 without CUDA, nccl with); "
                        "leave unset under torchrun/Slurm, which start the processes themselves")
    parser.set_defaults(run=run)


def train_worker(config_dict: dict, resume: bool = False) -> dict:
    """One rank's training run from a plain config dict (picklable, for spawned local workers)."""
    from megatron_sft.train.config import config_from_dict
    from megatron_sft.train.trainer import train

    return asdict(train(config_from_dict(config_dict), resume=resume))


def run(args: argparse.Namespace) -> int:
    from megatron_sft.data.sources import DataError
    from megatron_sft.objectives import ObjectiveSpecError
    from megatron_sft.train.config import ConfigError, load_config
    from megatron_sft.train.step import NonFiniteError

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        config_path, overrides = None, [config_path] + overrides
    try:
        config = load_config(config_path, overrides)
        if args.print_key:
            print(resolved_value(config, args.print_key))
            return 0
        summary = launch(config, resume=args.resume, nproc=args.nproc)
    except (ConfigError, DataError, ObjectiveSpecError, FileNotFoundError) as err:
        print(f"megatron-sft train: error: {err}")
        return 2
    except NonFiniteError as err:
        print(f"megatron-sft train: halted: {err}")
        return 1
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:  # under torchrun every rank returns the summary
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return 0


def resolved_value(config, key: str) -> str:
    """One config value as text (``all``: the whole config as YAML), for shell scripts."""
    import yaml

    from megatron_sft.train.config import ConfigError

    value = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, for YAML
    if key != "all":
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"--print {key}: no such config key (see `megatron-sft train --help`)")
            value = value[part]
    if isinstance(value, (dict, list, tuple)):
        return yaml.safe_dump(value, sort_keys=False).rstrip()
    return "null" if value is None else str(value)


def launch(config, resume: bool = False, nproc: int | None = None) -> dict:
    """Train in this process (under torchrun/Slurm or single-process) or on ``nproc`` local workers."""
    from megatron_sft.launch import run_local_workers
    from megatron_sft.parallel import under_launcher
    from megatron_sft.train.config import ConfigError

    if nproc is not None and nproc > 1:
        if under_launcher():
            raise ConfigError("--nproc is for local runs; under torchrun/Slurm the launcher starts the processes")
        return run_local_workers(train_worker, nproc, config.to_dict(), resume, timeout_s=7 * 24 * 3600)[0]
    return train_worker(config.to_dict(), resume)
