"""The trainer's first step against an independent reference: transformers' model in float64 with autograd.

tests/test_train.py compares layouts with the single-process run of the same trainer, so an error common to
all layouts (a gradient scale, a wrong normalisation, a swapped percentile) passes there. Here the loss and
every parameter's gradient (before clipping, dumped with MEGATRON_SFT_DUMP_GRADS) of a real
``megatron-sft train`` step are compared with the HF model run in float64 on the same sequences, with f(p),
selection and normalisation written out in plain PyTorch (megatron_sft/testing/train_reference.py).

Tolerances (measured: loss <= 6e-8, whole gradient <= 2.1e-7, q/k tensors <= 2.6e-5, every other tensor
<= 4e-7 relative):
- loss and the whole gradient (all tensors as one vector): 1e-6 relative, fp32 against float64;
- each tensor, relative to its own norm: 1e-5, and 1e-4 for the q/k projections, whose gradients pass
  through the attention softmax's backward where fp32 terms cancel (their norms are 100-1000x below the
  others). A wrong scale, denominator, token or mask shows at >= 1e-3.
"""

from __future__ import annotations

import pytest

from megatron_sft.testing.train_check import make_tiny_run_inputs, tiny_config
from megatron_sft.testing.train_reference import (
    gradient_errors,
    reference_step,
    reference_trainer_loop,
    run_first_step,
    selection_margin,
)

LAYOUTS = {
    # name: (processes, overrides); 8 packed rows per step, micro-batches of 2: 4 per rank (2 at DP=2)
    "one": (1, []),
    "tp2_sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    "dp2": (2, []),  # distributed optimizer: the dump all-gathers the reduce-scattered shards
    "pp2": (2, ["parallel.pipeline=2"]),
}
# the random tiny model's token p is ~0.004 (1/vocab): thresholds there split the tokens
OBJECTIVES = ["nll", "neg_p", "family:0.5", "nll_above:0.004", "neg_p_below:0.004", "neg_p_top:50",
              "log1mp_bottom:30", "mix:0.3"]

# (layout, objective, normalization, reduction, recompute): every objective family at one process, each layout
# and normalization more than once, sequence_mean over packed rows at two layouts, both recompute modes
DEFAULT_CASES = [
    ("one", "nll", "global", "token_mean", "none"),
    ("one", "neg_p", "micro_batch", "token_mean", "none"),
    ("one", "family:0.5", "global", "token_mean", "full"),
    ("one", "nll_above:0.004", "micro_batch", "token_mean", "none"),
    ("one", "neg_p_top:50", "global", "token_mean", "none"),  # percentile over 4 micro-batches: forward-only pass
    ("one", "mix:0.3", "global", "sequence_mean", "none"),  # per packed sequence
    ("tp2_sp", "neg_p_below:0.004", "micro_batch", "token_mean", "selective"),
    ("dp2", "log1mp_bottom:30", "micro_batch", "sequence_mean", "none"),
    ("pp2", "nll", "global", "token_mean", "full"),
]
SLOW_CASES = [(layout, objective, normalization, "token_mean", "none") for layout in LAYOUTS for objective in OBJECTIVES
              for normalization in ("global", "micro_batch")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_reference")
    ckpt, data = make_tiny_run_inputs(root)
    return root, ckpt, data


def first_step(tiny, layout: str, objective: str, normalization: str, reduction: str, recompute: str,
               tag: str = "") -> tuple[dict, object]:
    """(the trainer's first-step dump, its config) for one case (``tag``: a run directory of its own)."""
    root, ckpt, data = tiny
    nproc, overrides = LAYOUTS[layout]
    name = f"{layout}-{objective}-{normalization}-{reduction}-{recompute}{tag}".replace(":", "_")
    config = tiny_config(ckpt, data, root / name, f"objective.name={objective}", f"objective.normalization={normalization}",
                         f"objective.reduction={reduction}", f"model.recompute={recompute}", "train.max_steps=1",
                         "train.eval_every_steps=0", *overrides)
    dump = run_first_step(config, nproc, root / f"{name}.pt")
    dp = 2 if layout == "dp2" else 1
    assert len(dump["micro_batches"]) == dp and all(len(mbs) == 4 // dp for mbs in dump["micro_batches"])
    assert (dump["recomputed_segments"] > 0) == (recompute != "none"), dump["recomputed_segments"]
    return dump, config


def check_first_step(tiny, layout: str, objective: str, normalization: str, reduction: str, recompute: str) -> None:


    root, _, data = tiny
    dump, config = first_step(tiny, layout, objective, normalization, reduction, recompute)
    ref = reference_step(root / "hf", data, dump, objective, normalization, config.data, reduction)
    if not ref["selected"].all():  # a threshold / percentile: well posed, and it drops some tokens but not all
        assert ref["selected"].any() and selection_margin(ref["p"], ref["selected"]) > 1e-5, objective
    assert abs(dump["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (dump["loss"], ref["loss"])
    errors = gradient_errors(dump["grads"], ref["grads"])
    for name, error in errors.items():
        assert error <= (1e-4 if "q_proj" in name or "k_proj" in name else 1e-5), f"{name}: relative gradient error {error:.2e}"
    total_diff = sum(float((dump["grads"][k].double() - g).pow(2).sum()) for k, g in ref["grads"].items())
    total = sum(float(g.pow(2).sum()) for g in ref["grads"].values())
    assert (total_diff / total) ** 0.5 <= 1e-6, f"whole gradient: relative error {(total_diff / total) ** 0.5:.2e}"


def _assert_same_step(dump: dict, ref: dict) -> None:
    assert abs(dump["loss"] - ref["loss"]) <= 1e-6 * abs(ref["loss"]), (dump["loss"], ref["loss"])
    errors = gradient_errors(dump["grads"], ref["grads"])
    for name, error in errors.items():
        assert error <= (1e-4 if "q_proj" in name or "k_proj" in name else 1e-5), f"{name}: relative gradient error {error:.2e}"


@pytest.mark.parametrize("layout,objective", [("one", "neg_p"), pytest.param("dp2", "nll", marks=pytest.mark.slow)])
def test_micro_batch_sum_is_the_reference_trainers_step(tiny, layout, objective):
    """objective.normalization=micro_batch_sum: on 1 rank x 4 micro-batches the gradient before clipping is that
    of the SUM of the four micro-batch means, the logged loss their mean, equal to the reference trainer's loop
    re-written in plain float64 PyTorch; and 4x the gradient of normalization=micro_batch on the same rows."""
    root, _, data = tiny
    dump, config = first_step(tiny, layout, objective, "micro_batch_sum", "token_mean", "none")
    _assert_same_step(dump, reference_trainer_loop(root / "hf", data, dump, objective, config.data))
    averaged, _ = first_step(tiny, layout, objective, "micro_batch", "token_mean", "none", tag="-vs-sum")
    per_rank = len(dump["micro_batches"][0])
    assert averaged["loss"] == pytest.approx(dump["loss"], rel=1e-7)
    errors = gradient_errors(dump["grads"], {k: per_rank * v.double() for k, v in averaged["grads"].items()})
    assert max(errors.values()) <= 1e-6


@pytest.mark.parametrize("layout,objective,normalization,reduction,recompute", DEFAULT_CASES)
def test_first_step_matches_float64_hf(tiny, layout, objective, normalization, reduction, recompute):
    check_first_step(tiny, layout, objective, normalization, reduction, recompute)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_reference_untied")
    ckpt, data = make_tiny_run_inputs(root, variant="qwen2-untied-mha")
    return root, ckpt, data


@pytest.mark.parametrize("layout", ["one", "tp2_sp", pytest.param("pp2", marks=pytest.mark.slow)])
def test_untied_output_weight_matches_float64_hf(tiny_untied, layout):
    """An untied output layer: the fused loss writes its weight gradient straight into the DDP buffer and hands
    autograd megatron-core's stand-in (gradient-accumulation-fusion contract); lm_head's gradient as HF's."""
    check_first_step(tiny_untied, layout, "neg_p", "global", "token_mean", "none")


@pytest.mark.slow
@pytest.mark.parametrize("layout,objective,normalization,reduction,recompute", SLOW_CASES)
def test_first_step_matches_float64_hf_every_layout(tiny, layout, objective, normalization, reduction, recompute):
    check_first_step(tiny, layout, objective, normalization, reduction, recompute)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one", "tp2_sp", "pp2"])
def test_recompute_gives_the_step_without_recompute(tiny, layout):
    """model.recompute full / selective (megatron-core's checkpointed backward, on CPU through the RNG shims)
    reproduce the step without recompute: same loss, same gradients within fp32 reassociation."""
    base, _ = first_step(tiny, layout, "neg_p", "global", "token_mean", "none")
    for mode in ("full", "selective"):
        dump, _ = first_step(tiny, layout, "neg_p", "global", "token_mean", mode)
        assert abs(dump["loss"] - base["loss"]) <= 1e-7 * abs(base["loss"]), (mode, dump["loss"], base["loss"])
        errors = gradient_errors(dump["grads"], {k: v.double() for k, v in base["grads"].items()})
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-6, f"{mode} {worst}: {errors[worst]:.2e}"
