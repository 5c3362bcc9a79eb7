"""Fused output layer + f(p) loss equals the unfused path (output matmul + vocab-parallel loss) on the same layout:
per-token loss, p, selection, and the gradients of the hidden states and the output weight shard, for every
objective family, TP=1 / TP=2 / TP=2+SP, chunks that do not divide the token count, a non-uniform upstream gradient
and the trainer's own reduction, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from megatron_sft.launch import run_local_workers
from megatron_sft.objectives import example_specs
from megatron_sft.testing.fused_loss_check import fused_vs_unfused_worker

CASES = [dict(spec=s, dtype=torch.float32, chunk=7, uniform=False) for s in example_specs()]
CASES += [
    dict(spec="nll", dtype=torch.float32, chunk=4096, uniform=True),
    dict(spec="neg_p_top:30", dtype=torch.float32, chunk=5, uniform=True),
    dict(spec="nll", dtype=torch.bfloat16, chunk=8, uniform=False),
    dict(spec="neg_p", dtype=torch.bfloat16, chunk=8, uniform=True),
]
LAYOUTS = {"tp1": (1, False), "tp2": (2, False), "tp2-sp": (2, True)}


@pytest.fixture(scope="module")
def layouts():
    return {name: run_local_workers(fused_vs_unfused_worker, tp, tp, sp, CASES) for name, (tp, sp) in LAYOUTS.items()}


@pytest.fixture(params=list(LAYOUTS))
def per_rank(layouts, request):
    return layouts[request.param]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference ||a - b|| / ||b||."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("case_index", range(len(CASES)),
                         ids=[f"{c['spec']}-{str(c['dtype'])[6:]}-chunk{c['chunk']}{'-mean' if c['uniform'] else ''}"
                              for c in CASES])
def test_fused_equals_unfused(per_rank, case_index):
    case = CASES[case_index]
    tol = 1e-6 if case["dtype"] == torch.float32 else 2e-2
    for rank in per_rank:
        fused, unfused = rank[case_index]["fused"], rank[case_index]["unfused"]
        assert torch.equal(fused["selected"], unfused["selected"])
        assert _relative(fused["p"], unfused["p"]) <= tol
        assert _relative(fused["loss"], unfused["loss"]) <= tol
        for name in ("grad_h", "grad_w"):
            assert _relative(fused[name], unfused[name]) <= tol, (name, _relative(fused[name], unfused[name]))
    for name in ("grad_h", "grad_w"):  # (under SP one rank's slice of the sequence may have no selected token)
        assert any(torch.count_nonzero(r[case_index]["unfused"][name]) for r in per_rank), "a vacuous comparison"


@pytest.mark.parametrize("layout", ["tp2", "tp2-sp"])
def test_hidden_gradient_is_whole_at_tensor_parallel(layouts, layout):
    """The gradient reaching the hidden states is the sum over the vocabulary shards (the TP all-reduce or
    reduce-scatter happened, also when it arrives non-contiguous): equal to TP=1's."""
    single = layouts["tp1"][0]
    for case_index, case in enumerate(CASES):
        if case["dtype"] != torch.float32:
            continue
        expected = single[case_index]["fused"]["grad_h"]
        ranks = [r[case_index]["fused"]["grad_h"] for r in layouts[layout]]
        got = torch.cat(ranks, dim=0) if LAYOUTS[layout][1] else ranks[0]
        if not LAYOUTS[layout][1]:
            assert all(torch.equal(ranks[0], r) for r in ranks)
        assert _relative(got, expected) <= 1e-6, (case["spec"], _relative(got, expected))


def test_padded_vocabulary_rows_get_no_gradient():
    from megatron_sft.fused_output_loss import fused_output_objective_loss

    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    out = fused_output_objective_loss(hidden, weight, torch.randint(0, 12, (9,)), "neg_p", vocab_size=12,
                                      chunk_tokens=4, tp_group=None, select_group=None)
    out.per_token_loss.sum().backward()
    assert torch.count_nonzero(weight.grad[12:]) == 0 and torch.count_nonzero(weight.grad[:12]) > 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fused_output_objective_loss(hidden, weight, torch.full((9,), 12), "nll", vocab_size=12, tp_group=None,
                                    select_group=None)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from megatron_sft.testing.train_check import make_tiny_run_inputs

    root = tmp_path_factory.mktemp("fused_train")
    return root, *make_tiny_run_inputs(root)


def _train(tiny_run, name: str, nproc: int, *overrides: str, resume: bool = False):
    from megatron_sft.testing.train_check import tiny_config, train_worker

    root, ckpt, data = tiny_run
    config = tiny_config(ckpt, data, root / name, *overrides)
    return run_local_workers(train_worker, nproc, config.to_dict(), resume, timeout_s=600)[0]


RUN = ["train.max_steps=4", "checkpoint.every_steps=2", "optim.lr=3e-3", "optim.warmup_steps=1", "train.epochs=3",
       "objective.name=neg_p"]


@pytest.mark.parametrize("layout", [pytest.param((1, []), marks=pytest.mark.slow),
                                    (2, ["parallel.tensor=2", "parallel.sequence_parallel=false"]),
                                    pytest.param((2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
                                                 marks=pytest.mark.slow)],
                         ids=["tp1", "tp2", "tp2-sp"])
def test_trainer_fused_equals_unfused_and_checkpoints_cross(tiny_run, layout, capfd):
    """The same run with and without the fused output loss (tied embeddings: the gradient reaches the shared
    weight); a checkpoint written fused resumes unfused to the same losses."""
    from megatron_sft.testing.train_check import checkpoint_tensors

    nproc, overrides = layout
    tag = "-".join(overrides) or "tp1"
    fused = _train(tiny_run, f"fused-{tag}", nproc, *RUN, *overrides, "model.fused_output_loss=true",
                   "model.loss_chunk_tokens=5")
    assert "output loss fused (chunks of 5 tokens)" in capfd.readouterr().out
    unfused = _train(tiny_run, f"unfused-{tag}", nproc, *RUN, *overrides, "model.fused_output_loss=false")
    assert "output loss unfused" in capfd.readouterr().out
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(unfused["losses"]), rtol=1e-5, atol=1e-6)
    a, b = checkpoint_tensors(fused["checkpoint"]), checkpoint_tensors(unfused["checkpoint"])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-6)

    _train(tiny_run, f"cross-{tag}", nproc, *RUN[1:], *overrides, "train.max_steps=2", "model.fused_output_loss=true")
    resumed = _train(tiny_run, f"cross-{tag}", nproc, *RUN, *overrides, "model.fused_output_loss=false", resume=True)
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(fused["losses"][2:]), rtol=1e-5, atol=1e-6)
