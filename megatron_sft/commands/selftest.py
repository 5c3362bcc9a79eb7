"""``megatron-sft selftest``: the vocab-parallel f(p) loss on N local processes vs. a float64 reference.

A quick check that an installation (CPU/gloo or GPU/nccl) computes every objective and its logit
gradient correctly with the vocabulary sharded over tensor-parallel ranks.
"""

from __future__ import annotations

import argparse
import time

import torch


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
    from megatron_sft.launch import run_local_workers
    from megatron_sft.objectives import example_specs, parse_objective
    from megatron_sft.testing.loss_check import assemble_case, loss_cases_worker, make_case_inputs
    from megatron_sft.testing.reference import reference_loss

    world = args.world_size or args.tp
    specs = args.objectives or example_specs()
    for spec in specs:
        parse_objective(spec)  # fail fast with the list of valid forms
    cases = [dict(spec=s, dtype=torch.float32, reduction="token_mean", denominator="selected", padded=True) for s in specs]
    started = time.perf_counter()
    per_rank = run_local_workers(loss_cases_worker, world, args.tp, cases)
    dp = world // args.tp
    print(f"vocab-parallel f(p) loss: TP={args.tp} x DP={dp} on {world} processes ({time.perf_counter() - started:.1f}s)")
    print(f"{'objective':18} {'loss':>12} {'reference':>12} {'|d loss|':>9} {'max|d grad|':>11}  prior")
    failures = 0
    for index, case in enumerate(cases):
        logits, target, mask, vocab_size = make_case_inputs(index, case["padded"])
        valid = (target != -100) & (mask != 0)
        ref_loss, ref_grad, _ = reference_loss(logits, target, valid, case["spec"], vocab_size=vocab_size)
        got = assemble_case(per_rank, index, args.tp, world)
        grad, loss = got["grad"], got["losses"][0]
        d_loss = abs(float(loss) - float(ref_loss))
        d_grad = float((grad.double() - ref_grad).abs().max())
        ok = d_loss <= args.tolerance and d_grad <= args.tolerance
        failures += not ok
        prior = parse_objective(case["spec"]).prior
        print(f"{case['spec']:18} {float(loss):12.6f} {float(ref_loss):12.6f} {d_loss:9.1e} {d_grad:11.1e}  {prior}{'' if ok else '  FAIL'}")
    print(f"{len(cases) - failures}/{len(cases)} objectives within {args.tolerance:g} of the reference")
    return 1 if failures else 0
