"""``megatron-sft probe``: the base model's mean token p on the training data, and which objective it suggests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from megatron_sft.capability import RULES, rule_text

    parser = sub.add_parser(
        "probe", help="measure the base model's token probabilities on the training data and recommend an objective",
        description="Run the base model (any TP/PP) forward over a random sample of the training rows, formatted "
        "as the trainer formats them, and report the mean token p of the responses (the paper's model-capability "
        "diagnostic), the histogram of p, the fractions below 0.1 / above 0.9, mean p by response position, and "
        f"the recommended objective: {rule_text()}, where neither NLL nor -p dominates. Writes OUT/probe.json and OUT/probe.png. Takes a training "
        "config (its model, data and format settings) and/or --checkpoint/--data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="training config YAML (optional)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. data.template=plain")
    parser.add_argument("--checkpoint", help="base model: a megatron-sft checkpoint (sets model.checkpoint)")
    parser.add_argument("--data", nargs="+", help="training files (sets data.train)")
    parser.add_argument("--samples", type=int, default=512, help="rows sampled from the training data (default 512)")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per forward pass (default 4)")
    parser.add_argument("--tp", type=int, help="tensor-parallel size (sets parallel.tensor)")
    parser.add_argument("--pp", type=int, help="pipeline-parallel size (sets parallel.pipeline)")
    parser.add_argument("--nproc", type=int, help="local processes (as for train; unset under torchrun/Slurm)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--rule", choices=sorted(RULES), default="midpoint",
                        help="capability rule of the recommendation: " + "; ".join(r.text for r in RULES.values())
                        + " (default midpoint; the report states the other beside it)")
    parser.add_argument("--out", default="probe", help="directory for probe.json and probe.png (default ./probe)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.data.sources import DataError
    from megatron_sft.launch import local_worker_count, run_local_workers
    from megatron_sft.probe import ProbeReport, probe_worker
    from megatron_sft.config import ConfigError, check_checkpoint_exists, config_and_overrides, load_config

    config_path, overrides = config_and_overrides(args.config, args.overrides)
    derived = [f"output_dir={args.out}"]
    if args.checkpoint:
        derived.append(f"model.checkpoint={args.checkpoint}")
    if args.data:
        derived.append("data.train=[" + ",".join(json.dumps(d) for d in args.data) + "]")
    derived += [f"parallel.tensor={args.tp}"] if args.tp else []
    derived += [f"parallel.pipeline={args.pp}"] if args.pp else []
    try:
        if args.samples < 1 or args.micro_batch < 1:
            raise ConfigError("--samples and --micro-batch must be >= 1")
        config = load_config(config_path, overrides + derived)
        check_checkpoint_exists(config)
        config.parallel.sequence_parallel = False
        job = (config.to_dict(), args.samples, args.micro_batch, args.out, args.seed, args.rule)
        workers = local_worker_count(args.nproc)
        if workers is not None:
            result = run_local_workers(probe_worker, workers, *job, timeout_s=24 * 3600)[0]
        else:
            result = probe_worker(*job)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:
        print(f"megatron-sft probe: error: {err}")
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(ProbeReport(**result).summary())
        print(f"wrote {Path(args.out) / 'probe.json'} and {Path(args.out) / 'probe.png'}")
    return 0
