"""``megatron-sft demo``: the embedded CPU default, end to end on a tiny model (a couple of minutes)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="end to end on a tiny model: build a base model, convert, train with -p at TP=2, export, compare accuracy",
        description="Builds a tiny Qwen2-shaped base model and a generated task (shift each letter by one), converts "
        "it to megatron-core, fine-tunes it with `megatron-sft train` (objective `p`, TP=2 on 2 local processes, "
        "sequence parallel, packing), exports to HF and prints held-out exact-match accuracy before and after. "
        "Nothing is downloaded. The run's config.yaml is left in --out to re-run or edit.",
    )
    parser.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    parser.add_argument("--nproc", type=int, default=2, help="local processes (default 2)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size; must divide --nproc (default 2)")
    parser.add_argument("--objective", default="p", help="objective spec (default p, i.e. -p; see `megatron-sft objectives`)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    parser.add_argument("--base-steps", type=int, default=450, help="plain-PyTorch NLL steps that make the base model (default 450)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="exit 1 unless held-out token accuracy rises by at least this much (e.g. 0.01); for CI")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.demo import run_demo

    if args.nproc % args.tp:
        print(f"megatron-sft demo: error: --tp {args.tp} does not divide --nproc {args.nproc}")
        return 2
    try:
        result = run_demo(args.out, nproc=args.nproc, tensor_parallel=args.tp, objective=args.objective,
                          epochs=args.epochs, base_steps=args.base_steps, overwrite=args.overwrite)
    except FileExistsError as err:
        print(f"megatron-sft demo: error: {err}")
        return 2
    gain = result.tuned_token_accuracy - result.base_token_accuracy
    if args.min_gain is not None and gain < args.min_gain:
        print(f"token accuracy gain {gain:+.1%} is below --min-gain {args.min_gain:.1%}")
        return 1
    return 0
