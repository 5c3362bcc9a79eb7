"""``megatron-sft selftest``: the vocab-parallel f(p) loss on N local processes vs. a float64 reference.

A quick check that an installation (CPU/gloo or GPU/nccl) computes every objective and its logit
gradient correctly with the vocabulary sharded over tensor-parallel ranks.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "selftest",
        help="check every f(p) objective's vocab-parallel loss and gradient against a float64 reference",
        description="Launch --world-size local processes (gloo on loopback without CUDA), shard the vocabulary "
        "over --tp of them (the rest are data parallel), compute every objective's loss and logit gradient and "
        "compare with single-process float64 PyTorch (autograd through log_softmax).",
    )
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size the vocabulary is sharded over (default 2)")
    parser.add_argument("--world-size", type=int, default=None, help="processes to launch (default: --tp); extra ones are data parallel")
    parser.add_argument("--objectives", nargs="*", default=None, help="specs to check (default: one of every form)")
    parser.add_argument("--tolerance", type=float, default=1e-6, help="max abs difference allowed in loss and gradient (default 1e-6)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_sft.objectives import ObjectiveSpecError
    from megatron_sft.selfcheck.objective_check import check_objectives

    try:
        failures = check_objectives(args.tp, args.world_size or args.tp, args.objectives, args.tolerance)
    except ObjectiveSpecError as err:
        print(f"megatron-sft selftest: error: {err}")
        return 2
    return 1 if failures else 0
