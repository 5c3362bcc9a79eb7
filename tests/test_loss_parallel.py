"""Vocab-parallel f(p) loss at TP=1/2/4 (and TP=2 x DP=2) against a single-process PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from megatron_sft.launch import run_local_workers
from megatron_sft.objectives import example_specs
from megatron_sft.selfcheck.loss_cases import assemble_case, loss_cases_worker, make_case_inputs
from megatron_sft.selfcheck.reference_loss import reference_loss

CASES = [dict(spec=s, dtype=torch.float32, reduction="token_mean", denominator="selected", padded=False) for s in example_specs()]
CASES += [
    dict(spec="nll", dtype=torch.float32, reduction="sequence_mean", denominator="selected", padded=False),
    dict(spec="neg_p_top:30", dtype=torch.float32, reduction="sequence_mean", denominator="valid", padded=False),
    dict(spec="nll_below:0.5", dtype=torch.float32, reduction="token_mean", denominator="valid", padded=False),
    dict(spec="family:3", dtype=torch.float32, reduction="token_mean", denominator="selected", padded=True),
    dict(spec="nll_bottom:25", dtype=torch.float32, reduction="token_mean", denominator="selected", padded=True),
    dict(spec="nll", dtype=torch.bfloat16, reduction="token_mean", denominator="selected", padded=False),
    dict(spec="neg_p", dtype=torch.bfloat16, reduction="token_mean", denominator="selected", padded=True),
    dict(spec="neg_p_above:0.5", dtype=torch.float32, reduction="token_mean", denominator="selected", padded=False, all_masked=True),
]
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 2), "tp4": (4, 4), "tp2xdp2": (2, 4)}  # (tensor_parallel, world_size)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_results(request):
    tp, world = LAYOUTS[request.param]
    per_rank = run_local_workers(loss_cases_worker, world, tp, CASES)
    return request.param, tp, world, per_rank


@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[f"{c['spec']}-{str(c['dtype'])[6:]}-{c['reduction']}-{c['denominator']}{'-padded' if c['padded'] else ''}{'-allmasked' if c.get('all_masked') else ''}" for c in CASES])
def test_loss_and_grad_match_reference(layout_results, case_index):
    _, tp, world, per_rank = layout_results
    case = CASES[case_index]
    logits, target, loss_mask, vocab_size = make_case_inputs(case_index, case["padded"], case.get("all_masked", False))
    valid = (target != -100) & (loss_mask != 0)
    ref_input = logits.to(case["dtype"]).float()
    ref_loss, ref_grad, ref_p = reference_loss(
        ref_input, target, valid, case["spec"], case["reduction"], case["denominator"], vocab_size
    )
    got = assemble_case(per_rank, case_index, tp, world)

    assert torch.isfinite(got["losses"]).all()
    # every rank reports the same global loss, equal to the reference
    torch.testing.assert_close(got["losses"].double(), ref_loss.expand_as(got["losses"]), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got["p"][valid].double(), ref_p[valid], atol=1e-6, rtol=1e-6)
    grad_tol = dict(atol=1e-6, rtol=1e-6) if case["dtype"] == torch.float32 else dict(atol=2e-5, rtol=1e-2)
    torch.testing.assert_close(got["grad"].double(), ref_grad, **grad_tol)
    if vocab_size is not None:  # padded vocabulary columns get no gradient
        assert torch.count_nonzero(got["grad"][..., vocab_size:]) == 0
    if case.get("all_masked"):
        assert float(got["losses"][0]) == 0.0 and torch.count_nonzero(got["grad"]) == 0
    else:
        assert torch.count_nonzero(ref_grad) > 0  # the comparison is not vacuous
