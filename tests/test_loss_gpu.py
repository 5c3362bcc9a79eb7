"""The f(p) loss on a CUDA device (fp32 and bf16 logits) against the float64 CPU reference."""

from __future__ import annotations

import pytest
import torch

from megatron_sft.loss import finalize_loss, reduce_loss, vocab_parallel_objective_loss
from megatron_sft.objectives import example_specs
from megatron_sft.selfcheck.loss_cases import make_case_inputs
from megatron_sft.selfcheck.reference_loss import reference_loss

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", example_specs())
def test_cuda_loss_matches_reference(spec, dtype):
    logits, target, mask, vocab_size = make_case_inputs(0, padded_vocab=True)
    valid = (target != -100) & (mask != 0)
    x = logits.to(dtype).cuda().requires_grad_(True)
    out = vocab_parallel_objective_loss(x * 1, target.cuda(), spec, mask.cuda(), vocab_size=vocab_size, tp_group=None)
    loss = finalize_loss(*reduce_loss(out))
    loss.backward()
    ref_loss, ref_grad, _ = reference_loss(logits.to(dtype).float(), target, valid, spec, vocab_size=vocab_size)
    torch.testing.assert_close(loss.double().cpu(), ref_loss, atol=1e-6, rtol=1e-6)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-5, rtol=1e-2)
    torch.testing.assert_close(x.grad.double().cpu(), ref_grad, **tol)
