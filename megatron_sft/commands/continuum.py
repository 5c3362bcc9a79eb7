"""``megatron-sft continuum``: the paper's model-capability continuum in miniature, on a CPU in minutes."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "continuum", help="miniature of the capability continuum: a tiny model, a task it knows and one it does not, "
        "SFT with NLL / -p / adaptive; table + plot",
        description="Pre-trains a tiny base model on one generated task (strong prior) and not on another (a "
        "substitution cipher: no prior), probes its mean token p on both, fine-tunes each with every --objectives "
        "spec through `megatron-sft train`, and reports held-out exact match and token accuracy as a markdown table, "
        "JSON and a PNG plot in --out. A few minutes on a laptop CPU; nothing is downloaded.",
    )
    parser.add_argument("--out", default="runs/continuum", help="working directory (default runs/continuum)")
    parser.add_argument("--objectives", default="nll,neg_p,adaptive_mix",
                        help="comma-separated objective specs (default nll,neg_p,adaptive_mix)")
    parser.add_argument("--epochs", type=int, default=4, help="SFT epochs per run (default 4)")
    parser.add_argument("--train-rows", type=int, default=512, help="SFT rows per task (default 512)")
    parser.add_argument("--base-steps", type=int, default=1500,
                        help="pre-training steps on the prior task (default 1500: its mean p lands in the model-strong range)")
    parser.add_argument("--lr", type=float, default=3e-3, help="SFT learning rate (default 3e-3)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.continuum import run_continuum
    from megatron_sft.objectives import ObjectiveSpecError, parse_objective

    objectives = tuple(s.strip() for s in args.objectives.split(",") if s.strip())
    try:
        for spec in objectives:
            parse_objective(spec)
        run_continuum(args.out, objectives, epochs=args.epochs, base_steps=args.base_steps, train_rows=args.train_rows,
                      lr=args.lr, overwrite=args.overwrite)
    except (ObjectiveSpecError, FileExistsError) as err:
        print(f"megatron-sft continuum: error: {err}")
        return 2
    return 0
