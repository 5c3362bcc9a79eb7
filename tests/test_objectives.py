"""Objective registry: spec parsing, documented identities, boundaries and the loss's memory contract."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sft.loss import finalize_loss, reduce_loss, vocab_parallel_objective_loss
from megatron_sft.objectives import ObjectiveSpecError, example_specs, parse_objective


def _inputs(seed: int = 0, s: int = 5, b: int = 3, v: int = 40):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=gen) * 3
    target = torch.randint(0, v, (s, b), generator=gen)
    return logits, target


def _loss_and_grad(spec: str, logits: torch.Tensor, target: torch.Tensor, mask=None, **kw):
    x = logits.clone().requires_grad_(True)
    out = vocab_parallel_objective_loss(x * 1, target, spec, mask, tp_group=None, select_group=None)
    loss = finalize_loss(*reduce_loss(out, **kw))
    loss.backward()
    return loss.detach(), x.grad, out


@pytest.mark.parametrize(
    "reference_key, readable",
    [
        ("original", "nll"), ("logp", "nll"), ("p", "neg_p"), ("GeneralFamily-8", "family:8"),
        ("GeneralFamily-0.5", "family:0.5"), ("OnlyTopP-0.3", "neg_p_above:0.3"), ("OnlyBottomP-0.7", "neg_p_below:0.7"),
        ("OnlyTopLogP-0.2", "nll_above:0.2"), ("OnlyBottomLogP-0.9", "nll_below:0.9"),
        ("UnlikehoodTop-0.5", "log1mp_above:0.5"), ("UnlikehoodBottom-0.5", "log1mp_below:0.5"),
        ("focal", "focal:2"),
    ],
)
def test_reference_keys_equal_readable_names(reference_key, readable):
    logits, target = _inputs()
    loss_a, grad_a, _ = _loss_and_grad(reference_key, logits, target)
    loss_b, grad_b, _ = _loss_and_grad(readable, logits, target)
    assert parse_objective(reference_key).name == parse_objective(readable).name
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("GeneralFamily-0", "alpha must be > 0"), ("family:-1", "alpha must be > 0"), ("GeneralFamily--2", "alpha must be > 0"),
        ("OnlyTopP-1.5", "q must be in [0, 1]"), ("nll_below:-0.1", "q must be in [0, 1]"),
        ("neg_p_top:0", "k must be in (0, 100]"), ("nll_bottom:101", "k must be in (0, 100]"),
        ("GeneralFamily-abc", "is not a number"), ("family:nan", "is not a number"), ("nll_above", "needs an argument"),
        ("nll:3", "takes no argument"), ("cross_entropy", "unknown objective"), ("", "empty spec"),
    ],
)
def test_bad_specs_fail_with_valid_forms(spec, message):
    with pytest.raises(ObjectiveSpecError) as err:
        parse_objective(spec)
    assert message in str(err.value)
    assert "GeneralFamily-<alpha>" in str(err.value) and "OnlyBottomLogP-<q>" in str(err.value)


def test_p_objective_is_one_minus_p():
    logits, target = _inputs(1)
    _, _, out = _loss_and_grad("p", logits, target)
    expected = 1 - torch.softmax(logits.double(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.per_token_loss.double(), expected, atol=1e-7, rtol=1e-6)


def test_family_alpha_to_zero_is_nll():
    logits, target = _inputs(2)
    loss_nll, grad_nll, _ = _loss_and_grad("nll", logits, target)
    loss_small, grad_small, _ = _loss_and_grad("family:1e-6", logits, target)
    torch.testing.assert_close(loss_small, loss_nll, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(grad_small, grad_nll, atol=1e-6, rtol=1e-4)
    loss_one, _, _ = _loss_and_grad("family:1", logits, target)
    loss_p, _, _ = _loss_and_grad("neg_p", logits, target)
    torch.testing.assert_close(loss_one, loss_p, atol=1e-7, rtol=1e-6)


def test_threshold_boundary_is_inclusive():
    logits, target = _inputs(3)
    _, _, out = _loss_and_grad("nll", logits, target)
    q = float(out.p[2, 1])  # a threshold exactly at one token's probability
    for kind in ("above", "below"):
        _, _, sel = _loss_and_grad(f"nll_{kind}:{q!r}", logits, target)
        assert bool(sel.selected[2, 1]), f"p == q must be kept by nll_{kind}"
    nudged = float(torch.nextafter(torch.tensor(q), torch.tensor(2.0)))  # next fp32 above q
    _, _, above = _loss_and_grad(f"nll_above:{nudged!r}", logits, target)
    assert not bool(above.selected[2, 1])
    _, _, everything = _loss_and_grad("neg_p_above:0", logits, target)
    assert bool(everything.selected.all())
    _, _, everything = _loss_and_grad("neg_p_below:1", logits, target)
    assert bool(everything.selected.all())


def test_percentile_keeps_k_percent():
    logits, target = _inputs(4, s=10, b=10)
    _, _, top = _loss_and_grad("nll_top:30", logits, target)
    _, _, bottom = _loss_and_grad("nll_bottom:30", logits, target)
    assert int(top.selected.sum()) == 30 and int(bottom.selected.sum()) == 30
    assert float(top.p[top.selected].min()) >= float(top.p[~top.selected].max())
    assert float(bottom.p[bottom.selected].max()) <= float(bottom.p[~bottom.selected].min())


@pytest.mark.parametrize("spec", example_specs())
def test_all_masked_batch_is_zero_without_nan(spec):
    logits, target = _inputs(5)
    loss, grad, out = _loss_and_grad(spec, logits, target, mask=torch.zeros(target.shape))
    assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0 and torch.isfinite(grad).all()
    assert not bool(out.valid.any())


@pytest.mark.parametrize("spec", example_specs())
def test_objective_is_non_increasing_and_weight_is_its_derivative(spec):
    obj = parse_objective(spec)
    p = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    lp, l1mp = torch.log(p), torch.log1p(-p)
    value = obj.value(lp, l1mp)
    if spec != "dft":  # dft's value is -p log p (a reporting value); its gradient treats p as constant
        assert bool((value[1:] <= value[:-1] + 1e-12).all()), "f must be non-increasing in p"
        pp = p.clone().requires_grad_(True)
        obj.value(torch.log(pp), torch.log1p(-pp)).sum().backward()
        torch.testing.assert_close(obj.weight(lp, l1mp), -pp.grad * p, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize(
    "spec, prior, peak",
    [("nll", "prior-averse", 0.0), ("neg_p", "prior-leaning", 0.5), ("family:8", "prior-leaning", 8 / 9),
     ("family:0.5", "prior-averse", 1 / 3), ("family:0.9", "prior-averse", 0.9 / 1.9), ("family:1.1", "prior-leaning", 1.1 / 2.1),
     ("dft", "prior-leaning", 0.5), ("nll_above:0.3", "prior-leaning", 0.3), ("neg_p_below:0.5", "prior-averse", 0.5),
     ("focal:2", "prior-averse", None), ("nll_top:10", "prior-leaning", None), ("neg_p_bottom:10", "prior-averse", None)],
)
def test_prior_classification(spec, prior, peak):
    obj = parse_objective(spec)
    assert obj.prior == prior
    if peak is not None:  # W_f = p^a (1 - p) peaks at a / (a + 1)
        assert abs(obj.weight_peak() - peak) < 2e-3


@pytest.mark.parametrize("alpha", [0.25, 1.0, 4.0])
def test_family_centroid_is_closed_form(alpha):
    assert abs(parse_objective(f"family:{alpha}").weight_centroid() - (alpha + 1) / (alpha + 3)) < 1e-3


def test_only_one_vocab_sized_buffer_is_saved():
    s, b, v = 8, 2, 1000
    logits, target = torch.randn(s, b, v), torch.randint(0, v, (s, b))
    for dtype in (torch.float32, torch.bfloat16):
        saved: list[int] = []
        x = logits.to(dtype).clone().requires_grad_(True)
        h = x * 1
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = vocab_parallel_objective_loss(h, target, "neg_p", tp_group=None)
        assert sum(1 for n in saved if n >= s * b * v) == 1, saved
        out.per_token_loss.sum().backward()
        assert x.grad.dtype == dtype


def test_target_outside_vocab_is_a_clear_error():
    logits, target = _inputs(6)
    target[1, 1] = 999
    with pytest.raises(ValueError, match=r"target id 999 at position \[1, 1\] is outside the vocabulary"):
        vocab_parallel_objective_loss(logits, target, "nll", tp_group=None)


def test_mix_interpolates_nll_and_neg_p_exactly():
    lp = torch.log(torch.tensor([1e-6, 0.01, 0.3, 0.9, 1.0], dtype=torch.float64))
    l1mp = torch.log1p(-lp.exp())
    nll, neg_p = parse_objective("nll"), parse_objective("neg_p")
    for m in (0.0, 0.25, 1.0):
        mix = parse_objective(f"mix:{m}")
        torch.testing.assert_close(mix.value(lp, l1mp), (1 - m) * nll.value(lp, l1mp) + m * neg_p.value(lp, l1mp))
        torch.testing.assert_close(mix.weight(lp, l1mp), (1 - m) * nll.weight(lp, l1mp) + m * neg_p.weight(lp, l1mp))
    with pytest.raises(ObjectiveSpecError, match="mixture weight m must be in \\[0, 1\\]"):
        parse_objective("mix:1.5")


def test_adaptive_schedules_map_mean_p_from_nll_to_prior_leaning():
    alpha = parse_objective("adaptive_alpha")
    assert alpha.is_adaptive and alpha.prior == "adaptive"
    assert alpha.at(0.01).spec == alpha.at(0.2).spec == "family:0.01"  # model-weak end: ~NLL
    assert alpha.at(0.8).spec == alpha.at(0.95).spec == "family:10"  # model-strong end: p^10
    assert alpha.adaptive.parameter(0.5) == pytest.approx((0.01 * 10) ** 0.5)  # log-linear in between
    assert alpha.at(0.01).prior == "prior-averse" and alpha.at(0.9).prior == "prior-leaning"
    mix = parse_objective("adaptive_mix:0.1:0.9")
    assert [mix.adaptive.parameter(m) for m in (0.0, 0.1, 0.5, 0.9, 1.0)] == pytest.approx([0, 0, 0.5, 1, 1])
    assert mix.at(0.5).spec == "mix:0.5"
    lp = torch.log(torch.tensor([0.5]))
    with pytest.raises(RuntimeError, match="adaptive: resolve it with .at"):
        mix.value(lp, torch.log1p(-lp.exp()))
    for bad, why in [("adaptive_mix:0.5", "takes <low>:<high>"), ("adaptive_alpha:0.8:0.2", "0 <= low < high <= 1")]:
        with pytest.raises(ObjectiveSpecError, match=why):
            parse_objective(bad)


@pytest.mark.parametrize("scale", [0.5, 8.0])  # p ~ 1/vocab (a random model), and p spread up to ~1
def test_log1mp_is_accurate_per_token_at_small_and_large_p(scale):
    """log(1 - p) per token, fp32 against float64: relative error <= 1e-5 at every p. A difference of two
    logs, log(others) - log(sum), has only log(sum)'s absolute accuracy: ~5e-4 relative where p ~ 0.004."""
    torch.manual_seed(0)
    logits = torch.randn(500, 4, 256) * scale
    target = torch.randint(0, 256, (500, 4))
    out = vocab_parallel_objective_loss(logits.clone(), target, "log1mp", tp_group=None)
    p_ref = torch.log_softmax(logits.double(), -1).exp().gather(-1, target[..., None]).squeeze(-1)
    reference = torch.log1p(-p_ref).clamp_min(math.log(1e-6))
    relative = ((out.per_token_loss.double() - reference) / reference).abs()
    assert float(relative.max()) <= 1e-5, float(relative.max())
