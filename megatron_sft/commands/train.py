"""``megatron-sft train CONFIG.yaml [section.key=value ...]``: supervised fine-tuning with an f(p) objective."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    from megatron_sft.config import describe_fields

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


def _say_once(message: str) -> None:
    """Print on global rank 0 only (under torchrun every rank reaches here with the same error)."""
    from megatron_sft.parallel import SINGLE_PROCESS_MARK

    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0 or SINGLE_PROCESS_MARK in os.environ:
        print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    from megatron_sft import stop_signal
    from megatron_sft.launch import WorkerError
    from megatron_sft.config import config_and_overrides, load_config, resolved_value
    from megatron_sft.train.entry import launch_training, user_errors
    from megatron_sft.train.step import NonFiniteError

    config_path, overrides = config_and_overrides(args.config, args.overrides)
    try:
        config = load_config(config_path, overrides)
        if args.print_key:
            stop_signal.restore_default()
            print(resolved_value(config, args.print_key))
            return 0
        summary = launch_training(config, resume=args.resume, nproc=args.nproc)
    except user_errors() as err:
        _say_once(f"megatron-sft train: error: {err}")
        return 2
    except NonFiniteError as err:
        _say_once(f"megatron-sft train: halted: {err}")
        return 1
    except WorkerError as err:  # unexpected: the first failing rank's traceback, once
        print(f"megatron-sft train: {err}", file=sys.stderr, flush=True)
        return 1
    from megatron_sft.train.completed_run import ALREADY_COMPLETED, completed_message

    if summary is not None and summary.get(ALREADY_COMPLETED):  # --resume of a finished run: nothing was touched
        _say_once(completed_message(summary))
        return 0
    if summary is None:
        print(f"megatron-sft train: received signal {stop_signal.received()} before training started; nothing was "
              "written. Continue with --resume.", flush=True)
        return 0
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:  # under torchrun every rank returns the summary
        print(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=2))
    return 0
