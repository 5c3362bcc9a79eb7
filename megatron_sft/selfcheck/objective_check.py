"""Every objective's vocab-parallel loss and logit gradient on local processes against the float64 reference,
printed as a table: what `megatron-sft selftest` runs to check an installation (CPU/gloo or GPU/nccl)."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch


def check_objectives(tp: int, world: int, specs: Optional[list[str]], tolerance: float,
                     say: Callable[[str], None] = print) -> int:
    """Run each spec (default: one of every form) with the vocabulary over ``tp`` of ``world`` processes;
    returns how many are off the reference by more than ``tolerance``."""
    from megatron_sft.launch import run_local_workers
    from megatron_sft.objectives import example_specs, parse_objective
    from megatron_sft.selfcheck.loss_cases import assemble_case, loss_cases_worker, make_case_inputs
    from megatron_sft.selfcheck.reference_loss import reference_loss

    specs = specs or example_specs()
    for spec in specs:
        parse_objective(spec)  # fail fast with the list of valid forms
    cases = [dict(spec=s, dtype=torch.float32, reduction="token_mean", denominator="selected", padded=True) for s in specs]
    started = time.perf_counter()
    per_rank = run_local_workers(loss_cases_worker, world, tp, cases)
    say(f"vocab-parallel f(p) loss: TP={tp} x DP={world // tp} on {world} processes ({time.perf_counter() - started:.1f}s)")
    say(f"{'objective':18} {'loss':>12} {'reference':>12} {'|d loss|':>9} {'max|d grad|':>11}  prior")
    failures = 0
    for index, case in enumerate(cases):
        logits, target, mask, vocab_size = make_case_inputs(index, case["padded"])
        valid = (target != -100) & (mask != 0)
        ref_loss, ref_grad, _ = reference_loss(logits, target, valid, case["spec"], vocab_size=vocab_size)
        got = assemble_case(per_rank, index, tp, world)
        d_loss = abs(float(got["losses"][0]) - float(ref_loss))
        d_grad = float((got["grad"].double() - ref_grad).abs().max())
        ok = d_loss <= tolerance and d_grad <= tolerance
        failures += not ok
        say(f"{case['spec']:18} {float(got['losses'][0]):12.6f} {float(ref_loss):12.6f} {d_loss:9.1e} {d_grad:11.1e}  "
            f"{parse_objective(case['spec']).prior}{'' if ok else '  FAIL'}")
    say(f"{len(cases) - failures}/{len(cases)} objectives within {tolerance:g} of the reference")
    return failures
