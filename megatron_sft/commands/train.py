"""``megatron-sft train CONFIG.yaml [section.key=value ...]``: supervised fine-tuning with an f(p) objective."""

from __future__ import annotations

import argparse
import json
import os
import sys
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


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (bad input, a refusal): one line and exit 2, no traceback."""
    from megatron_sft.data.sources import DataError
    from megatron_sft.objectives import ObjectiveSpecError
    from megatron_sft.train.checkpoint_integrity import CheckpointDamagedError
    from megatron_sft.train.config import ConfigError
    from megatron_sft.train.run_lock import RunLockedError
    from megatron_sft.train.save_guard import NoSpaceError

    return (ConfigError, DataError, ObjectiveSpecError, FileNotFoundError, RunLockedError, CheckpointDamagedError,
            NoSpaceError)


def _say_once(message: str) -> None:
    """Print on global rank 0 only (under torchrun every rank reaches here with the same error)."""
    from megatron_sft.parallel import SINGLE_PROCESS_MARK

    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0 or SINGLE_PROCESS_MARK in os.environ:
        print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    from megatron_sft import stop_signal
    from megatron_sft.launch import WorkerError
    from megatron_sft.train.config import load_config
    from megatron_sft.train.step import NonFiniteError

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path and not config_path.endswith((".yaml", ".yml")):
        config_path, overrides = None, [config_path] + overrides
    try:
        config = load_config(config_path, overrides)
        if args.print_key:
            stop_signal.restore_default()
            print(resolved_value(config, args.print_key))
            return 0
        summary = launch(config, resume=args.resume, nproc=args.nproc)
    except expected_errors() as err:
        _say_once(f"megatron-sft train: error: {err}")
        return 2
    except NonFiniteError as err:
        _say_once(f"megatron-sft train: halted: {err}")
        return 1
    except WorkerError as err:  # unexpected: the first failing rank's traceback, once
        print(f"megatron-sft train: {err}", file=sys.stderr, flush=True)
        return 1
    if summary is None:
        print(f"megatron-sft train: received signal {stop_signal.received()} before training started; nothing was "
              "written. Continue with --resume.", flush=True)
        return 0
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


def launch(config, resume: bool = False, nproc: int | None = None) -> dict | None:
    """Train in this process (under torchrun/Slurm or single-process) or on ``nproc`` local workers, after the
    cheap checks (preflight.py). With ``nproc`` this process holds the run lock (run_lock.py) throughout.
    None: a stop signal arrived before training started."""
    from megatron_sft import stop_signal
    from megatron_sft.launch import run_local_workers
    from megatron_sft.parallel import under_launcher
    from megatron_sft.train.config import ConfigError
    from megatron_sft.train.preflight import preflight
    from megatron_sft.train.run_lock import HELD_ENV, RunLock

    local = nproc is not None and nproc > 1
    if local and under_launcher():
        raise ConfigError("--nproc is for local runs; under torchrun/Slurm the launcher starts the processes")
    preflight(config, nproc if local else None)
    if stop_signal.received() is not None:
        return None
    if not local:
        return train_worker(config.to_dict(), resume)
    lock = RunLock(config.output_dir).acquire()
    os.environ[HELD_ENV] = str(config.output_dir)
    try:
        from megatron_sft.train.step import NonFiniteError

        return run_local_workers(train_worker, nproc, config.to_dict(), resume, timeout_s=7 * 24 * 3600,
                                 expected_errors=expected_errors() + (NonFiniteError,), catch_stop_signals=True)[0]
    finally:
        os.environ.pop(HELD_ENV, None)
        lock.release()
